"""LTIS: long-term interest selection.

1. *Compression*: keys are cut into overlapping blocks (``block_len`` long, every ``stride``); an MLP
   turns each block (plus learned intra-block positions) into one compressed key. One learned memory key
   is always visible.
2. *Scoring and selection* (:func:`recbole_blossom.ops.select_blocks`): each query scores the compressed
   blocks wholly in its past, the scores are pooled over the query heads of a kv head (``score_pool``:
   ``logits``, the mean score before one softmax, or ``probs``, the mean of each head's probabilities), each
   selection block gets the mean of its visible overlapping compressed blocks, and the ``n_select`` best
   past selection blocks are kept, plus the query's own block.
3. *Attention* (:func:`recbole_blossom.ops.gathered_attention`): the query attends exactly to the tokens
   of its selected blocks, causally.

Scoring only picks blocks, so (as in the authors' code) no gradient reaches the compression MLP or the
memory key; they are frozen. Two opt-in variants (not in the paper): ``trainable_compression`` adds
:func:`compressed_attention` to the output so that they train; ``compression="mean"`` compresses a block to the
mean of its keys (no MLP), so a query's block score is its mean score over the block's keys, which attention
itself trains (frozen random MLP keys carry little of what the query looks for: docs/long_histories.md).
"""

import math

import torch
from torch import nn

from recbole_blossom.ops import (causal_attention, compress_blocks, gathered_attention, mean_blocks, select_blocks,
                                 zero_padding_rows)
from recbole_blossom.hparams import LTIS_COMPRESSIONS as COMPRESSIONS
from recbole_blossom.ops.naive import compressed_visibility, with_memory_slot


def compressed_attention(q, k_cmp, v_cmp, mem_key, mem_value, block_len, stride, lengths=None, scale=None):
    """Attention of each query over the compressed blocks wholly in its past plus the memory slot.

    Only used by the trainable-compression variant (it is what gives the compression MLPs a gradient).
    q: ``(B, H, L, D)``; k_cmp, v_cmp: ``(B, Hkv, Nc, D)``; mem_key, mem_value: ``(Hkv, D)``.
    Returns ``(B, H, L, D)``; costs ``O(L * Nc)`` memory under autograd.
    """
    B, H, L, D = q.shape
    Hkv, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    keys, values = with_memory_slot(mem_key, k_cmp), with_memory_slot(mem_value, v_cmp)
    visible = compressed_visibility(torch.arange(L, device=q.device), n_cmp, block_len, stride)
    visible = torch.cat((torch.ones_like(visible[:, :1]), visible), dim=1)  # the memory slot: always
    qg = q.view(B, Hkv, G, L, D)
    scores = torch.einsum("bhgld,bhnd->bhgln", qg, keys) * scale
    probs = scores.masked_fill(~visible, float("-inf")).float().softmax(dim=-1).to(q.dtype)
    out = torch.einsum("bhgln,bhnd->bhgld", probs, values).reshape(B, H, L, D)
    return zero_padding_rows(out, lengths)


class BlockCompressor(nn.Module):
    """Compression MLP: ``(B, Hkv, L, D)`` keys -> ``(B, Hkv, Nc, D)`` compressed keys."""

    def __init__(self, head_dim, block_len, stride, impl="auto"):
        super().__init__()
        self.block_len, self.stride, self.impl = block_len, stride, impl
        self.intra_block_pos = nn.Parameter(torch.zeros(block_len, head_dim))
        self.mlp = nn.Sequential(
            nn.Linear(block_len * head_dim, 2 * head_dim), nn.GELU(), nn.Linear(2 * head_dim, head_dim)
        )

    def forward(self, k):
        first, last = self.mlp[0], self.mlp[2]
        return compress_blocks(k, self.intra_block_pos, first.weight, first.bias, last.weight, last.bias,
                               self.block_len, self.stride, impl=self.impl)


class BlockMean(nn.Module):
    """Compression without parameters: ``(B, Hkv, L, D)`` keys -> ``(B, Hkv, Nc, D)`` block means."""

    def __init__(self, block_len, stride):
        super().__init__()
        self.block_len, self.stride = block_len, stride

    def forward(self, k):
        return mean_blocks(k, self.block_len, self.stride)


