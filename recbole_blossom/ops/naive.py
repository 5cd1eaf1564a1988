"""Pure PyTorch reference of Blossom's two attention primitives (the CPU path, and what the Triton kernels
in :mod:`recbole_blossom.ops.parallel` are tested against). Same signatures as there.

* :func:`select_blocks` -- LTIS block selection: score compressed blocks, pool over the query heads of a
  kv head, map to selection blocks, keep the top ``n_select`` past blocks plus the query's own block.
* :func:`gathered_attention` -- attention of each query over the keys its *slots* name: slot ``j`` of
  query ``t`` names the ``block`` consecutive positions ``idx[..., t, j] * block + 0..block-1`` (``-1``:
  empty slot), causally (``key <= t``). LTIS calls it with its selected blocks.
* :func:`stis_attention` -- STIS: each query attends to fixed relative offsets (the ``window`` most recent
  positions, power-of-two distances, a sink): :func:`gathered_attention` over single-position slots.
* :func:`rotary` -- RoPE of queries and keys (half-split layout), the layer's glue before both branches.
* :func:`gate_combine` -- the gated sum of the two branches in the layout of the output projection.
* :func:`compress_blocks` -- LTIS's compression MLP over overlapping key blocks (:func:`mean_blocks`: the mean
  instead, a variant).
"""

import functools
import math

import torch
import torch.nn.functional as F


def zero_padding_rows(out, lengths):
    """Zero the rows of ``out`` ``(B, H, L, D)`` at positions ``>= lengths`` ``(B,)``; no-op for None."""
    if lengths is None:
        return out
    keep = torch.arange(out.shape[2], device=out.device)[None, :] < lengths[:, None]
    return out * keep[:, None, :, None].to(out.dtype)


