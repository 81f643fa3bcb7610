"""TRMConfig: the numbers that make a model, saved in every checkpoint, and checked like flags when built or loaded."""
import math
from dataclasses import asdict, dataclass


@dataclass
class TRMConfig:
    vocab_size: int = 16000
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 2
    latent_steps: int = 2       # n: z-updates per latent recursion
    deep_steps: int = 2         # T_deep: latent recursions per deep recursion (T_deep - 1 without gradients)
    supervision_steps: int = 2  # N_sup: deep-supervision rounds, each with its own loss
    dropout: float = 0.1
    max_seq_len: int = 512
    arch: str = "trm"           # "trm" (recursive) or "gpt" (n_layers blocks applied once)
    mlp_hidden: int = 0         # SwiGLU width; 0 = 8/3 d_model rounded up to a multiple of 64
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    halt_head: bool = False     # a per-token halting head on y (trained with --act_weight), for adaptive depth
    grad_deep_steps: int = 1    # deep steps per round that backpropagate, the last ones (the paper: 1; 0 = all)
    single_stream: bool = False  # one latent state instead of y and z (the same net calls; a variant)
    # stabilizers and hybrid depth (issue 19; every default is the seed model)
    qk_norm: bool = False       # RMS-normalize queries and keys per head: bounded attention logits at high rates
    zero_init: bool = False     # attention and MLP output projections start at zero: every block starts as identity
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap) (Gemma 2); 0 = off
    prelude_layers: int = 0     # unshared blocks on the embedded tokens before the recursion (x = prelude(embed))
    coda_layers: int = 0        # unshared blocks between each round's answer state and the output head
    step_embed: bool = False    # a learned vector per deep step, added to x in that step's z-updates
    adapter_rank: int = 0       # a rank-r delta per net call on every matrix of the shared net; 0 = off

    # the most parameters a config may ask for: far above any small recursive model, far below what would stall a
    # machine allocating it (a checkpoint's config is checked like a flag before any weight is built)
    MAX_PARAMS = 20_000_000_000

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "latent_steps", "deep_steps",
                     "supervision_steps", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.arch not in ("trm", "gpt"):
            raise ValueError(f"arch must be 'trm' or 'gpt', got {self.arch!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size")
        if self.grad_deep_steps < 0:
            raise ValueError(f"grad_deep_steps must be >= 0 (0 = every deep step), got {self.grad_deep_steps}")
        if min(self.prelude_layers, self.coda_layers, self.adapter_rank) < 0 or self.logit_softcap < 0:
            raise ValueError("prelude_layers, coda_layers, adapter_rank and logit_softcap must be >= 0")
        if self.arch != "trm" and (self.prelude_layers or self.coda_layers or self.step_embed or self.adapter_rank):
            raise ValueError("prelude_layers, coda_layers, step_embed and adapter_rank wrap the recursion: they need "
                             "arch='trm' (a GPT adds n_layers instead)")
        if self.mlp_hidden <= 0:
            self.mlp_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)
        blocks = self.n_layers + self.prelude_layers + self.coda_layers
        D = self.d_model
        params = (2 * self.vocab_size * D + blocks * (4 * D * D + 3 * D * self.mlp_hidden)
                  + self.n_layers * self.net_calls_per_step * self.adapter_rank * (8 * D + 3 * self.mlp_hidden))
        if params > self.MAX_PARAMS:
            raise ValueError(f"this configuration has about {params:,} parameters, more than the "
                             f"{self.MAX_PARAMS:,} this code builds")

    @property
    def recursive(self):
        return self.arch == "trm"

    @property
    def net_calls_per_step(self):
        """Net calls of one deep recursion at the trained depth: one adapter each (trm/adapters.py)."""
        return self.deep_steps * (self.latent_steps + 1)

    def to_dict(self):
        return asdict(self)
