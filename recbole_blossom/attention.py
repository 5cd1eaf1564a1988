"""Blossom attention: the gated sum of LTIS and STIS, a drop-in for RecBole's ``MultiHeadAttention``."""

from dataclasses import dataclass, fields

import torch
from torch import nn

from recbole_blossom.fast import IMPLS
from recbole_blossom.ltis import LTIS
from recbole_blossom.rotary import RotaryEmbedding
from recbole_blossom.stis import STIS


@dataclass
class BlossomHParams:
    """BlossomRec's hyperparameters; the names are the config keys, the defaults the reference values."""

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
    ltis_chunk_size: int = 1024
    hidden_dropout_prob: float = 0.2
    attn_dropout_prob: float = 0.2
    layer_norm_eps: float = 1e-12
    blossom_impl: str = "auto"
    ltis_trainable_compression: bool = False

    @classmethod
    def from_config(cls, config):
        """Read every field from a RecBole ``Config`` (or dict); a missing key keeps its default."""
        values = {}
        for f in fields(cls):
            value = config[f.name] if f.name in _keys(config) else None
            if value is not None:
                values[f.name] = value
        params = cls(**values)
        params.validate()
        return params

    def validate(self):
        """Raise ``ValueError`` naming the key and what is allowed."""
        for key in ("hidden_size", "n_heads", "n_kv_heads", "cmp_block_len", "cmp_stride", "slc_block_size",
                    "n_slc_blocks", "stis_window", "ltis_chunk_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
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
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {value!r}")
        if not isinstance(self.ltis_trainable_compression, bool):
            raise ValueError(
                f"ltis_trainable_compression must be true or false, got {self.ltis_trainable_compression!r}")
        if not isinstance(self.stis_sink, bool):
            raise ValueError(f"stis_sink must be true or false, got {self.stis_sink!r}")
        if self.blossom_impl not in IMPLS:
            raise ValueError(f"blossom_impl must be one of {', '.join(IMPLS)}, got {self.blossom_impl!r}")
        if not isinstance(self.rope_base, (int, float)) or self.rope_base <= 1:
            raise ValueError(f"rope_base must be a number > 1, got {self.rope_base!r}")

    @property
    def head_dim(self):
        return self.hidden_size // self.n_heads


def _keys(config):
    if isinstance(config, dict):
        return config
    return config.final_config_dict  # recbole.config.Config


class BranchGate(nn.Module):
    """``sigmoid(Linear(x))``: one weight per head per branch. ``(B, L, hidden)`` -> two ``(B, H, L, 1)``."""

    def __init__(self, hidden_size, n_heads, bias_ltis=-2.0, bias_stis=2.0):
        super().__init__()
        self.n_heads, self.bias_ltis, self.bias_stis = n_heads, bias_ltis, bias_stis
        self.proj = nn.Linear(hidden_size, 2 * n_heads)

    def reset_parameters(self):
        with torch.no_grad():
            self.proj.bias[: self.n_heads].fill_(self.bias_ltis)
            self.proj.bias[self.n_heads:].fill_(self.bias_stis)

    def forward(self, x):
        g = torch.sigmoid(self.proj(x)).transpose(1, 2).unsqueeze(-1)  # (B, 2H, L, 1)
        return g[:, : self.n_heads], g[:, self.n_heads:]


class BlossomAttention(nn.Module):
    """BlossomRec attention layer with RecBole's ``MultiHeadAttention`` interface.

    ``forward(input_tensor, item_seq_len)``: ``(B, L, hidden)`` and ``(B,)`` -> ``(B, L, hidden)``, i.e.
    ``LayerNorm(dropout(W_o [g1 * LTIS + g2 * STIS]) + input_tensor)``. Items are left-aligned (RecBole's
    layout); attention is causal, so no ``L x L`` mask is needed.
    """

    def __init__(self, hp: BlossomHParams):
        super().__init__()
        self.hp = hp
        H, Hkv, D = hp.n_heads, hp.n_kv_heads, hp.head_dim
        self.query = nn.Linear(hp.hidden_size, H * D)
        self.key = nn.Linear(hp.hidden_size, Hkv * D)
        self.value = nn.Linear(hp.hidden_size, Hkv * D)
        self.rotary = RotaryEmbedding(D, hp.rope_base)
        self.ltis = LTIS(D, Hkv, hp.cmp_block_len, hp.cmp_stride, hp.slc_block_size, hp.n_slc_blocks,
                         hp.attn_dropout_prob, hp.ltis_chunk_size, hp.blossom_impl, hp.ltis_trainable_compression)
        self.stis = STIS(hp.stis_window, hp.stis_sink, hp.attn_dropout_prob, hp.blossom_impl)
        self.gate = BranchGate(hp.hidden_size, H, hp.gate_bias_ltis, hp.gate_bias_stis)
        self.dense = nn.Linear(H * D, hp.hidden_size)
        self.LayerNorm = nn.LayerNorm(hp.hidden_size, eps=hp.layer_norm_eps)
        self.out_dropout = nn.Dropout(hp.hidden_dropout_prob)

    def reset_parameters(self, initializer_range=0.02):
        """Initialise what RecBole's ``_init_weights`` does not know about (gate biases, LTIS extras)."""
        self.gate.reset_parameters()
        self.ltis.reset_parameters(initializer_range)

    def heads(self, x):
        """``(B, L, H * D)`` -> ``(B, H, L, D)``."""
        B, L, _ = x.shape
        return x.view(B, L, -1, self.hp.head_dim).transpose(1, 2)

    def forward(self, input_tensor, item_seq_len=None):
        q = self.heads(self.query(input_tensor))
        k = self.heads(self.key(input_tensor))
        v = self.heads(self.value(input_tensor))
        q_rot, k_rot = self.rotary(q, k)
        ltis = self.ltis(q_rot, k_rot, v, item_seq_len, q_score=q, k_score=k)
        stis = self.stis(q_rot, k_rot, v, item_seq_len)
        g_ltis, g_stis = self.gate(input_tensor)
        context = (g_ltis * ltis + g_stis * stis).transpose(1, 2).flatten(2)  # (B, L, H * D)
        hidden_states = self.out_dropout(self.dense(context))
        return self.LayerNorm(hidden_states + input_tensor)
