"""STIS: short-term interest selection.

Query ``t`` attends causally to a fixed, sparse set of keys: the ``window`` most recent positions
(``t, t-1, ..., t-window+1``), the positions at power-of-two distances (``t-1, t-2, t-4, ...``) and a sink
position (``0``), each once. The keys sit at fixed relative offsets, so they are named as single-position
slots of :func:`recbole_blossom.ops.gathered_attention`: cost and memory ``O(L * (window + log2 L))``.
"""

import torch
from torch import nn

from recbole_blossom.ops import gathered_attention


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


def stis_slots(length, window, sink=True, device=None):
    """``(1, 1, L, M)`` int32 single-position slots of every query (``-1``: none), shared by the batch."""
    index, valid = stis_key_index(length, window, sink, device)
    return torch.where(valid, index, -1).to(torch.int32)[None, None]


class STIS(nn.Module):
    """Short-term interest selection branch (no parameters).

    ``forward(q, k, v, lengths)``: q ``(B, H, L, D)``, k/v ``(B, Hkv, L, D)``, lengths ``(B,)`` or None ->
    ``(B, H, L, D)``, rows at positions ``>= lengths`` zero.
    """

    def __init__(self, *, window=8, sink=True, dropout_p=0.0, impl="auto"):
        super().__init__()
        self.window, self.sink, self.dropout_p, self.impl = window, sink, dropout_p, impl
        self._slots = {}  # (L, device) -> slots: the pattern depends on L only

    def slots(self, length, device):
        key = (length, str(device))
        if key not in self._slots:
            self._slots[key] = stis_slots(length, self.window, self.sink, device)
        return self._slots[key]

    def forward(self, q, k, v, lengths=None):
        return gathered_attention(q, k, v, self.slots(q.shape[2], q.device), 1, lengths, self.dropout_p,
                                  self.training, impl=self.impl)

    def extra_repr(self):
        return f"window={self.window}, sink={self.sink}, impl={self.impl}"
