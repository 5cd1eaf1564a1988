"""Rotary position embedding (RoPE), applied to queries and keys; BlossomRec has no absolute positions."""

import torch
from torch import nn


def rotary_cos_sin(length, dim, base=10000.0, device=None, dtype=torch.float32):
    """Angles of RoPE. Returns ``cos, sin`` of shape ``(length, dim // 2)``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate ``x`` of shape ``(..., L, D)`` by position (half-split layout); ``cos, sin``: ``(L, D // 2)``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to ``q`` ``(B, H, L, D)`` and ``k`` ``(B, Hkv, L, D)``. No parameters."""

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension (hidden_size / n_heads), got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)
        self._angles = {}  # (L, device) -> (cos, sin): recomputing them costs a handful of launches a layer

    def forward(self, q, k):
        key = (q.shape[-2], str(q.device))
        if key not in self._angles:
            self._angles[key] = rotary_cos_sin(q.shape[-2], self.head_dim, self.base, device=q.device)
        cos, sin = self._angles[key]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
