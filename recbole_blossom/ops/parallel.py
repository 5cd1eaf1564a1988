"""Triton kernels of Blossom's two attention primitives, with the signatures of
:mod:`recbole_blossom.ops.naive` (tested against it).

* :func:`select_blocks`: one fused kernel per ``(query tile, batch x kv head)``. Pass 1 runs an online
  softmax over the memory slot and the visible compressed blocks of each query head of the kv group (keeps
  only the max and the denominator); pass 2 walks the candidate selection blocks, recomputes the
  probabilities of the compressed blocks that overlap each one, averages them over the heads and over the
  visible overlapping blocks, and keeps a running top-``n`` per query. The ``L x L / stride`` scores never
  reach memory. Scores use exact float32 products (``input_precision=PRECISION``) so the choice matches the
  PyTorch path except on exact near-ties.
* :func:`gathered_attention`: a program owns a tile of query positions and *all* query heads of one kv
  head, so each gathered key and value is read once for the ``G`` heads that share it (rows of the tile
  are ``(position, head)`` pairs). Forward: online softmax over chunks of gathered keys, saves the
  log-sum-exp. Backward: ``dq`` per row; ``dk, dv`` summed over the ``G`` heads in registers, then added
  into float32 buffers with atomics. Inputs may be float32, bfloat16 or float16 (loaded as stored, computed
  in float32). Head dimension 16 and per-query key sets leave no dense tile for tensor cores here (see
  ``benchmarks/NOTES.md``): the kernels are bound by gathers, which this layout minimises. Attention
  dropout uses Philox random numbers that the backward regenerates from the same seed.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the PyTorch path exists
    triton = None

CHUNK = 16  # gathered keys handled per step of the attention kernels' loops


def available():
    """True when the Triton kernels can run here (Triton importable and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


def overlap_count(block_len, stride, select_size):
    """Most compressed blocks overlapping one selection block (loop bound of the selection kernel)."""
    best = 0
    for j in range(4 * (block_len + select_size) // stride + 4):
        lo = max(0, (j * select_size - block_len) // stride + 1)
        hi = ((j + 1) * select_size - 1) // stride
        best = max(best, hi - lo + 1)
    return best


if triton is not None:

    @triton.jit
    def _select_kernel(Q, KC, MEM, IDX, L, NC, scale,
                       sqb, sqh, sql, skb, skh, skn, sib, sih, sil,
                       HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
                       BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr,
                       N_SEL: tl.constexpr, N_SEL_P2: tl.constexpr, N_OV: tl.constexpr, G_P2: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr):
        pid_t, bhk = tl.program_id(0), tl.program_id(1)
        b, hkv = (bhk // HKV).to(tl.int64), bhk % HKV
        offs_t = pid_t * BT + tl.arange(0, BT)
        offs_d = tl.arange(0, D_P2)
        offs_c = tl.arange(0, BC)
        offs_g = tl.arange(0, G_P2)
        t_ok, d_ok = offs_t < L, offs_d < D
        t_last = pid_t * BT + BT - 1  # may pass L - 1 in the last tile: the masks below handle that
        kc_base = KC + b * skb + hkv * skh
        mem = tl.load(MEM + hkv * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        # pass 1: per head, the max and the denominator of the softmax over memory + visible blocks
        n_vis = (t_last - BLOCK_LEN + 1) // STRIDE + 1  # blocks visible to the tile's last query (causal skip)
        m_all = tl.zeros([BT, G_P2], tl.float32)
        den_all = tl.zeros([BT, G_P2], tl.float32)
        for g in tl.static_range(G):
            q = tl.load(Q + b * sqb + (hkv * G + g) * sqh + offs_t[:, None] * sql + offs_d[None, :],
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            m = tl.sum(q * mem[None, :], axis=1) * scale  # the memory slot, always visible
            den = tl.full([BT], 1.0, tl.float32)
            for c0 in range(0, n_vis, BC):
                i = c0 + offs_c
                kc = tl.load(kc_base + i[:, None] * skn + offs_d[None, :], mask=(i < NC)[:, None] & d_ok[None, :],
                             other=0.0).to(tl.float32)
                s = tl.dot(q, tl.trans(kc), input_precision=PRECISION) * scale
                vis = (i[None, :] * STRIDE + BLOCK_LEN - 1 <= offs_t[:, None]) & (i < NC)[None, :]
                s = tl.where(vis, s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                den = den * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
                m = m_new
            m_all = tl.where(offs_g[None, :] == g, m[:, None], m_all)
            den_all = tl.where(offs_g[None, :] == g, den[:, None], den_all)
        # pass 2: candidate selection blocks j < own block; mean over heads and visible overlapping blocks
        own = offs_t // SEL
        offs_k = tl.arange(0, N_SEL_P2)
        top_v = tl.where(offs_k[None, :] < N_SEL, float("-inf"), float("inf")) + tl.zeros([BT, N_SEL_P2], tl.float32)
        top_i = tl.full([BT, N_SEL_P2], -1, tl.int32)
        n_cand = t_last // SEL
        for j0 in range(0, n_cand, BC):
            j = j0 + offs_c
            total = tl.zeros([BT, BC], tl.float32)
            count = tl.zeros([BT, BC], tl.float32)
            i_lo = tl.maximum((j * SEL - BLOCK_LEN) // STRIDE + 1, 0)
            i_lo = tl.where(j * SEL - BLOCK_LEN >= 0, i_lo, 0)  # floor division of negatives: clamp at block 0
            i_hi = ((j + 1) * SEL - 1) // STRIDE
            for r in tl.static_range(N_OV):
                i = i_lo + r
                i_ok = (i <= i_hi) & (i < NC)
                kc = tl.load(kc_base + i[:, None] * skn + offs_d[None, :], mask=i_ok[:, None] & d_ok[None, :],
                             other=0.0).to(tl.float32)
                vis = i_ok[None, :] & (i[None, :] * STRIDE + BLOCK_LEN - 1 <= offs_t[:, None])
                p_sum = tl.zeros([BT, BC], tl.float32)
                for g in tl.static_range(G):
                    q = tl.load(Q + b * sqb + (hkv * G + g) * sqh + offs_t[:, None] * sql + offs_d[None, :],
                                mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                    m = tl.sum(tl.where(offs_g[None, :] == g, m_all, 0.0), axis=1)
                    den = tl.sum(tl.where(offs_g[None, :] == g, den_all, 0.0), axis=1)
                    s = tl.dot(q, tl.trans(kc), input_precision=PRECISION) * scale
                    p_sum += tl.exp(s - m[:, None]) / den[:, None]
                total += tl.where(vis, p_sum, 0.0)
                count += vis.to(tl.float32)
            score = (total / G) / tl.maximum(count, 1.0)
            score = tl.where(j[None, :] < own[:, None], score, float("-inf"))
            for _ in tl.static_range(N_SEL):  # merge this chunk's best into the running top-n
                x = tl.max(score, axis=1)
                xi = tl.argmax(score, axis=1)
                low = tl.min(top_v, axis=1)
                low_i = tl.argmin(top_v, axis=1)
                put = (offs_k[None, :] == low_i[:, None]) & (x > low)[:, None]
                top_v = tl.where(put, x[:, None], top_v)
                top_i = tl.where(put, (j0 + xi)[:, None].to(tl.int32), top_i)
                score = tl.where(offs_c[None, :] == xi[:, None], float("-inf"), score)
        out = IDX + b * sib + hkv * sih + offs_t[:, None] * sil
        tl.store(out + offs_k[None, :], top_i, mask=t_ok[:, None] & (offs_k[None, :] < N_SEL))
        tl.store(out + N_SEL + offs_k[None, :] * 0, own[:, None].to(tl.int32) + offs_k[None, :] * 0,
                 mask=t_ok[:, None] & (offs_k[None, :] == 0))

    @triton.jit
    def _slot_keys(IDX, idx_off, offs_t, t_ok, c, offs_c, N_SLOTS: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_P2: tl.constexpr, SLOTS_PER_CHUNK: tl.constexpr):
        """Key positions ``(R, CHUNK)`` of chunk ``c`` for rows at positions ``offs_t``, and which count."""
        slot = c * SLOTS_PER_CHUNK + offs_c // BLOCK_P2
        j = offs_c % BLOCK_P2
        slot_ok = (slot < N_SLOTS) & (j < BLOCK)
        base = tl.load(IDX + idx_off + slot[None, :], mask=t_ok[:, None] & slot_ok[None, :], other=-1)
        pos = base * BLOCK + j[None, :]
        ok = (base >= 0) & (pos <= offs_t[:, None]) & slot_ok[None, :]
        return tl.where(ok, pos, 0), ok

    @triton.jit
    def _keep_mask(seed, bh, L, offs_t, c, offs_c, NK: tl.constexpr, CHUNK_: tl.constexpr, dropout_p):
        """Dropout keep mask ``(R, CHUNK)``, the same in forward and backward (``bh`` per row): one Philox
        counter per (batch x head, position, gathered key)."""
        counter = (bh[:, None].to(tl.int64) * L + offs_t[:, None]) * NK + c * CHUNK_ + offs_c[None, :]
        return tl.rand(seed, counter) >= dropout_p

    @triton.jit
    def _tile(Q, L, scale, sqb, sqh, sql, skb, skh, sib, sih, sil, HKV: tl.constexpr, G: tl.constexpr,
              G_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, BT: tl.constexpr):
        """A forward/dq tile: ``BT`` positions x the ``G`` query heads of one kv head (rows padded to
        ``G_P2``), its scaled queries, and the offsets its gathers start from."""
        b, hkv = (tl.program_id(1) // HKV).to(tl.int64), tl.program_id(1) % HKV
        r = tl.arange(0, BT * G_P2)
        offs_t = tl.program_id(0) * BT + r // G_P2
        g = r % G_P2
        h = hkv * G + g
        t_ok = (offs_t < L) & (g < G)
        offs_d = tl.arange(0, D_P2)
        d_ok = offs_d < D
        row = b * sqb + h[:, None] * sqh + offs_t[:, None] * sql + offs_d[None, :]
        row_mask = t_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + row, mask=row_mask, other=0.0).to(tl.float32) * scale
        kv_base = b * skb + hkv * skh
        idx_off = b * sib + hkv * sih + offs_t[:, None] * sil
        return b, offs_t, t_ok, offs_d, d_ok, row, row_mask, q, kv_base, idx_off, b * (HKV * G) + h

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, IDX, LENS, L, scale, dropout_p, seed,
                    sqb, sqh, sql, skb, skh, skl, sib, sih, sil,
                    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr,
                    D_P2: tl.constexpr, N_SLOTS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr,
                    SLOTS_PER_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, CHUNK_: tl.constexpr,
                    BT: tl.constexpr, DROPOUT: tl.constexpr):
        b, offs_t, t_ok, offs_d, d_ok, row, row_mask, q, kv_base, idx_off, bh = _tile(
            Q, L, scale, sqb, sqh, sql, skb, skh, sib, sih, sil, HKV, G, G_P2, D, D_P2, BT)
        offs_c = tl.arange(0, CHUNK_)
        m = tl.full([BT * G_P2], float("-inf"), tl.float32)
        den = tl.zeros([BT * G_P2], tl.float32)
        acc = tl.zeros([BT * G_P2, D_P2], tl.float32)
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
                keep = _keep_mask(seed, bh, L, offs_t, c, offs_c, N_CHUNKS * CHUNK_, CHUNK_, dropout_p)
                p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
            m = m_new
        den_safe = tl.where(den > 0.0, den, 1.0)
        out = tl.where((offs_t < tl.load(LENS + b))[:, None], acc / den_safe[:, None], 0.0)  # padding rows: 0
        tl.store(O + row, out.to(O.dtype.element_ty), mask=row_mask)
        tl.store(LSE + bh * L + offs_t, m + tl.log(den_safe), mask=t_ok)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, IDX, LENS, L, scale, dropout_p, seed,
                       sqb, sqh, sql, skb, skh, skl, sib, sih, sil,
                       H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr,
                       D_P2: tl.constexpr, N_SLOTS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr,
                       SLOTS_PER_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, CHUNK_: tl.constexpr,
                       BT: tl.constexpr, DROPOUT: tl.constexpr):
        b, offs_t, t_ok, offs_d, d_ok, row, row_mask, q, kv_base, idx_off, bh = _tile(
            Q, L, scale, sqb, sqh, sql, skb, skh, sib, sih, sil, HKV, G, G_P2, D, D_P2, BT)
        offs_c = tl.arange(0, CHUNK_)
        do_mask = row_mask & (offs_t < tl.load(LENS + b))[:, None]  # padding rows get no gradient
        do = tl.load(DO + row, mask=do_mask, other=0.0).to(tl.float32)
        lse = tl.load(LSE + bh * L + offs_t, mask=t_ok, other=0.0)
        delta = tl.load(DELTA + bh * L + offs_t, mask=t_ok, other=0.0)
        dq = tl.zeros([BT * G_P2, D_P2], tl.float32)
        for c in range(N_CHUNKS):
            pos, ok = _slot_keys(IDX, idx_off, offs_t, t_ok, c, offs_c, N_SLOTS, BLOCK, BLOCK_P2, SLOTS_PER_CHUNK)
            kv_off = kv_base + pos[:, :, None] * skl + offs_d[None, None, :]
            kv_mask = ok[:, :, None] & d_ok[None, None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            p = tl.where(ok, tl.exp(tl.sum(q[:, None, :] * k, axis=2) - lse[:, None]), 0.0)
            dp = tl.sum(do[:, None, :] * v, axis=2)
            if DROPOUT:
                keep = _keep_mask(seed, bh, L, offs_t, c, offs_c, N_CHUNKS * CHUNK_, CHUNK_, dropout_p)
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
                         CHUNK_: tl.constexpr, BT: tl.constexpr, DROPOUT: tl.constexpr):
        pid_t, bhk = tl.program_id(0), tl.program_id(1)
        b, hkv = (bhk // HKV).to(tl.int64), bhk % HKV
        offs_t = pid_t * BT + tl.arange(0, BT)
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
            dk = tl.zeros([BT, CHUNK_, D_P2], tl.float32)
            dv = tl.zeros([BT, CHUNK_, D_P2], tl.float32)
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
                    keep = _keep_mask(seed, bh + offs_t * 0, L, offs_t, c, offs_c, N_CHUNKS * CHUNK_, CHUNK_,
                                      dropout_p)
                    dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
                    pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                ds = p * (dp - delta[:, None])
                dk += ds[:, :, None] * q[:, None, :]  # q already carries the scale
                dv += pd[:, :, None] * do[:, None, :]
            out_off = bhk.to(tl.int64) * L * D + pos[:, :, None] * D + offs_d[None, None, :]
            tl.atomic_add(DK + out_off, dk, mask=kv_mask, sem="relaxed")
            tl.atomic_add(DV + out_off, dv, mask=kv_mask, sem="relaxed")


def select_blocks(q, k_cmp, mem_key, block_len, stride, select_size, n_select, chunk_size=1024, scale=None,
                  *, bt=64, bc=32, precision="tf32", num_warps=4):
    """Fused twin of :func:`recbole_blossom.ops.naive.select_blocks` (``chunk_size`` is not needed here:
    nothing ``L x Nc`` is stored). Slots come in no particular order. ``bt, bc, precision, num_warps`` tune
    the kernel (``benchmarks/kernels.py``)."""
    B, H, L, D = q.shape
    Hkv, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k_cmp = q.detach().float().contiguous(), k_cmp.detach().float().contiguous()
    mem_key = mem_key.detach().float().contiguous()
    idx = torch.empty(B, Hkv, L, n_select + 1, dtype=torch.int32, device=q.device)
    _select_kernel[(triton.cdiv(L, bt), B * Hkv)](
        q, k_cmp, mem_key, idx, L, n_cmp, scale, *q.stride()[:3], *k_cmp.stride()[:3], *idx.stride()[:3],
        HKV=Hkv, G=H // Hkv, D=D, D_P2=max(16, triton.next_power_of_2(D)), BLOCK_LEN=block_len, STRIDE=stride,
        SEL=select_size, N_SEL=n_select, N_SEL_P2=triton.next_power_of_2(n_select),
        N_OV=overlap_count(block_len, stride, select_size), G_P2=triton.next_power_of_2(H // Hkv), BT=bt, BC=bc,
        PRECISION=precision, num_warps=num_warps)
    return idx


def _launch_args(q, k, idx, block):
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    n_slots = idx.shape[-1]
    block_p2 = triton.next_power_of_2(block)
    chunk = max(CHUNK, block_p2)
    slots_per_chunk = chunk // block_p2
    meta = dict(H=H, HKV=Hkv, G=H // Hkv, D=D, D_P2=triton.next_power_of_2(D), N_SLOTS=n_slots, BLOCK=block,
                BLOCK_P2=block_p2, SLOTS_PER_CHUNK=slots_per_chunk, N_CHUNKS=-(-n_slots // slots_per_chunk),
                CHUNK_=chunk)
    strides = (*q.stride()[:3], *k.stride()[:3], *idx.stride()[:3])
    return meta, strides


def _rows_per_tile(G):
    """Positions per tile of the forward/dq kernels: 32 rows of (position, head)."""
    return max(1, 32 // triton.next_power_of_2(G))


class _GatheredAttention(torch.autograd.Function):
    """``out[b, h, t] = softmax_j(q . k[pos_j] * scale) v[pos_j]`` over the slots ``idx[b, h // G, t]``."""

    @staticmethod
    def forward(ctx, q, k, v, idx, lengths, block, scale, dropout_p):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        meta, strides = _launch_args(q, k, idx, block)
        seed = int(torch.randint(0, 2 ** 30, (1,)).item()) if dropout_p > 0.0 else 0
        out = torch.empty_like(q)
        lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        bt = _rows_per_tile(H // Hkv)
        _fwd_kernel[(triton.cdiv(L, bt), B * Hkv)](q, k, v, out, lse, idx, lengths, L, scale, dropout_p, seed,
                                                   *strides, G_P2=triton.next_power_of_2(H // Hkv), BT=bt,
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
        bt = _rows_per_tile(H // Hkv)
        _bwd_dq_kernel[(triton.cdiv(L, bt), B * Hkv)](q, k, v, dout, dq, *common,
                                                      G_P2=triton.next_power_of_2(H // Hkv), BT=bt,
                                                      DROPOUT=ctx.dropout_p > 0.0, num_warps=4, **meta)
        dk = torch.zeros(B, Hkv, L, D, device=q.device, dtype=torch.float32)
        dv = torch.zeros_like(dk)
        _bwd_dkdv_kernel[(triton.cdiv(L, 16), B * Hkv)](q, k, v, dout, dk, dv, *common, BT=16,
                                                         DROPOUT=ctx.dropout_p > 0.0, num_warps=4, **meta)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def gathered_attention(q, k, v, idx, block, lengths=None, dropout_p=0.0, training=False, scale=None):
    """Triton twin of :func:`recbole_blossom.ops.naive.gathered_attention` (same arguments and result;
    ``idx`` int32, its first two dims may be broadcast with stride 0)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = float(dropout_p) if training else 0.0
    if lengths is None:
        lengths = torch.full((q.shape[0],), q.shape[2], device=q.device, dtype=torch.int32)
    idx = idx.to(torch.int32).expand(q.shape[0], k.shape[1], *idx.shape[2:])
    return _GatheredAttention.apply(q, k, v, idx, lengths.to(torch.int32), block, scale, p)