class LTIS(nn.Module):
    """Long-term interest selection branch: block compression, top-n block selection, sparse attention.

    ``trainable_compression=False`` (default, the authors' behaviour): the compressed keys only pick blocks
    and the compression parameters are frozen. ``True`` (a variant, not in the paper): values are
    compressed too and the output adds :func:`compressed_attention` over the compressed blocks, which
    trains the compression MLPs and the memory slot; selection still uses the (detached) compressed keys.
    ``compression``: ``mlp`` (the paper's) or ``mean`` (a variant: block means of the keys, no parameters; only
    with ``trainable_compression=False``).
    """

    def __init__(self, head_dim, n_kv_heads, *, block_len=32, stride=16, select_size=16, n_select=4,
                 dropout_p=0.0, chunk_size=1024, impl="auto", trainable_compression=False, score_pool="logits",
                 compression="mlp"):
        super().__init__()
        if compression not in COMPRESSIONS or (compression != "mlp" and trainable_compression):
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)} (mean only without "
                             f"trainable_compression), got {compression!r}")
        self.compression = compression
        self.score_pool = score_pool
        self.block_len, self.stride, self.select_size, self.n_select = block_len, stride, select_size, n_select
        self.dropout_p, self.chunk_size, self.impl = dropout_p, chunk_size, impl
        self.trainable_compression = trainable_compression
        self.compressor = (BlockCompressor(head_dim, block_len, stride, impl) if compression == "mlp"
                           else BlockMean(block_len, stride))
        self.memory_key = nn.Parameter(torch.zeros(n_kv_heads, head_dim))
        if trainable_compression:
            self.value_compressor = BlockCompressor(head_dim, block_len, stride, impl)
            self.memory_value = nn.Parameter(torch.zeros(n_kv_heads, head_dim))
        self.reset_parameters()
        if not trainable_compression:
            for p in self.parameters():  # scores only pick blocks: nothing here gets a gradient
                p.requires_grad_(False)

    def reset_parameters(self, std=0.02):
        if self.compression == "mlp":
            nn.init.normal_(self.compressor.intra_block_pos, std=std)
        nn.init.normal_(self.memory_key, std=std)
        if self.trainable_compression:
            nn.init.normal_(self.value_compressor.intra_block_pos, std=std)
            nn.init.normal_(self.memory_value, std=std)

    def selects_all(self, length):
        """True when every query selects all of its past blocks whatever the scores (LTIS = causal)."""
        return -(-length // self.select_size) - 1 <= self.n_select

    def select(self, q_score, k_score, k_cmp=None):
        """``(B, Hkv, L, n_select + 1)`` int32 selected blocks (``-1`` empty); scored with ``q_score`` and the
        compressed ``k_score`` (or the given ``k_cmp``), without autograd."""
        with torch.no_grad():
            if k_cmp is None:
                k_cmp = self.compressor(k_score.detach())
            return select_blocks(q_score.detach(), k_cmp, self.memory_key, self.block_len, self.stride,
                                 self.select_size, self.n_select, self.chunk_size, pool=self.score_pool,
                                 impl=self.impl)

    def selected_blocks(self, q_score, k_score, k_cmp=None):
        """:meth:`select`, or None where every query selects all of its past blocks whatever the scores (LTIS is
        then causal attention and nothing needs scoring)."""
        return None if self.selects_all(q_score.shape[2]) else self.select(q_score, k_score, k_cmp)

    def forward(self, q, k, v, lengths=None, q_score=None, k_score=None):
        """``q`` ``(B, H, L, D)``, ``k, v`` ``(B, Hkv, L, D)``; blocks are scored with ``q_score, k_score``
        (default ``q, k``). Returns ``(B, H, L, D)``, rows at positions ``>= lengths`` zero."""
        q_score = q if q_score is None else q_score
        k_score = k if k_score is None else k_score
        k_cmp, out = None, 0.0
        if self.trainable_compression:
            k_cmp = self.compressor(k_score)
            out = compressed_attention(q_score, k_cmp, self.value_compressor(v), self.memory_key,
                                       self.memory_value, self.block_len, self.stride, lengths)
            k_cmp = k_cmp.detach()
        idx = self.selected_blocks(q_score, k_score, k_cmp)
        if idx is None:
            sparse = causal_attention(q, k, v, lengths, self.dropout_p, self.training)
        else:
            sparse = gathered_attention(q, k, v, idx, self.select_size, lengths, self.dropout_p, self.training,
                                        impl=self.impl)
        return sparse + out if self.trainable_compression else sparse

    def extra_repr(self):
        return (f"block_len={self.block_len}, stride={self.stride}, select_size={self.select_size}, "
                f"n_select={self.n_select}, impl={self.impl}, trainable_compression={self.trainable_compression}, "
                f"compression={self.compression}, "
                f"score_pool={self.score_pool}")
