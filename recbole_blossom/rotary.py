"""Rotary position embedding (RoPE), applied to queries and keys; BlossomRec has no absolute positions."""

import torch
from torch import nn

from recbole_blossom.ops import rotary


def rotary_cos_sin(length, dim, base=10000.0, device=None, dtype=torch.float32):
    """Angles of RoPE. Returns ``cos, sin`` of shape ``(length, dim // 2)``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to ``q`` ``(B, H, L, D)`` and ``k`` ``(B, Hkv, L, D)`` (:func:`recbole_blossom.ops.rotary`:
    one kernel for both on the GPU, rotated tensors contiguous). No parameters. ``enabled=False`` returns ``q, k``
    unchanged (the ``use_rope: False`` ablation: attention then sees no positions but through causality, STIS and
    the blocks)."""

    def __init__(self, head_dim, base=10000.0, impl="auto", enabled=True):
        super().__init__()
        self.impl, self.enabled = impl, enabled
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension (hidden_size / n_heads), got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)
        self._angles = {}  # (L, device) -> (cos, sin): recomputing them costs a handful of launches a layer

    def forward(self, q, k):
        if not self.enabled:
            return q, k
        key = (q.shape[-2], str(q.device))
        if key not in self._angles:
            self._angles[key] = rotary_cos_sin(q.shape[-2], self.head_dim, self.base, device=q.device)
        cos, sin = self._angles[key]
        return rotary(q, k, cos, sin, impl=self.impl)
