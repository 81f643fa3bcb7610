"""The tiny models of the model-level tests: a width-32 TRM (or GPT) over a 64-token vocabulary, and random tokens."""
import torch

from trm.model import TRM, TRMConfig

V, D = 64, 32  # tiny vocab and width for everything but the seed-size init check


def tiny(arch="trm", seed=0, **overrides):
    kw = dict(vocab_size=V, d_model=D, n_heads=4, n_layers=2, latent_steps=2, deep_steps=2, supervision_steps=2,
              dropout=0.0, max_seq_len=32, arch=arch)
    kw.update(overrides)
    torch.manual_seed(seed)
    return TRM(TRMConfig(**kw)).eval()


def tokens(B, T, seed=1, vocab=V):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))
