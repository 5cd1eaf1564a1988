"""STIS: short-term interest selection.

Query ``t`` attends causally to a fixed, sparse set of keys: the ``window`` most recent positions
(``t, t-1, ..., t-window+1``), the positions at power-of-two distances (``t-1, t-2, t-4, ...``) and a sink
position (``0``), each once (:func:`recbole_blossom.ops.stis_attention`): cost and memory
``O(L * (window + log2 L))``. The pattern itself (offsets, slots) lives with the ops.
"""

from torch import nn

from recbole_blossom.ops import stis_attention
from recbole_blossom.ops.naive import cached_stis_slots, stis_key_index, stis_offsets, stis_slots  # noqa: F401


class STIS(nn.Module):
    """Short-term interest selection branch (no parameters).

    ``forward(q, k, v, lengths)``: q ``(B, H, L, D)``, k/v ``(B, Hkv, L, D)``, lengths ``(B,)`` or None ->
    ``(B, H, L, D)``, rows at positions ``>= lengths`` zero.
    """

    def __init__(self, *, window=8, sink=True, dropout_p=0.0, impl="auto"):
        super().__init__()
        self.window, self.sink, self.dropout_p, self.impl = window, sink, dropout_p, impl

    def slots(self, length, device):
        """``(1, 1, L, M)`` int32 single-position slots of every query (for slot-based attentions)."""
        return cached_stis_slots(length, self.window, bool(self.sink), str(device))

    def forward(self, q, k, v, lengths=None):
        return stis_attention(q, k, v, self.window, self.sink, lengths, self.dropout_p, self.training,
                              impl=self.impl)

    def extra_repr(self):
        return f"window={self.window}, sink={self.sink}, impl={self.impl}"
