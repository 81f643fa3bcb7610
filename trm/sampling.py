"""Sampling text from a TRM: the next-token rule, the token-by-token loop, and terminal-safe streaming of the text.

generate_batch() feeds B prompts of one length once (prefill) and then one token per row per forward pass, reusing
the keys/values that every net call at every depth has cached (on CUDA, each of those passes is a CUDA-graph replay).
generate() is its batch of one. use_cache=False recomputes the whole window for every token: slower, and there only
to check the cached path. Both follow the same sliding-window policy past max_seq_len, so greedy outputs agree.
"""
import torch

from trm.adapters import merge_all
from trm.halting import decode_adaptive
from trm.kv_cache import KVCache, StaticKVCache


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, prev_ids=None, generator=None):
    """Next token ids [B] from last-position logits [B, V].

    temperature 0 = greedy (argmax); top_k 0 and top_p 1.0 switch those filters off; repetition_penalty 1.0 = off.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and prev_ids is not None and prev_ids.numel():
        # CTRL (Keskar et al. 2019): every token already in the text becomes less likely. Dividing a negative logit
        # would raise it, so negative logits are multiplied instead.
        seen = logits.gather(1, prev_ids)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits = logits.scatter(1, prev_ids, seen)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    V = logits.size(-1)
    k = top_k if 0 < top_k < V else V
    candidates = None
    if k < V or top_p < 1.0:
        # top-p only ever looks at the top-k survivors, so sort those few, not the whole vocabulary
        logits, candidates = logits.topk(k, dim=-1)  # best first
        if top_p < 1.0:
            probs = logits.softmax(dim=-1)
            # drop a token once the tokens ranked above it already cover top_p (reaching it exactly covers it: the
            # smallest set, as with ties); the best token always stays
            drop = probs.cumsum(dim=-1) - probs >= top_p
            drop[:, 0] = False
            logits = logits.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
    return (candidates.gather(1, choice) if candidates is not None else choice).squeeze(1)


def prompt_ids(tokenizer, text):
    """Token ids to start from: BOS, then the encoded prompt (BOS alone when the prompt is empty).

    Training sees every document as BOS text EOS, so a prompt is the start of a document, as in training.
    """
    return [tokenizer.bos_id, *tokenizer.encode(text)]


class GraphedStep:
    """One cached decoding step captured as a CUDA graph, replayed for every new token.

    On a GPU, batch-1 decoding is bound by kernel launches, not arithmetic: the seed depth makes 24 block calls per
    token, about a dozen small kernels each, and Python issues them one by one. A replay launches them all at once.
    The cache is a StaticKVCache: the graph reads the position from the device. The graph is captured for the cache's
    batch size: one new token per row.

    compile=True captures the step as torch.compile made it: the small element-wise kernels of each block fused into
    a few, so the graph launches fewer (the compilation costs tens of seconds once per process and shape).
    """

    def __init__(self, model, cache, depth, compile=False):
        self.token = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.pos.device)

        def step(token):
            return model(token, cache=cache, last_only=True, **depth)[0]

        if compile:
            step = torch.compile(step, dynamic=False)
        pos = cache.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one step first: lazy initialization (and compiling) must not happen in capture
            step(self.token)
        torch.cuda.current_stream().wait_stream(side)
        cache.pos.copy_(pos)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.token)
        # neither run counts: they wrote keys/values at the next position, which the first real token overwrites
        cache.pos.copy_(pos)

    def __call__(self, token):
        self.token.copy_(token.view(-1, 1))
        self.graph.replay()
        return self.logits


def generate(model, prompt_ids, max_new_tokens, **kw):
    """Yield new token ids one at a time (batch 1): stops after max_new_tokens or at eos_id (which is not yielded).
    The keyword arguments are generate_batch's."""
    for tokens in generate_batch(model, [prompt_ids], max_new_tokens, **kw):
        yield tokens[0]  # never None: a batch of one ends when its row does


