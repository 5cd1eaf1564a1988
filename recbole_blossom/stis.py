"""STIS: short-term interest selection.

Query ``t`` attends causally to a fixed, sparse set of keys: the ``window`` most recent positions
(``t, t-1, ..., t-window+1``), the positions at power-of-two distances (``t-1, t-2, t-4, ...``) and a sink
position (``0``). The keys sit at fixed relative offsets, so they are gathered, never masked out of an
``L x L`` matrix: cost and memory are ``O(L * (window + log2 L))``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_blossom.fast import fast_stis_attention, use_fast


def stis_offsets(length, window):
    """Distinct relative offsets ``t - s`` a query may look back: ``{0..window-1} U {1, 2, 4, ...} < length``."""
    offsets = set(range(min(window, length)))
    power = 1
    while power < length:
        offsets.add(power)
        power *= 2
    return sorted(offsets)


def stis_key_index(length, window, sink=True, device=None):
    """Key positions of every query: ``index, valid``, both ``(L, M)``; ``M = |offsets| + sink``."""
    pos = torch.arange(length, device=device)
    offsets = torch.tensor(stis_offsets(length, window), device=device, dtype=torch.long)
    index = pos[:, None] - offsets[None, :]
    valid = index >= 0
    if sink:
        # position 0 joins unless an offset already reaches it (t itself is one of the offsets)
        sink_valid = ~(index == 0).any(dim=1, keepdim=True)
        index = torch.cat((index, torch.zeros_like(pos)[:, None]), dim=1)
        valid = torch.cat((valid, sink_valid), dim=1)
    return index.clamp_min(0), valid


def zero_padding_rows(out, lengths):
    """Zero the rows of ``out`` ``(B, H, L, D)`` at positions ``>= lengths`` ``(B,)``; no-op for None."""
    if lengths is None:
        return out
    keep = torch.arange(out.shape[2], device=out.device)[None, :] < lengths[:, None]
    return out * keep[:, None, :, None].to(out.dtype)


def stis_attention(q, k, v, lengths=None, window=8, sink=True, dropout_p=0.0, training=False, scale=None):
    """Short-term sparse causal attention.

    Args:
        q: ``(B, H, L, D)`` queries; k, v: ``(B, Hkv, L, D)`` keys and values, ``H`` a multiple of ``Hkv``.
        lengths: ``(B,)`` valid lengths (items left-aligned, padding at the end) or None.
    Returns:
        ``(B, H, L, D)``; rows at positions ``>= lengths`` are zero.
    """
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    index, valid = stis_key_index(L, window, sink, device=q.device)  # (L, M)
    k_sel = k[:, :, index]  # (B, Hkv, L, M, D)
    v_sel = v[:, :, index]
    qg = q.view(B, Hkv, H // Hkv, L, D).transpose(2, 3)  # (B, Hkv, L, G, D)
    scores = (qg @ k_sel.transpose(-1, -2)) * scale  # (B, Hkv, L, G, M)
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    if dropout_p > 0.0 and training:
        probs = F.dropout(probs, p=dropout_p)
    out = (probs @ v_sel).transpose(2, 3).reshape(B, H, L, D)
    return zero_padding_rows(out, lengths)


class STIS(nn.Module):
    """Short-term interest selection branch (no parameters); see :func:`stis_attention`."""

    def __init__(self, window=8, sink=True, dropout_p=0.0, impl="auto"):
        super().__init__()
        self.window, self.sink, self.dropout_p, self.impl = window, sink, dropout_p, impl

    def forward(self, q, k, v, lengths=None):
        attend = fast_stis_attention if use_fast(self.impl, q) else stis_attention
        return attend(q, k, v, lengths, self.window, self.sink, self.dropout_p, self.training)

    def extra_repr(self):
        return f"window={self.window}, sink={self.sink}, impl={self.impl}"