def num_blocks(length, block):
    return -(-length // block)


def with_memory_slot(memory, x):
    """Prepend the learned memory slot ``(Hkv, D)`` to compressed keys or values ``(B, Hkv, Nc, D)``."""
    B, Hkv, _, D = x.shape
    return torch.cat((memory.to(x.dtype)[None, :, None, :].expand(B, Hkv, 1, D), x), dim=2)


def compressed_visibility(t, n_cmp, block_len, stride):
    """``(len(t), Nc)`` bool: compressed block ``i`` (keys ``[i*stride, i*stride + block_len)``) lies wholly
    at or before query position ``t``."""
    cmp_end = torch.arange(n_cmp, device=t.device) * stride + block_len - 1  # last key of each block
    return cmp_end[None, :] <= t[:, None]


def overlap_matrix(n_cmp, n_slc, block_len, stride, select_size, device=None):
    """``(Nc, n_slc)`` 0/1 float: compressed block ``i`` overlaps selection block ``j``."""
    start = torch.arange(n_cmp, device=device) * stride
    slc = torch.arange(n_slc, device=device) * select_size
    return ((start[:, None] < slc[None, :] + select_size) & (slc[None, :] < start[:, None] + block_len)).float()


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


def selection_scores(q, k_cmp, mem_key, t, block_len, stride, select_size, n_slc, scale):
    """Selection-block scores of queries at positions ``t``.

    q: ``(B, H, C, D)`` queries at positions ``t`` ``(C,)``; k_cmp: ``(B, Hkv, Nc, D)``; mem_key ``(Hkv, D)``.
    Each query's softmax runs over the memory slot and the compressed blocks wholly in its past; the
    probabilities are averaged over the query heads of a kv head. A selection block scores the **mean** of
    the probabilities of the visible compressed blocks overlapping it (0 if none is visible yet). The mean,
    not the sum, is the fairness rule: with overlapping compressed blocks (length 32, stride 16) block 0 and
    the block just before the query's own have one visible overlapping block where every other block has
    two, so a sum would almost never pick them (measured in ``docs/models.md``).
    Returns ``(B, Hkv, C, n_slc)`` float32.
    """
    B, H, C, D = q.shape
    Hkv, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    qg = q.float().view(B, Hkv, H // Hkv, C, D)
    scores = torch.einsum("bhgld,bhnd->bhgln", qg, with_memory_slot(mem_key, k_cmp).float()) * scale
    visible = compressed_visibility(t, n_cmp, block_len, stride)  # (C, Nc)
    visible = torch.cat((torch.ones_like(visible[:, :1]), visible), dim=1)  # the memory slot: always
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)[..., 1:].mean(dim=2)  # (B,Hkv,C,Nc)
    overlap = overlap_matrix(n_cmp, n_slc, block_len, stride, select_size, q.device)
    count = visible[:, 1:].float() @ overlap  # (C, n_slc) visible compressed blocks per selection block
    return (probs @ overlap) / count.clamp_min(1.0)


def select_blocks(q, k_cmp, mem_key, block_len, stride, select_size, n_select, chunk_size=1024, scale=None,
                  pool="probs"):
    """Pick the selection blocks every query attends to (no autograd).

    Args:
        q: ``(B, H, L, D)`` queries; k_cmp: ``(B, Hkv, Nc, D)`` compressed keys; mem_key: ``(Hkv, D)``.
        chunk_size: queries scored at once (bounds the ``chunk x Nc`` score memory).
        pool: how the query heads of a kv head share one choice: ``probs``, the mean of each head's
            probabilities; ``logits``, one softmax of the mean score, i.e. of the group-mean query (the mean
            over a group of ``q_g . k`` is ``(mean_g q_g) . k``).
    Returns:
        ``(B, Hkv, L, n_select + 1)`` int32 block numbers, ``-1`` for an empty slot: the best ``n_select``
        selection blocks strictly before the query's own block (all of them while there are at most
        ``n_select``), then the query's own block.
    """
    B, H, L, D = q.shape
    Hkv = k_cmp.shape[1]
    if pool == "logits":
        q = q.reshape(B, Hkv, H // Hkv, L, D).mean(2)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    n_slc = num_blocks(L, select_size)
    own = torch.arange(L, device=q.device) // select_size
    n_top = min(n_select, n_slc)
    idx = torch.full((B, Hkv, L, n_select + 1), -1, dtype=torch.int32, device=q.device)
    with torch.no_grad():
        for s in range(0, L, chunk_size):
            e = min(L, s + chunk_size)
            t = torch.arange(s, e, device=q.device)
            scores = selection_scores(q[:, :, s:e], k_cmp, mem_key, t, block_len, stride, select_size, n_slc,
                                      scale)
            candidate = torch.arange(n_slc, device=q.device)[None, :] < own[s:e, None]  # strictly past blocks
            top_scores, top_idx = top_n(scores.masked_fill(~candidate, float("-inf")), n_top)
            idx[:, :, s:e, :n_top] = torch.where(top_scores > float("-inf"), top_idx, -1).to(torch.int32)
    idx[..., -1] = own.to(torch.int32)
    return idx


def causal_attention(q, k, v, lengths=None, dropout_p=0.0, training=False, scale=None):
    """Plain causal attention (fused), kv heads shared by groups of query heads; rows ``>= lengths`` zero."""
    G = q.shape[1] // k.shape[1]
    if G > 1 and q.dtype not in (torch.float16, torch.bfloat16):
        # SDPA's grouped kv heads (enable_gqa) have a fused kernel only in flash attention (half precision); in
        # float32 they fall back to the math kernel, which stores L x L weights (pytorch/pytorch#181528; 1.44x
        # SASRec-SDPA's memory at L = 50 in fp32, docs/efficiency.md). Copies of k, v keep a fused kernel.
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p if training else 0.0, is_causal=True,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return zero_padding_rows(out, lengths)


def slot_mask(idx, block, length):
    """Dense form of slots: ``(B, Hkv, L, L)`` bool, key ``s`` attended by query ``t`` (causal)."""
    B, Hkv, L, S = idx.shape
    n_blk = num_blocks(length, block)
    chosen = torch.zeros(B, Hkv, L, n_blk + 1, dtype=torch.bool, device=idx.device)
    chosen.scatter_(-1, torch.where(idx >= 0, idx, n_blk).long(), True)  # empty slots land in a spare column
    allowed = chosen[..., :n_blk].repeat_interleave(block, dim=-1)[..., :length]
    return allowed & torch.ones(length, length, dtype=torch.bool, device=idx.device).tril()


def slot_keys(idx, block, length):
    """Key positions of slots: slot ``j`` of query ``t`` names positions ``idx[..., t, j] * block + 0..block-1``
    (``-1``: empty). ``idx (B, Hkv, L, S)`` -> ``index, valid``, both ``(B, Hkv, L, S * block)``; a key is valid
    when its slot is and it lies at or before the query (``index`` is clamped into ``[0, length)``)."""
    pos = (idx.long().clamp_min(0)[..., None] * block + torch.arange(block, device=idx.device)).flatten(-2)
    t = torch.arange(length, device=idx.device).view(length, 1)
    valid = (idx >= 0).repeat_interleave(block, dim=-1) & (pos <= t)
    return pos.clamp_max(length - 1), valid


def gathered_attention(q, k, v, idx, block, lengths=None, dropout_p=0.0, training=False, scale=None,
                       dense_max_len=256):
    """Attention of every query over the keys its slots name, causally.

    Args:
        q: ``(B, H, L, D)``; k, v: ``(B, Hkv, L, D)``; idx: int ``(B|1, Hkv|1, L, S)`` slot numbers or ``-1``;
        block: positions per slot; lengths: ``(B,)`` or None.
        dense_max_len: up to this length the slots are applied as a dense mask to fused attention (cheaper
        there); above it the slot keys are gathered (memory linear in ``L``). Both give the same function.
    Returns:
        ``(B, H, L, D)``; rows at positions ``>= lengths`` are zero. A query whose slots name no key gets 0.
    """
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    idx = idx.expand(B, Hkv, L, idx.shape[-1])
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    p = dropout_p if training else 0.0
    if L <= dense_max_len:
        mask = slot_mask(idx, block, L)
        mask = mask[:, :, None].expand(B, Hkv, G, L, L).reshape(B, H, L, L)
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1),
                                             attn_mask=mask, dropout_p=p, scale=scale)
        return zero_padding_rows(out, lengths)
    S = idx.shape[-1]
    n_blk = num_blocks(L, block)
    pad = n_blk * block - L
    k_blk = F.pad(k, (0, 0, 0, pad)).view(B, Hkv, n_blk, block, D)
    v_blk = F.pad(v, (0, 0, 0, pad)).view(B, Hkv, n_blk, block, D)
    slots = idx.long().clamp_min(0)
    gather = slots.reshape(B, Hkv, L * S)[..., None, None].expand(B, Hkv, L * S, block, D)
    k_sel = torch.gather(k_blk, 2, gather).view(B, Hkv, L, S * block, D)
    v_sel = torch.gather(v_blk, 2, gather).view(B, Hkv, L, S * block, D)
    _, allowed = slot_keys(idx, block, L)  # (B, Hkv, L, S * block)
    qg = q.view(B, Hkv, G, L, D).transpose(2, 3)  # (B, Hkv, L, G, D)
    scores = (qg @ k_sel.transpose(-1, -2)) * scale  # (B, Hkv, L, G, S * block)
    scores = scores.masked_fill(~allowed[:, :, :, None], float("-inf"))
    probs = scores.float().softmax(dim=-1).nan_to_num(0.0).to(q.dtype)  # a query with no key: 0
    if p > 0.0:
        probs = F.dropout(probs, p=p)
    out = (probs @ v_sel).transpose(2, 3).reshape(B, H, L, D)
    return zero_padding_rows(out, lengths)


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