@torch.inference_mode()  # as a decorator it is entered and left around each step, never held across a yield
def generate_batch(model, prompt_rows, max_new_tokens, *, temperature=0.8, top_k=50, top_p=0.95,
                   repetition_penalty=1.0, eos_id=None, use_cache=True, cuda_graph=True, halt_threshold=None,
                   stats=None, generator=None, compile=False, **depth):
    """Decode B prompts of one token length together; yield a list of B new token ids per step.

    Each row samples on its own (its own repetition-penalty history, its own draw from the shared generator) and
    ends on its own: the step a row emits eos_id and every step after, its entry is None (its later tokens are
    computed, as the batch has one shape, but never shown). The loop ends after max_new_tokens steps or when every
    row has ended. Rows of one length share every position, so no padding or mask changes the numbers: row b gives
    what generate(prompt_rows[b]) gives, up to the sampling draws.

    Context window: model.config.max_seq_len tokens. When the text outgrows it, the window jumps forward to the last
    max_seq_len // 2 tokens and the cache is rebuilt from them with one prefill. Halving (rather than sliding one
    token at a time) keeps the rebuilds rare: one prefill per max_seq_len // 2 new tokens.

    On CUDA with the cache, each decoding step is a CUDA-graph replay (cuda_graph=False: plain eager steps);
    compile=True compiles that step first (GraphedStep).
    **depth: the test-time depth, TRM.steps's keywords (None or absent: as trained).

    halt_threshold (a model trained with a halting head; needs the cache): each new token stops its supervision
    rounds once the head's probability exceeds it (1.0 = never). stats, a dict, then counts "tokens" and "rounds"
    (supervision rounds run for them) over the decoding steps of rows still going; the prompt gets the full depth.
    """
    if not len(prompt_rows):
        raise ValueError("no prompts to decode")
    if any(not len(row) for row in prompt_rows):
        raise ValueError("empty prompt: start from [tokenizer.bos_id] (see prompt_ids)")
    P = len(prompt_rows[0])
    if any(len(row) != P for row in prompt_rows):
        lengths = sorted({len(row) for row in prompt_rows})
        raise ValueError(f"the prompts of one batch must have one token length (they share positions), got {lengths}")
    if max_new_tokens <= 0:
        return
    device = model.lm_head.weight.device
    L = model.config.max_seq_len
    keep = max(1, L // 2)
    B = len(prompt_rows)
    # every id of the text so far, preallocated: the repetition penalty reads each row's, the model reads the window
    ids = torch.empty(B, P + max_new_tokens, dtype=torch.long, device=device)
    ids[:, :P] = torch.as_tensor([list(row) for row in prompt_rows], dtype=torch.long)
    n = P       # ids[:, :n] is the text so far
    start = 0   # ids[:, start:n] is the window the model sees
    ended = [False] * B

    adaptive = halt_threshold is not None
    if adaptive and not use_cache:
        raise ValueError("adaptive depth (halt_threshold) works through the KV cache: use_cache=True")
    graphed = use_cache and cuda_graph and device.type == "cuda" and not adaptive
    cache = KVCache(L) if use_cache else None
    static = step = None

    def refill():
        # the whole window in one forward pass; with the cache this is the prefill that refills it from empty
        nonlocal static, step
        if cache is not None:
            cache.reset()
        logits, _ = model(ids[:, start:n], cache=cache, last_only=True, **depth)
        if graphed:  # the cache keeps its buffers, so one capture serves every refill
            static = static or StaticKVCache(cache)
            static.follow()
            step = step or GraphedStep(model, static, depth, compile)
        return logits

    # the weights stay fixed while generating: each net call's adapters merged into its weights once, not per step
    # (trm/adapters.py merge_all); held here too, so that a captured graph's weights outlive the model's attribute.
    # The model holds them only while this generator runs, never across a yield: a caller that trains or evaluates
    # with a generator half-consumed must not run on them (inference tensors, stale after an optimizer step). The
    # generator itself, resumed after such a step, decodes on with the weights it started from (as a captured graph)
    merged = model.merged_adapters = merge_all(model) if model.adapters is not None else None
    try:
        if n - start > L:
            start = n - keep
        logits = refill()
        while n < P + max_new_tokens:
            next_id = sample_next(logits[:, -1], temperature, top_k, top_p, repetition_penalty, ids[:, :n], generator)
            tokens = next_id.tolist()  # one device sync per step, needed anyway to stop at EOS and to print
            ended = [e or t == eos_id for e, t in zip(ended, tokens)]
            if all(ended):
                return
            model.merged_adapters = None
            yield [None if e else t for e, t in zip(ended, tokens)]
            model.merged_adapters = merged
            ids[:, n] = next_id
            n += 1
            if n == P + max_new_tokens:
                return  # no forward pass for tokens nobody will read
            if n - start > L:
                start = n - keep
                logits = refill()
            elif graphed:
                logits = step(next_id)
            elif adaptive:
                logits, rounds = decode_adaptive(model, ids[:, n - 1:n], cache, halt_threshold, **depth)
                if stats is not None:
                    going = [r for r, e in zip(rounds.tolist(), ended) if not e]
                    stats["tokens"] = stats.get("tokens", 0) + len(going)
                    stats["rounds"] = stats.get("rounds", 0) + sum(going)
            elif use_cache:
                logits, _ = model(ids[:, n - 1:n], cache=cache, last_only=True, **depth)
            else:
                logits = refill()
    finally:
        model.merged_adapters = None


class StreamDecoder:
    """The text to print as ids arrive, safe for byte-fallback tokens (a third of a Japanese character each).

    Each push decodes a short tail, the ids since an anchor, and returns what its text adds to the part already
    printed; a trailing U+FFFD (an unfinished multi-byte character) is held back until the character completes. Once
    everything is out, the anchor moves up to the last id or few, so a token costs the same at position 100,000 as at
    100. An anchor is only placed where decoding from it gives exactly the text already printed for those ids: not on
    a space that SentencePiece strips at the start of what it decodes, not inside a character. Never decode([token]).
    prefix_ids (the prompt) count as printed, so the text at the seam comes out as decode(all ids) has it.
    """
    MAX_TAIL = 64  # ids; a long run with no anchor (invalid bytes, each a U+FFFD; whitespace) gets here, then is cut
    LOOK_BACK = 8  # ids tried as an anchor behind the newest
    OPEN = 3  # U+FFFDs that may still become a character: the bytes of one begun and not finished (one each, at most)

    def __init__(self, tokenizer, prefix_ids=()):
        self.tokenizer = tokenizer
        self.tail = [int(i) for i in prefix_ids]  # the ids since the anchor
        text = tokenizer.decode(self.tail) if self.tail else ""
        self.printed = len(text)  # characters of decode(tail) that are out
        self.recent = text[-256:]  # the last characters out, to check an anchor against
        self._anchor()

    def push(self, token_id):
        self.tail.append(int(token_id))
        text = self.tokenizer.decode(self.tail)
        end = len(text.rstrip("\ufffd"))
        if len(self.tail) > self.MAX_TAIL:  # a long run of U+FFFD goes out, but not the end of it: a character may
            end = max(end, len(text) - self.OPEN)  # have begun there, which the next bytes complete
        new = text[self.printed:end]
        self.printed = max(self.printed, end)
        self.recent = (self.recent + new)[-256:]
        if end == len(text):
            self._anchor()
        if len(self.tail) > self.MAX_TAIL:
            new += self._cut(text)
        return new

    def _anchor(self):
        n = len(self.tail)
        for k in range(n - 1, max(0, n - self.LOOK_BACK) - 1, -1):
            text = self.tokenizer.decode(self.tail[k:])
            if text and not text[0].isspace() and text[0] != "\ufffd" and self.recent.endswith(text):
                self.tail, self.printed = self.tail[k:], len(text)
                return

    def _cut(self, text):
        """Shorten a tail that found no anchor (text: its decode) to its longest suffix among the last LOOK_BACK ids
        that decodes to the end of text and holds all that is not out yet. Cutting to the last id alone could cut
        into a character whose bytes are still arriving (it would decode as U+FFFD for good). Returns what has to
        go out now: nothing, unless no suffix holds the rest."""
        held, n = len(text) - self.printed, len(self.tail)
        for k in range(max(0, n - self.LOOK_BACK), n):  # longest first: one starting inside a character decodes
            piece = self.tokenizer.decode(self.tail[k:])  # to U+FFFDs where text has the character, and fails
            # (empty: control ids alone, after which the next piece would decode as a first one, its space stripped)
            if piece and len(piece) >= held and text.endswith(piece):
                self.tail, self.printed = self.tail[k:], len(piece) - held
                return ""
        rest = text[self.printed:]
        self.recent = (self.recent + rest)[-256:]
        self.tail = self.tail[-1:]
        self.printed = len(self.tokenizer.decode(self.tail))
        return rest

    def flush(self):
        """Whatever is still held back (an unfinished character at the very end prints as U+FFFD)."""
        text = self.tokenizer.decode(self.tail)
        new = text[self.printed:]
        self.printed = len(text)
        return new
