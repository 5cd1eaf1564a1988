"""Fast path of Blossom attention on CUDA: Triton kernels for the two sparse branches.

Both branches are one operation, *gathered attention*: query ``t`` of head ``h`` attends to the keys of a
short per-query list of slots, each slot naming ``block`` consecutive key positions (``slot * block +
0..block-1``), with ``-1`` for an empty slot and the causal rule ``key <= t``:

* LTIS: the slots are the selected blocks (``block = slc_block_size``), one list per ``(b, kv head, t)``;
* STIS: the slots are single positions (``block = 1``), one list per ``t`` shared by the whole batch.

A query never needs more than ``n_slots * block`` keys, so the kernels gather them straight from ``k`` and
``v``: no ``L x L`` matrix and no gathered copy of the keys exist, forward or backward. The forward keeps
an online softmax over chunks of 16 keys and saves the log-sum-exp; the backward recomputes the
probabilities, writes ``dq`` per query and adds ``dk, dv`` (summed over the query heads of a kv head first)
into float32 buffers with atomics. Arithmetic is float32 whatever the input dtype (no TF32), so the fast
path matches the PyTorch path to rounding. Dropout on the attention probabilities uses Philox random
numbers that the backward regenerates from the same seed.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None

IMPLS = ("auto", "torch", "fast")
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 16  # keys handled per step of a kernel's loop


def fast_available():
    """True when the Triton kernels can run here (Triton importable and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


def use_fast(impl, x):
    """Whether a branch should run the fast path for tensor ``x`` under ``blossom_impl = impl``.

    ``auto``: the fast path on a CUDA tensor of a supported dtype when Triton is there, else PyTorch;
    ``torch``: always PyTorch; ``fast``: always the kernels (error if they cannot run on ``x``).
    """
    if impl == "torch":
        return False
    ok = triton is not None and x.is_cuda and x.dtype in FAST_DTYPES
    if impl == "fast" and not ok:
        raise RuntimeError(
            f"blossom_impl='fast' needs Triton and a CUDA tensor of dtype float32, bfloat16 or float16; got "
            f"device={x.device}, dtype={x.dtype}, triton={'yes' if triton is not None else 'missing'}. "
            "Use blossom_impl='auto' or 'torch'.")
    if impl not in IMPLS:
        raise ValueError(f"blossom_impl must be one of {IMPLS}, got {impl!r}")
    return ok


if triton is not None:

    @triton.jit
    def _slot_keys(IDX, idx_off, offs_t, t_ok, c, offs_c, N_SLOTS: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_P2: tl.constexpr, SLOTS_PER_CHUNK: tl.constexpr):
        """Key positions ``(BT, CHUNK)`` of chunk ``c`` and whether each is attended."""
        slot = c * SLOTS_PER_CHUNK + offs_c // BLOCK_P2
        j = offs_c % BLOCK_P2
        slot_ok = (slot < N_SLOTS) & (j < BLOCK)
        base = tl.load(IDX + idx_off + slot[None, :], mask=t_ok[:, None] & slot_ok[None, :], other=-1)
        pos = base * BLOCK + j[None, :]
        ok = (base >= 0) & (pos <= offs_t[:, None]) & slot_ok[None, :]
        return tl.where(ok, pos, 0), ok

    @triton.jit
    def _keep_mask(seed, bh, offs_t, c, offs_c, NK: tl.constexpr, CHUNK_: tl.constexpr, dropout_p):
        """Dropout keep mask ``(BT, CHUNK)``, the same in forward and backward."""
        rnd = tl.rand(seed + bh, offs_t[:, None] * NK + c * CHUNK_ + offs_c[None, :])
        return rnd >= dropout_p

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, IDX, LENS, L, scale, dropout_p, seed,
                    sqb, sqh, sql, skb, skh, skl, sib, sih, sil,
                    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
                    N_SLOTS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr,
                    SLOTS_PER_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, CHUNK_: tl.constexpr,
                    BLOCK_T: tl.constexpr, DROPOUT: tl.constexpr):
        pid_t, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H  # int64: batch offsets pass 2**31 on long inputs
        hkv = h // G
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tl.arange(0, CHUNK_)
        offs_d = tl.arange(0, D_P2)
        t_ok, d_ok = offs_t < L, offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + offs_t[:, None] * sql + offs_d[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale
        kv_base = b * skb + hkv * skh
        idx_off = b * sib + hkv * sih + offs_t[:, None] * sil
        m = tl.full([BLOCK_T], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_T], tl.float32)
        acc = tl.zeros([BLOCK_T, D_P2], tl.float32)
        for c in range(N_CHUNKS):
            pos, ok = _slot_keys(IDX, idx_off, offs_t, t_ok, c, offs_c, N_SLOTS, BLOCK, BLOCK_P2, SLOTS_PER_CHUNK)
            kv_off = kv_base + pos[:, :, None] * skl + offs_d[None, None, :]
            kv_mask = ok[:, :, None] & d_ok[None, None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.where(ok, tl.sum(q[:, None, :] * k, axis=2), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            den = den * alpha + tl.sum(p, axis=1)
            if DROPOUT:
                keep = _keep_mask(seed, bh, offs_t, c, offs_c, N_CHUNKS * CHUNK_, CHUNK_, dropout_p)
                p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
            m = m_new
        den_safe = tl.where(den > 0.0, den, 1.0)
        out = tl.where((offs_t < tl.load(LENS + b))[:, None], acc / den_safe[:, None], 0.0)  # padding rows: 0
        o_ptr = O + b * sqb + h * sqh + offs_t[:, None] * sql + offs_d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])
        tl.store(LSE + bh * L + offs_t, m + tl.log(den_safe), mask=t_ok)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, IDX, LENS, L, scale, dropout_p, seed,
                       sqb, sqh, sql, skb, skh, skl, sib, sih, sil,
                       H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
                       N_SLOTS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr,
                       SLOTS_PER_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, CHUNK_: tl.constexpr,
                       BLOCK_T: tl.constexpr, DROPOUT: tl.constexpr):
        pid_t, bh = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H  # int64: batch offsets pass 2**31 on long inputs
        hkv = h // G
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tl.arange(0, CHUNK_)
        offs_d = tl.arange(0, D_P2)
        t_ok, d_ok = offs_t < L, offs_d < D
        row = b * sqb + h * sqh + offs_t[:, None] * sql + offs_d[None, :]
        row_mask = t_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + row, mask=row_mask, other=0.0).to(tl.float32) * scale
        do_mask = row_mask & (offs_t < tl.load(LENS + b))[:, None]  # padding rows get no gradient
        do = tl.load(DO + row, mask=do_mask, other=0.0).to(tl.float32)
        lse = tl.load(LSE + bh * L + offs_t, mask=t_ok, other=0.0)
        delta = tl.load(DELTA + bh * L + offs_t, mask=t_ok, other=0.0)
        kv_base = b * skb + hkv * skh
        idx_off = b * sib + hkv * sih + offs_t[:, None] * sil
        dq = tl.zeros([BLOCK_T, D_P2], tl.float32)
        for c in range(N_CHUNKS):
            pos, ok = _slot_keys(IDX, idx_off, offs_t, t_ok, c, offs_c, N_SLOTS, BLOCK, BLOCK_P2, SLOTS_PER_CHUNK)
            kv_off = kv_base + pos[:, :, None] * skl + offs_d[None, None, :]
            kv_mask = ok[:, :, None] & d_ok[None, None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            p = tl.where(ok, tl.exp(tl.sum(q[:, None, :] * k, axis=2) - lse[:, None]), 0.0)
            dp = tl.sum(do[:, None, :] * v, axis=2)
            if DROPOUT:
                keep = _keep_mask(seed, bh, offs_t, c, offs_c, N_CHUNKS * CHUNK_, CHUNK_, dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.sum(ds[:, :, None] * k, axis=1)
        tl.store(DQ + row, (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, IDX, LENS, L, scale, dropout_p, seed,
                         sqb, sqh, sql, skb, skh, skl, sib, sih, sil,
                         H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                         D_P2: tl.constexpr, N_SLOTS: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCK_P2: tl.constexpr, SLOTS_PER_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
                         CHUNK_: tl.constexpr, BLOCK_T: tl.constexpr, DROPOUT: tl.constexpr):
        pid_t, bhk = tl.program_id(0), tl.program_id(1)
        b, hkv = (bhk // HKV).to(tl.int64), bhk % HKV
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tl.arange(0, CHUNK_)
        offs_d = tl.arange(0, D_P2)
        t_ok, d_ok = offs_t < L, offs_d < D
        row_mask = t_ok[:, None] & d_ok[None, :]
        do_mask = row_mask & (offs_t < tl.load(LENS + b))[:, None]  # padding rows get no gradient
        kv_base = b * skb + hkv * skh
        idx_off = b * sib + hkv * sih + offs_t[:, None] * sil
        for c in range(N_CHUNKS):
            pos, ok = _slot_keys(IDX, idx_off, offs_t, t_ok, c, offs_c, N_SLOTS, BLOCK, BLOCK_P2, SLOTS_PER_CHUNK)
            kv_off = kv_base + pos[:, :, None] * skl + offs_d[None, None, :]
            kv_mask = ok[:, :, None] & d_ok[None, None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            dk = tl.zeros([BLOCK_T, CHUNK_, D_P2], tl.float32)
            dv = tl.zeros([BLOCK_T, CHUNK_, D_P2], tl.float32)
            for g in tl.static_range(G):
                h = hkv * G + g
                bh = b * H + h
                row = b * sqb + h * sqh + offs_t[:, None] * sql + offs_d[None, :]
                q = tl.load(Q + row, mask=row_mask, other=0.0).to(tl.float32) * scale
                do = tl.load(DO + row, mask=do_mask, other=0.0).to(tl.float32)
                lse = tl.load(LSE + bh * L + offs_t, mask=t_ok, other=0.0)
                delta = tl.load(DELTA + bh * L + offs_t, mask=t_ok, other=0.0)
                p = tl.where(ok, tl.exp(tl.sum(q[:, None, :] * k, axis=2) - lse[:, None]), 0.0)
                dp = tl.sum(do[:, None, :] * v, axis=2)
                pd = p
                if DROPOUT:
                    keep = _keep_mask(seed, bh, offs_t, c, offs_c, N_CHUNKS * CHUNK_, CHUNK_, dropout_p)
                    dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
                    pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                ds = p * (dp - delta[:, None])
                dk += ds[:, :, None] * q[:, None, :]  # q already carries the scale
                dv += pd[:, :, None] * do[:, None, :]
            out_off = bhk.to(tl.int64) * L * D + pos[:, :, None] * D + offs_d[None, None, :]
            tl.atomic_add(DK + out_off, dk, mask=kv_mask, sem="relaxed")
            tl.atomic_add(DV + out_off, dv, mask=kv_mask, sem="relaxed")


def _launch_args(q, k, idx, block):
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    n_slots = idx.shape[-1]
    block_p2 = triton.next_power_of_2(block)
    chunk = max(CHUNK, block_p2)
    slots_per_chunk = chunk // block_p2
    meta = dict(H=H, G=H // Hkv, D=D, D_P2=triton.next_power_of_2(D), N_SLOTS=n_slots, BLOCK=block,
                BLOCK_P2=block_p2, SLOTS_PER_CHUNK=slots_per_chunk, N_CHUNKS=-(-n_slots // slots_per_chunk),
                CHUNK_=chunk)
    strides = (*q.stride()[:3], *k.stride()[:3], *idx.stride()[:3])
    return meta, strides


class _GatheredAttention(torch.autograd.Function):
    """``out[b, h, t] = softmax_j(q . k[pos_j] * scale) v[pos_j]`` over the slots ``idx[b, h // G, t]``."""

    @staticmethod
    def forward(ctx, q, k, v, idx, lengths, block, scale, dropout_p):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, L, D = q.shape
        meta, strides = _launch_args(q, k, idx, block)
        seed = int(torch.randint(0, 2 ** 30, (1,)).item()) if dropout_p > 0.0 else 0
        out = torch.empty_like(q)
        lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        block_t = 32
        grid = (triton.cdiv(L, block_t), B * H)
        _fwd_kernel[grid](q, k, v, out, lse, idx, lengths, L, scale, dropout_p, seed, *strides, BLOCK_T=block_t,
                          DROPOUT=dropout_p > 0.0, num_warps=4, **meta)
        ctx.save_for_backward(q, k, v, out, lse, idx, lengths)
        ctx.block, ctx.scale, ctx.dropout_p, ctx.seed = block, scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, idx, lengths = ctx.saved_tensors
        dout = dout.contiguous()
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        meta, strides = _launch_args(q, k, idx, ctx.block)
        delta = (dout.float() * out.float()).sum(-1)  # (B, H, L); 0 on padding rows (out is 0 there)
        common = (lse, delta, idx, lengths, L, ctx.scale, ctx.dropout_p, ctx.seed, *strides)
        dq = torch.empty_like(q)
        block_t = 32
        _bwd_dq_kernel[(triton.cdiv(L, block_t), B * H)](q, k, v, dout, dq, *common, BLOCK_T=block_t,
                                                         DROPOUT=ctx.dropout_p > 0.0, num_warps=4, **meta)
        dk = torch.zeros(B, Hkv, L, D, device=q.device, dtype=torch.float32)
        dv = torch.zeros_like(dk)
        block_t = 16
        _bwd_dkdv_kernel[(triton.cdiv(L, block_t), B * Hkv)](q, k, v, dout, dk, dv, *common, HKV=Hkv,
                                                             BLOCK_T=block_t, DROPOUT=ctx.dropout_p > 0.0,
                                                             num_warps=4, **meta)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def gathered_attention(q, k, v, idx, block, lengths=None, dropout_p=0.0, training=False, scale=None):
    """Attention of every query over the keys its slots name; see the module docstring.

    Args:
        q: ``(B, H, L, D)``; k, v: ``(B, Hkv, L, D)``; idx: int32 ``(B, Hkv, L, S)`` (any of the first two
        dims may be broadcast, stride 0), slot numbers or ``-1``; block: keys per slot.
    Returns:
        ``(B, H, L, D)``; rows at positions ``>= lengths`` are zero.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = float(dropout_p) if training else 0.0
    if lengths is None:
        lengths = torch.full((q.shape[0],), q.shape[2], device=q.device, dtype=torch.int32)
    return _GatheredAttention.apply(q, k, v, idx, lengths.to(torch.int32), block, scale, p)


def fast_selected_block_attention(q, k, v, blocks, valid, select_size, lengths=None, dropout_p=0.0,
                                  training=False, scale=None):
    """Fast twin of :func:`recbole_blossom.ltis.selected_block_attention` (same arguments and result)."""
    idx = torch.where(valid, blocks, -1).to(torch.int32)
    return gathered_attention(q, k, v, idx, select_size, lengths, dropout_p, training, scale)


_STIS_CACHE = {}


def fast_stis_attention(q, k, v, lengths=None, window=8, sink=True, dropout_p=0.0, training=False, scale=None):
    """Fast twin of :func:`recbole_blossom.stis.stis_attention` (same arguments and result)."""
    from recbole_blossom.stis import stis_key_index

    L = q.shape[2]
    key = (L, window, sink, q.device)
    if key not in _STIS_CACHE:
        index, valid = stis_key_index(L, window, sink, device=q.device)
        _STIS_CACHE[key] = torch.where(valid, index, -1).to(torch.int32)[None, None]  # (1, 1, L, M)
    idx = _STIS_CACHE[key].expand(q.shape[0], k.shape[1], -1, -1)
    return gathered_attention(q, k, v, idx, 1, lengths, dropout_p, training, scale)
