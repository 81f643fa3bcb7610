"""One tokenizer interface for every step: SentencePiece (the users' ja_trm.model) or raw UTF-8 bytes.

Both share the special ids the users' existing models use: unk=0 pad=1 bos=2 eos=3. The tokenizer travels
inside every checkpoint (`to_state`), so generation and evaluation never need the .model file again.
"""
import hashlib
import os

import numpy as np

UNK_ID, PAD_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Trainer settings that train_spm.py uses and the rest of the project relies on.
SPM_SPECIAL_IDS = dict(unk_id=UNK_ID, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID)


class TokenizerError(RuntimeError):
    pass


class Tokenizer:
    """Wraps a SentencePiece model (kind='sentencepiece') or the 256 bytes shifted past the specials (kind='byte')."""

    def __init__(self, kind, proto=None):
        self.kind = kind
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = BOS_ID, EOS_ID, PAD_ID, UNK_ID
        if kind == "sentencepiece":
            import sentencepiece as spm
            self.proto = bytes(proto)
            self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
            self.vocab_size = self.sp.get_piece_size()
            ids = (self.sp.unk_id(), self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id())
            if ids != (UNK_ID, PAD_ID, BOS_ID, EOS_ID):
                raise TokenizerError(
                    f"SentencePiece model has special ids unk,pad,bos,eos={ids}; this project needs 0,1,2,3 "
                    f"(retrain it with train_spm.py)")
        elif kind == "byte":
            self.proto = b""
            self.sp = None
            self.vocab_size = 256 + 4
        else:
            raise TokenizerError(f"unknown tokenizer kind {kind!r} (use 'sentencepiece' or 'byte')")

    # construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_args(cls, kind, sp_model=None):
        if kind == "byte":
            return cls("byte")
        if kind != "sentencepiece":
            raise TokenizerError(f"unknown --tokenizer {kind!r} (use 'sentencepiece' or 'byte')")
        if sp_model and os.path.isdir(sp_model):
            raise TokenizerError(f"--sp_model {sp_model} is a folder; name the model file step 2 wrote in it, e.g. "
                                 f"{os.path.join(sp_model, 'ja_trm.model')}")
        if not sp_model or not os.path.isfile(sp_model):
            raise TokenizerError(
                f"SentencePiece model not found: {sp_model!r}. Run step 2 (python train_spm.py) first, "
                f"or pass --sp_model PATH, or use --tokenizer byte.")
        with open(sp_model, "rb") as f:
            proto = f.read()
        try:
            return cls("sentencepiece", proto)
        except TokenizerError:
            raise
        except Exception as e:  # sentencepiece raises bare RuntimeErrors on garbage
            raise TokenizerError(f"{sp_model} is not a readable SentencePiece model ({e})") from None

    def to_state(self):
        """Checkpoint form: only tensors and plain types, so torch.load(weights_only=True) accepts it."""
        import torch  # here, not at the top: steps 1-2 import this module and need no torch
        return {"kind": self.kind, "proto": torch.frombuffer(bytearray(self.proto), dtype=torch.uint8)
                if self.proto else torch.zeros(0, dtype=torch.uint8)}

    @classmethod
    def from_state(cls, state):
        return cls(state["kind"], state["proto"].numpy().tobytes())

    def fingerprint(self):
        """Stable id of the exact vocabulary, for token-cache keys, checkpoint compatibility checks and the logs (two
        trainings of one ja_trm.model on several threads differ: train_spm.py --num_threads)."""
        return hashlib.sha256(self.kind.encode() + self.proto).hexdigest()[:16]

    # encode / decode -------------------------------------------------------------------------------------
    def encode(self, text):
        if self.sp is not None:
            return self.sp.encode(text)
        return [b + 4 for b in text.encode("utf-8")]

    def encode_batch(self, texts, num_threads=None):
        if self.sp is not None:
            # SentencePiece encodes a list on its own C++ threads: no Python processes needed.
            return self.sp.encode(list(texts), num_threads=num_threads or (os.cpu_count() or 1))
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")

    def token_bytes(self):
        """UTF-8 bytes each id stands for (0 for specials), so losses can be reported per byte.

        A model trained with SentencePiece's default add_dummy_prefix (train_spm.py turns it off) starts each document
        with a U+2581 that is not in its text: counted here as a space, one byte a document too many (0.2% of a
        600-byte document), a bits/byte that low. Per id, that byte cannot be told from a real space."""
        if self.sp is None:
            return np.array([0, 0, 0, 0] + [1] * 256, dtype=np.int64)
        n = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            if self.sp.is_byte(i):
                n[i] = 1
            else:
                n[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return n
