"""BlossomRec's hyperparameter schema: the model's math (:class:`BlossomHParams`) and how it is computed
(:class:`BlossomRuntime`). The config keys are the field names; the defaults are the public reference
settings and live here only (``properties/model/*.yaml`` repeat them for RecBole's config system, and a
test keeps them equal)."""

from dataclasses import dataclass, fields

IMPLS = ("auto", "torch", "fast")  # blossom_impl: pick by device, force PyTorch, force the Triton kernels


def _keys(config):
    return config if isinstance(config, dict) else config.final_config_dict  # dict or recbole Config


def _read(cls, config):
    """An instance of dataclass ``cls`` from a RecBole ``Config`` or dict; missing/None keys keep defaults."""
    keys = _keys(config)
    values = {f.name: keys[f.name] for f in fields(cls) if keys.get(f.name) is not None}
    params = cls(**values)
    params.validate()
    return params


def _positive_ints(obj, names):
    for key in names:
        value = getattr(obj, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _bools(obj, names):
    for key in names:
        if not isinstance(getattr(obj, key), bool):
            raise ValueError(f"{key} must be true or false, got {getattr(obj, key)!r}")


LTIS_COMPRESSIONS = ("mlp", "mean")  # the paper's compression MLP; block means of the keys (a variant)
LTIS_SCORE_POOLS = ("logits", "probs", "head")  # how the query heads of a kv head share one block choice, or not
# The long-history settings (not the paper's; README "Use", docs/long_histories.md): block means pick the blocks, no
# rotation of q and k, the LTIS gate open at the start. One place for the benchmarks and tests that name them.
LONG_HISTORY = {"ltis_compression": "mean", "use_rope": False, "gate_bias_ltis": 10.0}


@dataclass
class BlossomHParams:
    """What a Blossom attention layer computes; the names are the config keys."""

    hidden_size: int = 128
    n_heads: int = 8
    n_kv_heads: int = 2
    cmp_block_len: int = 32
    cmp_stride: int = 16
    slc_block_size: int = 16
    n_slc_blocks: int = 4
    stis_window: int = 8
    stis_sink: bool = True
    gate_bias_ltis: float = -2.0
    gate_bias_stis: float = 2.0
    rope_base: float = 10000.0
    use_rope: bool = True  # False: no rotation at all (an ablation; rope_base cannot stop the first pair turning)
    hidden_dropout_prob: float = 0.2
    attn_dropout_prob: float = 0.2
    layer_norm_eps: float = 1e-12
    ltis_trainable_compression: bool = False
    ltis_score_rope: bool = True  # score blocks with rotated q, k (the authors' code; a tie measured, docs/models.md)
    ltis_score_pool: str = "logits"  # logits: mean score, one softmax (the authors'); probs: mean of probabilities;
    #   head: no pooling, each query head picks its own blocks (a variant; kernels read kv repeated to the heads)
    ltis_compression: str = "mlp"  # mlp: the paper's frozen compression MLP; mean: block means of the keys (a variant)

    @classmethod
    def from_config(cls, config):
        """Read every field from a RecBole ``Config`` (or dict); a missing key keeps its default."""
        return _read(cls, config)

    def validate(self):
        """Raise ``ValueError`` naming the key and what is allowed."""
        _positive_ints(self, ("hidden_size", "n_heads", "n_kv_heads", "cmp_block_len", "cmp_stride",
                              "slc_block_size", "n_slc_blocks", "stis_window"))
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by n_heads ({self.n_heads})")
        if (self.hidden_size // self.n_heads) % 2:
            raise ValueError(f"hidden_size / n_heads must be even for RoPE, got {self.hidden_size // self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.cmp_block_len < self.cmp_stride:
            raise ValueError(f"cmp_block_len ({self.cmp_block_len}) must be >= cmp_stride ({self.cmp_stride})")
        if self.slc_block_size % self.cmp_stride:
            raise ValueError(
                f"slc_block_size ({self.slc_block_size}) must be a multiple of cmp_stride ({self.cmp_stride})")
        for key in ("hidden_dropout_prob", "attn_dropout_prob"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {value!r}")
        _bools(self, ("ltis_trainable_compression", "stis_sink", "ltis_score_rope", "use_rope"))
        if self.ltis_score_pool not in LTIS_SCORE_POOLS:
            raise ValueError(f"ltis_score_pool must be one of {', '.join(LTIS_SCORE_POOLS)}, got "
                             f"{self.ltis_score_pool!r}")
        if self.ltis_compression not in LTIS_COMPRESSIONS:
            raise ValueError(f"ltis_compression must be one of {', '.join(LTIS_COMPRESSIONS)}, got "
                             f"{self.ltis_compression!r}")
        if self.ltis_compression == "mean" and self.ltis_trainable_compression:
            raise ValueError("ltis_compression: mean has no parameters to train; it needs "
                             "ltis_trainable_compression: False")
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) or self.rope_base <= 1:
            raise ValueError(f"rope_base must be a number > 1, got {self.rope_base!r}")

    @property
    def head_dim(self):
        return self.hidden_size // self.n_heads

    @property
    def attention_kv_heads(self):
        """Key/value heads the attention ops see: ``n_kv_heads``, or ``n_heads`` when each query head picks its
        own blocks (``ltis_score_pool: head``: the kv heads are repeated to their query heads)."""
        return self.n_heads if self.ltis_score_pool == "head" else self.n_kv_heads


@dataclass
class BlossomRuntime:
    """How Blossom attention is computed; the result does not depend on these (up to rounding)."""

    blossom_impl: str = "auto"  # auto: Triton kernels on CUDA, PyTorch elsewhere; torch / fast force one
    ltis_chunk_size: int = 1024  # queries scored at once by the PyTorch block selection (bounds its memory)

    @classmethod
    def from_config(cls, config):
        return _read(cls, config)

    def validate(self):
        _positive_ints(self, ("ltis_chunk_size",))
        if self.blossom_impl not in IMPLS:
            raise ValueError(f"blossom_impl must be one of {', '.join(IMPLS)}, got {self.blossom_impl!r}")