@functools.lru_cache(maxsize=64)
def cached_stis_slots(length, window, sink, device):
    return stis_slots(length, window, sink, device)


def stis_attention(q, k, v, window, sink, lengths=None, dropout_p=0.0, training=False, scale=None):
    """STIS: ``q`` ``(B, H, L, D)`` attends causally to the keys of ``k, v`` ``(B, Hkv, L, D)`` at the offsets of
    :func:`stis_offsets` (and position 0 when ``sink``), each once. Returns ``(B, H, L, D)``, padding rows 0."""
    slots = cached_stis_slots(q.shape[2], window, bool(sink), str(q.device))
    return gathered_attention(q, k, v, slots, 1, lengths, dropout_p, training, scale)


def apply_rotary(x, cos, sin):
    """Rotate ``x`` of shape ``(..., L, D)`` by position (half-split layout); ``cos, sin``: ``(L, D // 2)``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rotary(q, k, cos, sin):
    """RoPE of ``q`` ``(B, H, L, D)`` and ``k`` ``(B, Hkv, L, D)`` with angles ``cos, sin`` ``(L, D // 2)``:
    ``x1 cos - x2 sin, x1 sin + x2 cos`` of the halves ``x1, x2`` of each row. Returns the rotated pair."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def gate_combine(logits, ltis, stis):
    """``sigmoid(logits)``-gated sum of the branches. ``logits`` ``(B, L, 2H)`` (LTIS gates, then STIS gates);
    ``ltis, stis`` ``(B, H, L, D)``. Returns ``(B, L, H * D)``: ``g_ltis * ltis + g_stis * stis`` per head."""
    H = ltis.shape[1]
    g = torch.sigmoid(logits).transpose(1, 2).unsqueeze(-1)  # (B, 2H, L, 1)
    return (g[:, :H] * ltis + g[:, H:] * stis).transpose(1, 2).flatten(2)


def branch_attention(q, k, v, idx, block, window, sink, logits, lengths=None, dropout_p=0.0, training=False,
                     scale=None):
    """Blossom's attention before its output projection: :func:`gate_combine` of LTIS (:func:`gathered_attention`
    over the selected blocks ``idx`` of ``block`` keys, or :func:`causal_attention` when ``idx`` is None: every
    block selected) and STIS (:func:`stis_attention`). ``q`` ``(B, H, L, D)``, ``k, v`` ``(B, Hkv, L, D)``,
    ``logits`` ``(B, L, 2H)``. Returns ``(B, L, H * D)``."""
    ltis = (causal_attention(q, k, v, lengths, dropout_p, training, scale) if idx is None else
            gathered_attention(q, k, v, idx, block, lengths, dropout_p, training, scale))
    return gate_combine(logits, ltis, stis_attention(q, k, v, window, sink, lengths, dropout_p, training, scale))


def num_compressed_blocks(length, block_len, stride):
    """Number of compression blocks that fit in ``length`` keys."""
    return 0 if length < block_len else (length - block_len) // stride + 1


def mean_blocks(k, block_len, stride):
    """LTIS compression without parameters (the ``ltis_compression: mean`` variant): ``k`` ``(B, Hkv, L, D)`` ->
    ``(B, Hkv, Nc, D)``, block ``i`` the mean of keys ``[i * stride, i * stride + block_len)``. A query's score of a
    block is then the mean of its scores of the block's keys, which the attention itself trains."""
    B, Hkv, L, D = k.shape
    n_cmp = num_compressed_blocks(L, block_len, stride)
    if n_cmp == 0:
        return k.new_zeros(B, Hkv, 0, D)
    return k[:, :, : (n_cmp - 1) * stride + block_len].unfold(2, block_len, stride).mean(-1)


def compress_blocks(k, pos, w1, b1, w2, b2, block_len, stride):
    """LTIS block compression: ``k`` ``(B, Hkv, L, D)`` -> ``(B, Hkv, Nc, D)``. Block ``i`` is keys
    ``[i * stride, i * stride + block_len)`` plus the intra-block positions ``pos`` ``(block_len, D)``, flattened
    (position-major) and put through ``Linear(w1, b1)`` ``(2D, block_len * D)``, GELU, ``Linear(w2, b2)``
    ``(D, 2D)``. ``Nc = (L - block_len) // stride + 1`` (0 when ``L < block_len``)."""
    B, Hkv, L, D = k.shape
    n_cmp = num_compressed_blocks(L, block_len, stride)
    if n_cmp == 0:
        return k.new_zeros(B, Hkv, 0, D)
    windows = k[:, :, : (n_cmp - 1) * stride + block_len].unfold(2, block_len, stride)
    windows = windows.transpose(-1, -2) + pos.to(k.dtype)  # (B, Hkv, Nc, block_len, D)
    return F.linear(F.gelu(F.linear(windows.flatten(-2), w1, b1)), w2, b2)
