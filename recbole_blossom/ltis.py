"""LTIS: long-term interest selection.

1. *Compression*: keys are cut into overlapping blocks (``block_len`` long, every ``stride``); an MLP
   turns each block (plus learned intra-block positions) into one compressed key. One learned memory key
   is always visible.
2. *Scoring*: each query scores the compressed blocks that lie wholly in its past (softmax with the memory
   key), the probabilities are averaged over the query heads that share a kv head, and each selection
   block (``select_size`` long) sums the probabilities of the compressed blocks that overlap it.
3. *Selection*: among the selection blocks strictly before the query's own block, the ``n_select`` best
   are kept (all of them when there are fewer); the query then attends exactly to the tokens of those
   blocks plus its own block, causally.

Scoring only picks blocks, so (as in the authors' code) no gradient reaches the compression MLP or the
memory key: :func:`select_blocks` runs without autograd, in query chunks so that its ``L x L / stride``
scores never exist at once. The opt-in variant ``trainable_compression`` (see :class:`LTIS`) adds
:func:`compressed_attention` to the output so that they train.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_blossom.fast import fast_selected_block_attention, use_fast
from recbole_blossom.stis import zero_padding_rows


def num_compressed_blocks(length, block_len, stride):
    """Number of compression blocks that fit in ``length`` keys."""
    return 0 if length < block_len else (length - block_len) // stride + 1


def overlap_matrix(n_cmp, n_slc, block_len, stride, select_size, device=None):
    """``(n_cmp, n_slc)`` 0/1 matrix: compressed block ``i`` overlaps selection block ``j``."""
    start = torch.arange(n_cmp, device=device) * stride
    slc = torch.arange(n_slc, device=device) * select_size
    return ((start[:, None] < slc[None, :] + select_size) & (slc[None, :] < start[:, None] + block_len)).float()


def with_memory_slot(memory, x):
    """Prepend the learned memory slot ``(Hkv, D)`` to compressed keys or values ``(B, Hkv, Nc, D)``."""
    B, Hkv, _, D = x.shape
    return torch.cat((memory.to(x.dtype)[None, :, None, :].expand(B, Hkv, 1, D), x), dim=2)


def compressed_visibility(t, n_cmp, block_len, stride):
    """``(len(t), 1 + Nc)`` bool: for queries at positions ``t``, the memory slot (always) and each
    compressed block that ends at or before the query."""
    cmp_end = torch.arange(n_cmp, device=t.device) * stride + block_len - 1  # last key of each block
    memory = torch.ones(len(t), 1, dtype=torch.bool, device=t.device)
    return torch.cat((memory, cmp_end[None, :] <= t[:, None]), dim=1)


def select_blocks(q, k_cmp, mem_key, block_len, stride, select_size, n_select, chunk_size=1024, scale=None):
    """Pick the selection blocks every query attends to.

    Args:
        q: ``(B, H, L, D)`` queries; k_cmp: ``(B, Hkv, Nc, D)`` compressed keys; mem_key: ``(Hkv, D)``.
    Returns:
        ``blocks`` ``(B, Hkv, L, n_select + 1)`` long and ``valid`` of the same shape (bool); the last
        column is the query's own block, always valid.
    """
    B, H, L, D = q.shape
    Hkv, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    n_slc = -(-L // select_size)
    own = torch.arange(L, device=q.device) // select_size  # (L,)
    overlap = overlap_matrix(n_cmp, n_slc, block_len, stride, select_size, q.device)
    n_top = min(n_select, n_slc)
    blocks = torch.empty(B, Hkv, L, n_top, dtype=torch.long, device=q.device)
    valid = torch.empty(B, Hkv, L, n_top, dtype=torch.bool, device=q.device)
    with torch.no_grad():
        kc = with_memory_slot(mem_key, k_cmp).float()
        for s in range(0, L, chunk_size):
            e = min(L, s + chunk_size)
            qc = q[:, :, s:e].float().view(B, Hkv, G, e - s, D)
            scores = torch.einsum("bhgld,bhnd->bhgln", qc, kc) * scale  # (B, Hkv, G, C, 1 + Nc)
            visible = compressed_visibility(torch.arange(s, e, device=q.device), n_cmp, block_len, stride)
            probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)[..., 1:].mean(dim=2)
            slc_scores = probs @ overlap  # (B, Hkv, C, n_slc)
            candidate = torch.arange(n_slc, device=q.device)[None, :] < own[s:e, None]  # strictly past blocks
            slc_scores = slc_scores.masked_fill(~candidate, float("-inf"))
            top_scores, top_idx = top_n(slc_scores, n_top)
            blocks[:, :, s:e] = top_idx
            valid[:, :, s:e] = top_scores > float("-inf")
    own_blocks = own.view(1, 1, L, 1).expand(B, Hkv, L, 1)
    blocks = torch.cat((blocks, own_blocks), dim=-1)
    valid = torch.cat((valid, torch.ones_like(own_blocks, dtype=torch.bool)), dim=-1)
    return blocks, valid


def top_n(scores, n):
    """``scores.topk(n, dim=-1)`` (best first); for small ``n`` by repeated max, much faster on CUDA than
    ``topk`` over many short rows. ``scores`` is overwritten."""
    if n > 8:
        return scores.topk(n, dim=-1)
    values, index = [], []
    for _ in range(n):
        value, i = scores.max(dim=-1, keepdim=True)
        values.append(value)
        index.append(i)
        scores.scatter_(-1, i, float("-inf"))
    return torch.cat(values, -1), torch.cat(index, -1)


def causal_attention(q, k, v, lengths=None, dropout_p=0.0, training=False, scale=None):
    """Plain causal attention (fused), kv heads shared by groups of query heads; rows ``>= lengths`` zero."""
    G = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1),
                                         dropout_p=dropout_p if training else 0.0, is_causal=True, scale=scale)
    return zero_padding_rows(out, lengths)


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
    qg = q.view(B, Hkv, G, L, D)
    scores = torch.einsum("bhgld,bhnd->bhgln", qg, keys) * scale
    probs = scores.masked_fill(~visible, float("-inf")).float().softmax(dim=-1).to(q.dtype)
    out = torch.einsum("bhgln,bhnd->bhgld", probs, values).reshape(B, H, L, D)
    return zero_padding_rows(out, lengths)


def selected_token_mask(blocks, valid, length, select_size):
    """Dense form of a selection: ``(B, Hkv, L, L)`` bool, key ``s`` allowed for query ``t``."""
    B, Hkv, L, S = blocks.shape
    n_slc = -(-length // select_size)
    chosen = torch.zeros(B, Hkv, L, n_slc + 1, dtype=torch.bool, device=blocks.device)
    chosen.scatter_(-1, torch.where(valid, blocks, n_slc), True)  # invalid slots land in a spare column
    allowed = chosen[..., :n_slc].repeat_interleave(select_size, dim=-1)[..., :length]
    return allowed & torch.ones(length, length, dtype=torch.bool, device=blocks.device).tril()


def selected_block_attention(q, k, v, blocks, valid, select_size, lengths=None, dropout_p=0.0, training=False,
                             scale=None, dense_max_len=256):
    """Attention of each query over the tokens of its selected blocks, causal.

    Args:
        q: ``(B, H, L, D)``; k, v: ``(B, Hkv, L, D)``; blocks, valid: ``(B, Hkv, L, S)`` from
        :func:`select_blocks`; lengths: ``(B,)`` or None.
        dense_max_len: up to this length the selection is applied as a dense mask (fused attention is
        cheaper there); above it the selected keys are gathered (memory linear in ``L``).
    Returns:
        ``(B, H, L, D)``; rows at positions ``>= lengths`` are zero.
    """
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], blocks.shape[-1]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    p = dropout_p if training else 0.0
    if L <= dense_max_len:
        mask = selected_token_mask(blocks, valid, L, select_size)
        mask = mask[:, :, None].expand(B, Hkv, G, L, L).reshape(B, H, L, L)
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1),
                                             attn_mask=mask, dropout_p=p, scale=scale)
    else:
        n_slc = -(-L // select_size)
        pad = n_slc * select_size - L
        k_blk = F.pad(k, (0, 0, 0, pad)).view(B, Hkv, n_slc, select_size, D)
        v_blk = F.pad(v, (0, 0, 0, pad)).view(B, Hkv, n_slc, select_size, D)
        gather = blocks.reshape(B, Hkv, L * S)[..., None, None].expand(B, Hkv, L * S, select_size, D)
        k_sel = torch.gather(k_blk, 2, gather).view(B, Hkv, L, S * select_size, D)
        v_sel = torch.gather(v_blk, 2, gather).view(B, Hkv, L, S * select_size, D)
        pos = (blocks[..., None] * select_size + torch.arange(select_size, device=q.device)).flatten(-2)
        t = torch.arange(L, device=q.device).view(1, 1, L, 1)
        allowed = valid.repeat_interleave(select_size, dim=-1) & (pos <= t)  # (B, Hkv, L, S * select_size)
        qg = q.view(B, Hkv, G, L, D).transpose(2, 3)  # (B, Hkv, L, G, D)
        scores = (qg @ k_sel.transpose(-1, -2)) * scale  # (B, Hkv, L, G, S * select_size)
        scores = scores.masked_fill(~allowed[:, :, :, None], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        if p > 0.0:
            probs = F.dropout(probs, p=p)
        out = (probs @ v_sel).transpose(2, 3).reshape(B, H, L, D)
    return zero_padding_rows(out, lengths)


class BlockCompressor(nn.Module):
    """Compression MLP: ``(B, Hkv, L, D)`` keys -> ``(B, Hkv, Nc, D)`` compressed keys."""

    def __init__(self, head_dim, block_len, stride):
        super().__init__()
        self.block_len, self.stride = block_len, stride
        self.intra_block_pos = nn.Parameter(torch.zeros(block_len, head_dim))
        self.mlp = nn.Sequential(
            nn.Linear(block_len * head_dim, 2 * head_dim), nn.GELU(), nn.Linear(2 * head_dim, head_dim)
        )

    def forward(self, k):
        B, Hkv, L, D = k.shape
        n_cmp = num_compressed_blocks(L, self.block_len, self.stride)
        if n_cmp == 0:
            return k.new_zeros(B, Hkv, 0, D)
        windows = k[:, :, : (n_cmp - 1) * self.stride + self.block_len].unfold(2, self.block_len, self.stride)
        windows = windows.transpose(-1, -2) + self.intra_block_pos.to(k.dtype)  # (B, Hkv, Nc, block_len, D)
        return self.mlp(windows.flatten(-2))


class LTIS(nn.Module):
    """Long-term interest selection branch: block compression, top-n block selection, sparse attention.

    ``trainable_compression=False`` (default, the authors' behaviour): the compressed keys only pick blocks
    and the compression parameters are frozen. ``True`` (a variant, not in the paper): values are
    compressed too and the output adds :func:`compressed_attention` over the compressed blocks, which
    trains the compression MLPs and the memory slot; selection still uses the (detached) compressed keys.
    """

    def __init__(self, head_dim, n_kv_heads, block_len=32, stride=16, select_size=16, n_select=4,
                 dropout_p=0.0, chunk_size=1024, impl="auto", trainable_compression=False):
        super().__init__()
        self.block_len, self.stride, self.select_size, self.n_select = block_len, stride, select_size, n_select
        self.dropout_p, self.chunk_size, self.impl = dropout_p, chunk_size, impl
        self.trainable_compression = trainable_compression
        self.compressor = BlockCompressor(head_dim, block_len, stride)
        self.memory_key = nn.Parameter(torch.zeros(n_kv_heads, head_dim))
        if trainable_compression:
            self.value_compressor = BlockCompressor(head_dim, block_len, stride)
            self.memory_value = nn.Parameter(torch.zeros(n_kv_heads, head_dim))
        self.reset_parameters()
        if not trainable_compression:
            for p in self.parameters():  # scores only pick blocks: nothing here gets a gradient
                p.requires_grad_(False)

    def reset_parameters(self, std=0.02):
        nn.init.normal_(self.compressor.intra_block_pos, std=std)
        nn.init.normal_(self.memory_key, std=std)
        if self.trainable_compression:
            nn.init.normal_(self.value_compressor.intra_block_pos, std=std)
            nn.init.normal_(self.memory_value, std=std)

    def forward(self, q, k, v, lengths=None, q_score=None, k_score=None):
        """``q`` ``(B, H, L, D)``, ``k, v`` ``(B, Hkv, L, D)``; blocks are scored with ``q_score, k_score``
        (default ``q, k``). Returns ``(B, H, L, D)``."""
        q_score = q if q_score is None else q_score
        k_score = k if k_score is None else k_score
        if not self.trainable_compression:
            return self._select_and_attend(q, k, v, lengths, q_score, k_score)
        k_cmp = self.compressor(k_score)
        cmp_out = compressed_attention(q_score, k_cmp, self.value_compressor(v), self.memory_key, self.memory_value,
                                       self.block_len, self.stride, lengths)
        return self._select_and_attend(q, k, v, lengths, q_score, k_score, k_cmp.detach()) + cmp_out

    def _select_and_attend(self, q, k, v, lengths, q_score, k_score, k_cmp=None):
        """Block selection and attention over the selected tokens; ``k_cmp`` is computed (frozen) if None."""
        if -(-q.shape[2] // self.select_size) - 1 <= self.n_select:
            # every query selects all of its past blocks whatever the scores: LTIS is causal attention
            return causal_attention(q, k, v, lengths, self.dropout_p, self.training)
        if k_cmp is None:
            with torch.no_grad():
                k_cmp = self.compressor(k_score.detach())
        blocks, valid = select_blocks(q_score.detach(), k_cmp, self.memory_key, self.block_len, self.stride,
                                      self.select_size, self.n_select, self.chunk_size)
        attend = fast_selected_block_attention if use_fast(self.impl, q) else selected_block_attention
        return attend(q, k, v, blocks, valid, self.select_size, lengths, self.dropout_p, self.training)

    def extra_repr(self):
        return (f"block_len={self.block_len}, stride={self.stride}, select_size={self.select_size}, "
                f"n_select={self.n_select}, impl={self.impl}, trainable_compression={self.trainable_compression}")
