"""Triton kernels of Blossom's primitives, with the signatures of
:mod:`recbole_blossom.ops.naive` (tested against it).

* :func:`select_blocks`: one fused kernel per ``(query tile, batch x kv head)``. Pass 1 runs an online
  softmax over the memory slot and the visible compressed blocks of each query head of the kv group (keeps
  only the max and the denominator); pass 2 walks the candidate selection blocks, recomputes the
  probabilities of the compressed blocks that overlap each one, averages them over the heads and over the
  visible overlapping blocks, and keeps a running top-``n`` per query. The ``L x L / stride`` scores never
  reach memory. For float32 inputs the scores use exact float32 products, so the choice matches the PyTorch
  path except on exact near-ties; for bf16/fp16 inputs TF32.
* :func:`gathered_attention` and :func:`stis_attention`, two kernel families:

  - bfloat16 / float16 (what people train in): tensor cores. A program owns a tile of query positions x the
    ``G`` query heads of one kv head, tall enough for ``tl.dot``, and visits 16-key chunks with a per-row mask
    that keeps each query to its own keys (membership of the chunk's block in the row's selected blocks for
    LTIS, the STIS offsets computed in the kernel). How a tile finds its chunks (``WALK``): LTIS with blocks of
    whole chunks reads its rows' selected slots straight from ``idx`` (16 rows = 4 positions x 4 heads; each
    distinct block once, nothing built); other LTIS block sizes scan presence bytes of 16-position tiles
    (:func:`tile_presence`); STIS walks a fixed chunk list per L. Backward: one kernel, dq per tile, dk/dv of
    each visited chunk in one ``tl.dot`` and float32 atomics, ``delta = rowsum(dO * O)`` computed in place.
  - float32: CUDA cores with exact products. A program owns (position, head) rows of one kv head and gathers
    each query's own keys, so each gathered key and value is read once for the ``G`` heads that share it;
    ``dq`` per row, ``dk, dv`` summed over the heads, then float32 atomics. (In float32 the tensor-core
    family was 2-9x slower at L >= 1024: NOTES.md.)

  Attention dropout draws random numbers that the backward regenerates from the same seed (read from a device
  tensor: a new seed never compiles a new kernel, and a CUDA graph replays with new seeds): a Philox number per
  score in the float32 kernels; in the tensor-core kernels a 32-bit integer hash of (seed, batch x head, query,
  key) per score, two multiplies each, in the score tile's own layout (``p`` is rounded to a multiple of 2^-32).
* :func:`branch_attention`: what the layer calls, both branches and the gate. On the tensor-core kernels one
  autograd node (each Python autograd node and launch costs the host tens of microseconds, and the step is
  bound by the host): LTIS and STIS forward, the gate; backward the gate, then both branches' kernels into one
  dq and one dk/dv buffer.
* :func:`rotary` and :func:`gate_combine`: the layer's glue around the branches (RoPE of q and k; sigmoid
  gates, gated sum and the output projection's layout), one launch forward and one backward each.
* :func:`compress_blocks`: LTIS's block compression MLP, forward only, one launch.
"""

import functools
import math
from typing import NamedTuple

import torch

from recbole_blossom.ops import naive
from recbole_blossom.ops.launch import launch
from recbole_blossom.ops.naive import cached_stis_slots, num_compressed_blocks, stis_slots

def _cdiv(a, b):
    """``ceil(a / b)`` for the launch grids. Plain Python: ``triton.cdiv`` and ``triton.next_power_of_2`` are
    constexpr functions whose host-side call cost ~8 us each, about 14 a layer's forward."""
    return -(-a // b)


def _next_pow2(n):
    """The smallest power of two >= ``n`` (``n >= 1``), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length()


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the PyTorch path exists
    triton = None

CHUNK = 16  # gathered keys handled per step of the attention kernels' loops


def available():
    """True when the Triton kernels can run here (Triton importable and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def overlap_count(block_len, stride, select_size):
    """Most compressed blocks overlapping one selection block (loop bound of the selection kernel; cached: it
    is asked on every selection call)."""
    best = 0
    for j in range(4 * (block_len + select_size) // stride + 4):
        lo = max(0, (j * select_size - block_len) // stride + 1)
        hi = ((j + 1) * select_size - 1) // stride
        best = max(best, hi - lo + 1)
    return best


if triton is not None:

    @triton.jit
    def _score_q(Q, b, head, offs_t, offs_d, t_ok, d_ok, sqb, sqh, sql, POOL: tl.constexpr):
        """Query rows of scoring head ``head``: query head ``head`` itself, or with ``POOL > 1`` the mean of query
        heads ``head * POOL .. head * POOL + POOL - 1`` (logit pooling over a kv group: one score per kv head)."""
        q = tl.zeros([offs_t.shape[0], offs_d.shape[0]], tl.float32)
        for r in tl.static_range(POOL):
            q += tl.load(Q + b * sqb + (head * POOL + r) * sqh + offs_t[:, None] * sql + offs_d[None, :],
                         mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        return q / POOL

    @triton.jit
    def _select_kernel(Q, KC, MEM, IDX, L, NC, scale,
                       sqb, sqh, sql, skb, skh, skn, sib, sih, sil,
                       HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
                       BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr,
                       N_SEL: tl.constexpr, N_SEL_P2: tl.constexpr, N_OV: tl.constexpr, G_P2: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr, POOL: tl.constexpr):
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
            q = _score_q(Q, b, hkv * G + g, offs_t, offs_d, t_ok, d_ok, sqb, sqh, sql, POOL)
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
                    q = _score_q(Q, b, hkv * G + g, offs_t, offs_d, t_ok, d_ok, sqb, sqh, sql, POOL)
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

    # --- gathered attention on CUDA cores (float32: exact products) ------------------------------------------
    @triton.jit
    def _online_softmax(m, den, s):
        """One step of the online softmax over scores ``s`` (rows, keys; ``-inf`` = not attended): the new
        running max, the factor that rescales what was accumulated, the unnormalised weights, the new
        denominator. Rows with nothing attended yet keep max ``-inf`` and weights 0."""
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        return m_new, alpha, p, den * alpha + tl.sum(p, axis=1)

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
    def _gather_chunk(K, V, IDX, idx_off, kv_base, offs_t, t_ok, c, offs_c, offs_d, d_ok, skl, N_SLOTS: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr, SLOTS_PER_CHUNK: tl.constexpr):
        """Chunk ``c`` of each row's gathered keys: positions ``(R, CHUNK)``, which count, the ``(R, CHUNK, D)``
        load mask, and the keys and values in float32 (0 where not counted)."""
        pos, ok = _slot_keys(IDX, idx_off, offs_t, t_ok, c, offs_c, N_SLOTS, BLOCK, BLOCK_P2, SLOTS_PER_CHUNK)
        kv_off = kv_base + pos[:, :, None] * skl + offs_d[None, None, :]
        kv_mask = ok[:, :, None] & d_ok[None, None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        return pos, ok, kv_mask, k, v

    @triton.jit
    def _keep_mask(seed, bh, L, offs_t, c, offs_c, NK: tl.constexpr, CHUNK_: tl.constexpr, dropout_p):
        """Dropout keep mask ``(R, CHUNK)``, the same in forward and backward (``bh`` per row): one Philox
        counter per (batch x head, position, gathered key)."""
        counter = (bh[:, None].to(tl.int64) * L + offs_t[:, None]) * NK + c * CHUNK_ + offs_c[None, :]
        return tl.rand(seed, counter) >= dropout_p

    @triton.jit
    def _tile_rows(Q, L, sqb, sqh, sql, QB: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                   G_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr):
        """Rows ``(position t, head h)`` of this program's tile (``QB`` positions x the ``G`` query heads of one kv
        head, padded to ``G_P2``) and the offsets of their q/o/do rows; shared by both kernel families."""
        b, hkv = (tl.program_id(1) // HKV).to(tl.int64), tl.program_id(1) % HKV
        r = tl.arange(0, QB * G_P2)
        t = tl.program_id(0) * QB + r // G_P2
        g = r % G_P2
        h = hkv * G + g
        row_ok = (t < L) & (g < G)
        offs_d = tl.arange(0, D_P2)
        d_ok = offs_d < D
        row = b * sqb + h[:, None] * sqh + t[:, None] * sql + offs_d[None, :]
        return b, hkv, t, row_ok, offs_d, d_ok, row, row_ok[:, None] & d_ok[None, :], b * (HKV * G) + h

    @triton.jit
    def _tile(Q, L, scale, sqb, sqh, sql, skb, skh, sib, sih, sil, HKV: tl.constexpr, G: tl.constexpr,
              G_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, BT: tl.constexpr):
        """A forward/dq tile of the gather kernels: :func:`_tile_rows` of ``BT`` positions, their scaled
        queries, and the offsets the gathers start from."""
        b, hkv, offs_t, t_ok, offs_d, d_ok, row, row_mask, bh = _tile_rows(Q, L, sqb, sqh, sql, BT, HKV, G, G_P2,
                                                                           D, D_P2)
        q = tl.load(Q + row, mask=row_mask, other=0.0).to(tl.float32) * scale
        kv_base = b * skb + hkv * skh
        idx_off = b * sib + hkv * sih + offs_t[:, None] * sil
        return b, offs_t, t_ok, offs_d, d_ok, row, row_mask, q, kv_base, idx_off, bh

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, IDX, LENS, L, scale, dropout_p, SEED,
                    sqb, sqh, sql, skb, skh, skl, sib, sih, sil,
                    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr,
                    D_P2: tl.constexpr, N_SLOTS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr,
                    SLOTS_PER_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, CHUNK_: tl.constexpr,
                    BT: tl.constexpr, DROPOUT: tl.constexpr):
        seed = tl.load(SEED)  # on the device: a replayed CUDA graph draws a new one
        b, offs_t, t_ok, offs_d, d_ok, row, row_mask, q, kv_base, idx_off, bh = _tile(
            Q, L, scale, sqb, sqh, sql, skb, skh, sib, sih, sil, HKV, G, G_P2, D, D_P2, BT)
        offs_c = tl.arange(0, CHUNK_)
        m = tl.full([BT * G_P2], float("-inf"), tl.float32)
        den = tl.zeros([BT * G_P2], tl.float32)
        acc = tl.zeros([BT * G_P2, D_P2], tl.float32)
        for c in range(N_CHUNKS):
            _, ok, _, k, v = _gather_chunk(K, V, IDX, idx_off, kv_base, offs_t, t_ok, c, offs_c, offs_d, d_ok, skl,
                                           N_SLOTS, BLOCK, BLOCK_P2, SLOTS_PER_CHUNK)
            s = tl.where(ok, tl.sum(q[:, None, :] * k, axis=2), float("-inf"))
            m_new, alpha, p, den = _online_softmax(m, den, s)
            if DROPOUT:
                keep = _keep_mask(seed, bh, L, offs_t, c, offs_c, N_CHUNKS * CHUNK_, CHUNK_, dropout_p)
                p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
            m = m_new
        den_safe = tl.where(den > 0.0, den, 1.0)
        out = tl.where((offs_t < tl.load(LENS + b))[:, None], acc / den_safe[:, None], 0.0)  # padding rows: 0
        tl.store(O + row, out.to(O.dtype.element_ty), mask=row_mask)
        tl.store(LSE + bh * L + offs_t, m + tl.log(den_safe), mask=t_ok)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, IDX, LENS, L, scale, dropout_p, SEED,
                       sqb, sqh, sql, skb, skh, skl, sib, sih, sil,
                       H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr,
                       D_P2: tl.constexpr, N_SLOTS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P2: tl.constexpr,
                       SLOTS_PER_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, CHUNK_: tl.constexpr,
                       BT: tl.constexpr, DROPOUT: tl.constexpr):
        seed = tl.load(SEED)  # on the device: a replayed CUDA graph draws a new one
        b, offs_t, t_ok, offs_d, d_ok, row, row_mask, q, kv_base, idx_off, bh = _tile(
            Q, L, scale, sqb, sqh, sql, skb, skh, sib, sih, sil, HKV, G, G_P2, D, D_P2, BT)
        offs_c = tl.arange(0, CHUNK_)
        do_mask = row_mask & (offs_t < tl.load(LENS + b))[:, None]  # padding rows get no gradient
        do = tl.load(DO + row, mask=do_mask, other=0.0).to(tl.float32)
        lse = tl.load(LSE + bh * L + offs_t, mask=t_ok, other=0.0)
        delta = tl.load(DELTA + bh * L + offs_t, mask=t_ok, other=0.0)
        dq = tl.zeros([BT * G_P2, D_P2], tl.float32)
        for c in range(N_CHUNKS):
            _, ok, _, k, v = _gather_chunk(K, V, IDX, idx_off, kv_base, offs_t, t_ok, c, offs_c, offs_d, d_ok, skl,
                                           N_SLOTS, BLOCK, BLOCK_P2, SLOTS_PER_CHUNK)
            p = tl.where(ok, tl.exp(tl.sum(q[:, None, :] * k, axis=2) - lse[:, None]), 0.0)
            dp = tl.sum(do[:, None, :] * v, axis=2)
            if DROPOUT:
                keep = _keep_mask(seed, bh, L, offs_t, c, offs_c, N_CHUNKS * CHUNK_, CHUNK_, dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.sum(ds[:, :, None] * k, axis=1)
        tl.store(DQ + row, (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, IDX, LENS, L, scale, dropout_p, SEED,
                         sqb, sqh, sql, skb, skh, skl, sib, sih, sil,
                         H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                         D_P2: tl.constexpr, N_SLOTS: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCK_P2: tl.constexpr, SLOTS_PER_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
                         CHUNK_: tl.constexpr, BT: tl.constexpr, DROPOUT: tl.constexpr):
        seed = tl.load(SEED)  # on the device: a replayed CUDA graph draws a new one
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
            pos, ok, kv_mask, k, v = _gather_chunk(K, V, IDX, idx_off, kv_base, offs_t, t_ok, c, offs_c, offs_d, d_ok,
                                                   skl, N_SLOTS, BLOCK, BLOCK_P2, SLOTS_PER_CHUNK)
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

    # --- block-sparse attention on tensor cores ------------------------------------------------------------
    # A program owns a tile of QB consecutive query positions x the G query heads of one kv head: QB * G_P2
    # rows, so every key and value it loads serves the whole kv group, and the tile is tall enough for
    # tl.dot (tensor cores in bf16/fp16; exact float32 products in float32). It walks a list of key chunks
    # (KB consecutive positions each): the union of what the tile's queries may see. A per-row mask keeps
    # each query to its own keys: membership in its selected blocks (PATTERN 0, LTIS), or the fixed STIS
    # offsets (PATTERN 1: recent window, power-of-two distances, sink), always causal.

    @triton.jit
    def _allowed(t, s, row_ok, row_idx, c, PATTERN: tl.constexpr, BLOCK: tl.constexpr, UNIFORM: tl.constexpr,
                 KB: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr):
        """``(rows, KB)``: which keys ``s`` of chunk ``c`` each row's query attends to."""
        ok = (s[None, :] <= t[:, None]) & row_ok[:, None]
        if PATTERN == 0:
            if UNIFORM:  # the chunk lies in one selection block: one membership test per row
                member = tl.max((row_idx == (c * KB) // BLOCK).to(tl.int32), axis=1) > 0
                ok = ok & member[:, None]
            else:
                blk = s // BLOCK
                member = tl.max((row_idx[:, :, None] == blk[None, None, :]).to(tl.int32), axis=1) > 0
                ok = ok & member
        else:
            off = t[:, None] - s[None, :]
            near = (off < WINDOW) | ((off & (off - 1)) == 0)
            if SINK:
                near = near | (s[None, :] == 0)
            ok = ok & near
        return ok

    @triton.jit
    def _mix32(x):
        """A bijective 32-bit integer hash with low bias (xor-shift-multiply, the "lowbias32" family): two
        multiplies per number where a Philox call costs ten rounds."""
        x ^= x >> 16
        x *= 0x21F0AAAD
        x ^= x >> 15
        x *= 0x735A2D97
        x ^= x >> 15
        return x

    @triton.jit
    def _tc_keep(seed, bh, t, c, L, dropout_p, KB: tl.constexpr):
        """Dropout keep mask ``(rows, KB)`` of key chunk ``c``: a 32-bit hash of (seed, batch x head, query,
        key) per score, compared with ``2^32 p``. The row's part is hashed once per row, then each score costs
        one xor and one :func:`_mix32` in the score's own register layout (eight 16-bit numbers per Philox
        call needed selects across the tile to spread them, and the selects cost more than the numbers).
        The hash depends on the row and the key only, so the backward regenerates the forward's mask in any
        visiting order."""
        row = bh.to(tl.int64) * L + t  # (rows,): unique per (batch x head, query)
        row_h = _mix32((row & 0xFFFFFFFF).to(tl.uint32) ^ _mix32((row >> 32).to(tl.uint32) ^ seed))
        key = (c * KB + tl.arange(0, KB)).to(tl.uint32) * 0x9E3779B9  # odd multiplier: distinct keys stay distinct
        x = _mix32(row_h[:, None] ^ key[None, :])
        return x >= (tl.full([], 4294967296.0, tl.float32) * dropout_p).to(tl.uint32)

    @triton.jit
    def _chunk_walk(CH, CNT, L, b, hkv, scb, sch, sct, snb, snh, QB: tl.constexpr, KB: tl.constexpr,
                    WALK: tl.constexpr):
        """How many steps this tile's chunk loop takes and where its row of ``CH`` starts (WALK 0: ``CH`` is a
        list of chunk ids, ``CNT`` long; 1: a presence byte per chunk, scanned up to the chunk of the tile's last
        query). WALK 2 does not use it."""
        if WALK == 1:
            n = tl.minimum(tl.program_id(0) * QB + QB - 1, L - 1) // KB + 1
        else:
            n = tl.load(CNT + b * snb + hkv * snh + tl.program_id(0))
        return n, CH + b * scb + hkv * sch + tl.program_id(0) * sct

    @triton.jit
    def _slot_block(IDX, b, hkv, sib, sih, sil, L, u, row_idx, QB: tl.constexpr, G_P2: tl.constexpr,
                    S: tl.constexpr, S_P2: tl.constexpr):
        """WALK 2: the block in slot ``u`` of the tile's ``QB x S`` selected slots, or -1 when the slot is empty
        or an earlier slot of the tile already named the block (so each block is visited once, unsorted)."""
        qi = u // S
        t_u = tl.program_id(0) * QB + qi
        j = tl.load(IDX + b * sib + hkv * sih + t_u * sil + (u - qi * S), mask=t_u < L, other=-1)
        r = tl.arange(0, QB * G_P2)
        earlier = ((r // G_P2) * S)[:, None] + tl.arange(0, S_P2)[None, :] < u
        dup = tl.max(((row_idx == j) & earlier).to(tl.int32))
        return tl.where(dup > 0, -1, j)

    @triton.jit
    def _fwd_chunk(q, K, V, c, t, row_ok, row_idx, bh, offs_d, d_ok, L, scale, dropout_p, seed,
                   m, den, acc, skl, svl, PATTERN: tl.constexpr, BLOCK: tl.constexpr, UNIFORM: tl.constexpr,
                   WINDOW: tl.constexpr, SINK: tl.constexpr, KB: tl.constexpr, DROPOUT: tl.constexpr,
                   PRECISION: tl.constexpr):
        """One online-softmax step of the tile over key chunk ``c``."""
        s = c * KB + tl.arange(0, KB)
        kv_mask = (s < L)[:, None] & d_ok[None, :]
        k = tl.load(K + s[:, None] * skl + offs_d[None, :], mask=kv_mask, other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        ok = _allowed(t, s, row_ok, row_idx, c, PATTERN, BLOCK, UNIFORM, KB, WINDOW, SINK)
        m_new, alpha, p, den = _online_softmax(m, den, tl.where(ok, sc, float("-inf")))
        if DROPOUT:
            p = tl.where(_tc_keep(seed, bh, t, c, L, dropout_p, KB), p * (1.0 / (1.0 - dropout_p)), 0.0)
        v = tl.load(V + s[:, None] * svl + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, den, acc

    @triton.jit
    def _bwd_chunk(q, do, lse, delta, K, V, DK, DV, out_base, c, t, row_ok, row_idx, bh, offs_d, d_ok,
                   L, scale, dropout_p, seed, dq, skl, svl, D: tl.constexpr, PATTERN: tl.constexpr,
                   BLOCK: tl.constexpr, UNIFORM: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr,
                   KB: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        """The tile's backward over key chunk ``c``: returns dq; adds dk, dv of the chunk (atomics)."""
        s = c * KB + tl.arange(0, KB)
        kv_mask = (s < L)[:, None] & d_ok[None, :]
        k = tl.load(K + s[:, None] * skl + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + s[:, None] * svl + offs_d[None, :], mask=kv_mask, other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        ok = _allowed(t, s, row_ok, row_idx, c, PATTERN, BLOCK, UNIFORM, KB, WINDOW, SINK)
        p = tl.where(ok, tl.exp(sc - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        pd = p
        if DROPOUT:
            keep = _tc_keep(seed, bh, t, c, L, dropout_p, KB)
            inv_keep = 1.0 / (1.0 - dropout_p)  # one division per chunk, a multiply per score
            dp = tl.where(keep, dp * inv_keep, 0.0)
            pd = tl.where(keep, p * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
        dv = tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PRECISION)
        out_off = out_base + s[:, None] * D + offs_d[None, :]
        tl.atomic_add(DK + out_off, dk, mask=kv_mask, sem="relaxed")
        tl.atomic_add(DV + out_off, dv, mask=kv_mask, sem="relaxed")
        return dq

    @triton.jit
    def _presence_kernel(IDX, PRES, L, sib, sih, sil, spb, sph, spt, HP: tl.constexpr, S: tl.constexpr,
                         S_P2: tl.constexpr, QB: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr,
                         SPAN: tl.constexpr):
        """Presence bytes of one tile: 1 for each KB-key chunk holding a key of a selected block at or before
        one of the tile's QB queries (the rule of :func:`tile_chunks`, without sorting)."""
        b, h = (tl.program_id(1) // HP).to(tl.int64), tl.program_id(1) % HP
        pos = tl.program_id(0) * QB + tl.arange(0, QB)
        offs_s = tl.arange(0, S_P2)
        j = tl.load(IDX + b * sib + h * sih + pos[:, None] * sil + offs_s[None, :],
                    mask=(pos < L)[:, None] & (offs_s < S)[None, :], other=-1)
        last = ((j + 1) * BLOCK - 1) // KB
        row = PRES + b * spb + h * sph + tl.program_id(0) * spt
        for r in tl.static_range(SPAN):
            c = (j * BLOCK) // KB + r
            lo = tl.maximum(j * BLOCK, c * KB)
            seen = (j >= 0) & (c <= last) & (lo <= pos[:, None])
            tl.store(row + c, tl.full([QB, S_P2], 1, tl.uint8), mask=seen)

    # Three ways a tile finds its chunks (WALK): 0, a list of chunk ids (STIS, the same for every row);
    # 1, presence bytes scanned up to the tile's last query (LTIS, any block size); 2, the tile's own selected
    # slots read straight from IDX, each distinct block once (LTIS with blocks of whole chunks: nothing to build
    # or scan, so tiles can be small and visit only what their few queries chose).

    @triton.jit
    def _tc_fwd_kernel(Q, K, V, O, LSE, IDX, CH, CNT, LENS, L, scale, dropout_p, SEED,
                    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sib, sih, sil, scb, sch, sct, snb, snh,
                    HKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
                    S: tl.constexpr, S_P2: tl.constexpr, PATTERN: tl.constexpr, BLOCK: tl.constexpr,
                    UNIFORM: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr, QB: tl.constexpr,
                    KB: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, WALK: tl.constexpr):
        seed = tl.load(SEED)  # on the device: a replayed CUDA graph draws a new one
        b, hkv, t, row_ok, offs_d, d_ok, row, row_mask, bh = _tile_rows(Q, L, sqb, sqh, sql, QB, HKV, G, G_P2, D,
                                                                        D_P2)
        q = tl.load(Q + row, mask=row_mask, other=0.0)
        offs_s = tl.arange(0, S_P2)
        row_idx = tl.load(IDX + b * sib + hkv * sih + t[:, None] * sil + offs_s[None, :],
                          mask=row_ok[:, None] & (offs_s < S)[None, :], other=-1)
        Kb, Vb = K + b * skb + hkv * skh, V + b * svb + hkv * svh  # this kv head's keys and values
        m = tl.full([QB * G_P2], float("-inf"), tl.float32)
        den = tl.zeros([QB * G_P2], tl.float32)
        acc = tl.zeros([QB * G_P2, D_P2], tl.float32)
        if WALK == 2:
            for u in range(0, QB * S):
                j = _slot_block(IDX, b, hkv, sib, sih, sil, L, u, row_idx, QB, G_P2, S, S_P2)
                if j >= 0:
                    for r in tl.static_range(BLOCK // KB):
                        m, den, acc = _fwd_chunk(q, Kb, Vb, j * (BLOCK // KB) + r, t, row_ok, row_idx, bh,
                                                 offs_d, d_ok, L, scale, dropout_p, seed, m, den, acc, skl, svl,
                                                 PATTERN, BLOCK, UNIFORM, WINDOW, SINK, KB, DROPOUT, PRECISION)
        else:
            n, ch = _chunk_walk(CH, CNT, L, b, hkv, scb, sch, sct, snb, snh, QB, KB, WALK)
            for u in range(0, n):
                if WALK == 1:  # chunk u is visited when the tile's presence byte says so
                    c = u
                    go = tl.load(ch + u) != 0
                else:  # the u-th chunk of the tile's list
                    c = tl.load(ch + u)
                    go = True  # every listed chunk is visited: no branch in the compiled loop
                if go:
                    m, den, acc = _fwd_chunk(q, Kb, Vb, c, t, row_ok, row_idx, bh, offs_d, d_ok, L, scale,
                                             dropout_p, seed, m, den, acc, skl, svl, PATTERN, BLOCK, UNIFORM, WINDOW,
                                             SINK, KB, DROPOUT, PRECISION)
        den_safe = tl.where(den > 0.0, den, 1.0)
        out = tl.where((t < tl.load(LENS + b))[:, None], acc / den_safe[:, None], 0.0)  # padding rows: 0
        tl.store(O + row, out.to(O.dtype.element_ty), mask=row_mask)
        tl.store(LSE + bh * L + t, m + tl.log(den_safe), mask=row_ok)

    @triton.jit
    def _tc_bwd_kernel(Q, K, V, O, DO, DQ, DK, DV, LSE, IDX, CH, CNT, LENS, L, scale, dropout_p, SEED,
                    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sib, sih, sil, scb, sch, sct, snb, snh,
                    HKV: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
                    S: tl.constexpr, S_P2: tl.constexpr, PATTERN: tl.constexpr, BLOCK: tl.constexpr,
                    UNIFORM: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr, QB: tl.constexpr,
                    KB: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, WALK: tl.constexpr,
                    ACC_DQ: tl.constexpr):
        """dq of the tile's rows (added to what ``DQ`` holds with ``ACC_DQ``: the second branch of a fused
        call); dk, dv of each visited chunk summed over the tile's rows in one tl.dot, then added into float32
        buffers with atomics (other tiles visit the same chunk)."""
        seed = tl.load(SEED)  # on the device: a replayed CUDA graph draws a new one
        b, hkv, t, row_ok, offs_d, d_ok, row, row_mask, bh = _tile_rows(Q, L, sqb, sqh, sql, QB, HKV, G, G_P2, D,
                                                                        D_P2)
        q = tl.load(Q + row, mask=row_mask, other=0.0)
        do = tl.load(DO + row, mask=row_mask & (t < tl.load(LENS + b))[:, None], other=0.0)  # padding: no grad
        lse = tl.load(LSE + bh * L + t, mask=row_ok, other=0.0)
        # delta = rowsum(dO * O) here rather than in PyTorch: no extra launches (O is 0 on padding rows)
        delta = tl.sum(do.to(tl.float32) * tl.load(O + row, mask=row_mask, other=0.0).to(tl.float32), axis=1)
        offs_s = tl.arange(0, S_P2)
        row_idx = tl.load(IDX + b * sib + hkv * sih + t[:, None] * sil + offs_s[None, :],
                          mask=row_ok[:, None] & (offs_s < S)[None, :], other=-1)
        Kb, Vb = K + b * skb + hkv * skh, V + b * svb + hkv * svh  # this kv head's keys and values
        out_base = tl.program_id(1).to(tl.int64) * L * D
        dq = tl.zeros([QB * G_P2, D_P2], tl.float32)
        if WALK == 2:
            for u in range(0, QB * S):
                j = _slot_block(IDX, b, hkv, sib, sih, sil, L, u, row_idx, QB, G_P2, S, S_P2)
                if j >= 0:
                    for r in tl.static_range(BLOCK // KB):
                        dq = _bwd_chunk(q, do, lse, delta, Kb, Vb, DK, DV, out_base, j * (BLOCK // KB) + r,
                                        t, row_ok, row_idx, bh, offs_d, d_ok, L, scale, dropout_p, seed, dq, skl,
                                        svl, D, PATTERN, BLOCK, UNIFORM, WINDOW, SINK, KB, DROPOUT, PRECISION)
        else:
            n, ch = _chunk_walk(CH, CNT, L, b, hkv, scb, sch, sct, snb, snh, QB, KB, WALK)
            for u in range(0, n):
                if WALK == 1:
                    c = u
                    go = tl.load(ch + u) != 0
                else:
                    c = tl.load(ch + u)
                    go = True  # every listed chunk is visited: no branch in the compiled loop
                if go:
                    dq = _bwd_chunk(q, do, lse, delta, Kb, Vb, DK, DV, out_base, c, t, row_ok, row_idx, bh,
                                    offs_d, d_ok, L, scale, dropout_p, seed, dq, skl, svl, D, PATTERN, BLOCK, UNIFORM,
                                    WINDOW, SINK, KB, DROPOUT, PRECISION)
        dq = dq * scale
        if ACC_DQ:
            dq += tl.load(DQ + row, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(DQ + row, dq.to(DQ.dtype.element_ty), mask=row_mask)

    # --- RoPE of q and k in one launch --------------------------------------------------------------------
    @triton.jit
    def _rope_rows(X, COS, SIN, b, h, L, sxb, sxh, sxl, sign, HALF: tl.constexpr, HALF_P2: tl.constexpr,
                   BL: tl.constexpr):
        """``BL`` positions of one (batch, head) of ``X`` (any strides, last 1) rotated, in float32:
        ``y1 = x1 cos - sign x2 sin, y2 = sign x1 sin + x2 cos`` (sign -1: the inverse rotation)."""
        t = tl.program_id(0) * BL + tl.arange(0, BL)
        d = tl.arange(0, HALF_P2)
        mask = (t < L)[:, None] & (d < HALF)[None, :]
        src = X + b * sxb + h * sxh + t[:, None] * sxl + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        ang = t[:, None] * HALF + d[None, :]
        cos = tl.load(COS + ang, mask=mask, other=0.0)
        sin = tl.load(SIN + ang, mask=mask, other=0.0) * sign
        return x1 * cos - x2 * sin, x1 * sin + x2 * cos, mask, t

    @triton.jit
    def _rope_kernel(Q, K, QO, KO, COS, SIN, L, sqb, sqh, sql, skb, skh, skl, sign, H: tl.constexpr,
                     HKV: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, BL: tl.constexpr):
        """Program ``(position tile, batch x (H + HKV) heads)``: heads ``< H`` rotate q, the others k."""
        b, h = (tl.program_id(1) // (H + HKV)).to(tl.int64), tl.program_id(1) % (H + HKV)
        if h < H:
            y1, y2, mask, t = _rope_rows(Q, COS, SIN, b, h, L, sqb, sqh, sql, sign, HALF, HALF_P2, BL)
            dst = QO + (b * H + h) * L * (2 * HALF) + t[:, None] * (2 * HALF) + tl.arange(0, HALF_P2)[None, :]
            tl.store(dst, y1.to(QO.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, y2.to(QO.dtype.element_ty), mask=mask)
        else:
            y1, y2, mask, t = _rope_rows(K, COS, SIN, b, h - H, L, skb, skh, skl, sign, HALF, HALF_P2, BL)
            dst = KO + (b * HKV + h - H) * L * (2 * HALF) + t[:, None] * (2 * HALF) + tl.arange(0, HALF_P2)[None, :]
            tl.store(dst, y1.to(KO.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, y2.to(KO.dtype.element_ty), mask=mask)

    # --- the gate: sigmoid, gated sum of the branches, output layout, in one launch each way ----------------
    @triton.jit
    def _gate_kernel(LOG, A, BR, OUT, DOUT, DA, DB, DLOG, L, slb, sll, sob, sol, BACKWARD: tl.constexpr,
                     H: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, BL: tl.constexpr):
        """Program ``(position tile, batch x head)``. Forward: ``OUT[b, t, h*D:] = g_a A[b, h, t] + g_b BR[b, h, t]``
        with ``g = sigmoid(LOG[b, t, h]), sigmoid(LOG[b, t, H + h])``. Backward: ``DA, DB`` and ``DLOG`` from
        ``DOUT`` (strides ``sob, sol`` as ``OUT``'s)."""
        b, h = (tl.program_id(1) // H).to(tl.int64), tl.program_id(1) % H
        t = tl.program_id(0) * BL + tl.arange(0, BL)
        d = tl.arange(0, D_P2)
        t_ok = t < L
        mask = t_ok[:, None] & (d < D)[None, :]
        g_a = tl.sigmoid(tl.load(LOG + b * slb + t * sll + h, mask=t_ok, other=0.0).to(tl.float32))
        g_b = tl.sigmoid(tl.load(LOG + b * slb + t * sll + H + h, mask=t_ok, other=0.0).to(tl.float32))
        branch = (b * H + h) * L * D + t[:, None] * D + d[None, :]  # contiguous (B, H, L, D)
        out = b * sob + t[:, None] * sol + h * D + d[None, :]
        a = tl.load(A + branch, mask=mask, other=0.0).to(tl.float32)
        br = tl.load(BR + branch, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            dout = tl.load(DOUT + out, mask=mask, other=0.0).to(tl.float32)
            tl.store(DA + branch, (g_a[:, None] * dout).to(DA.dtype.element_ty), mask=mask)
            tl.store(DB + branch, (g_b[:, None] * dout).to(DB.dtype.element_ty), mask=mask)
            dlog = DLOG + b * L * 2 * H + t * 2 * H + h  # contiguous (B, L, 2H), the logits' dtype
            tl.store(dlog, (tl.sum(dout * a, axis=1) * g_a * (1.0 - g_a)).to(DLOG.dtype.element_ty), mask=t_ok)
            tl.store(dlog + H, (tl.sum(dout * br, axis=1) * g_b * (1.0 - g_b)).to(DLOG.dtype.element_ty), mask=t_ok)
        else:
            tl.store(OUT + out, (g_a[:, None] * a + g_b[:, None] * br).to(OUT.dtype.element_ty), mask=mask)

    # --- LTIS block compression: window gather, positions, MLP, in one launch ------------------------------
    @triton.jit
    def _compress_kernel(K, POS, W1, B1, W2, B2, OUT, NC, skb, skh, skl, HKV: tl.constexpr, D: tl.constexpr,
                         D_P2: tl.constexpr, H2_P2: tl.constexpr, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr,
                         BC: tl.constexpr, KC: tl.constexpr, PRECISION: tl.constexpr):
        """Program ``(BC compressed blocks, batch x kv head)``: ``gelu(x W1^T + b1) W2^T + b2`` of each block's
        flattened window ``x`` (keys plus positions), float32 values with ``PRECISION`` products; the windows
        are read straight from ``K`` (nothing unfolded or copied)."""
        b, h = (tl.program_id(1) // HKV).to(tl.int64), tl.program_id(1) % HKV
        i = tl.program_id(0) * BC + tl.arange(0, BC)
        i_ok = i < NC
        f = tl.arange(0, H2_P2)  # hidden features of the MLP (2D, padded)
        f_ok = f < 2 * D
        hid = tl.zeros([BC, H2_P2], tl.float32)
        for e0 in range(0, BLOCK_LEN * D, KC):  # the flattened window, KC entries (position-major) at a time
            e = e0 + tl.arange(0, KC)
            e_ok = e < BLOCK_LEN * D
            j, d = e // D, e % D
            x = tl.load(K + b * skb + h * skh + (i[:, None] * STRIDE + j[None, :]) * skl + d[None, :],
                        mask=i_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
            x += tl.load(POS + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
            w1 = tl.load(W1 + f[None, :] * (BLOCK_LEN * D) + e[:, None], mask=e_ok[:, None] & f_ok[None, :],
                         other=0.0).to(tl.float32)  # (KC, 2D): W1 transposed
            hid += tl.dot(x, w1, input_precision=PRECISION)
        hid += tl.load(B1 + f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        hid = 0.5 * hid * (1.0 + tl.erf(hid * 0.7071067811865476))  # exact GELU, as nn.GELU()
        o = tl.arange(0, D_P2)
        o_ok = o < D
        w2 = tl.load(W2 + o[None, :] * (2 * D) + f[:, None], mask=f_ok[:, None] & o_ok[None, :],
                     other=0.0).to(tl.float32)  # (2D, D): W2 transposed
        out = tl.dot(hid, w2, input_precision=PRECISION) + tl.load(B2 + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + (b * HKV + h) * NC * D + i[:, None] * D + o[None, :], out.to(OUT.dtype.element_ty),
                 mask=i_ok[:, None] & o_ok[None, :])


QB = 16  # query positions per tile of the attention kernels (x the kv group's heads = the tile's rows)
KB = 16  # keys per chunk
# LTIS kernels (bf16/fp16; benchmarks/NOTES.md has the measurements):
# * blocks of whole chunks (the reference sizes): tiles of 16 rows (16 / G positions x the G heads of a kv head)
#   that read their own selected slots (WALK 2). A 64-row tile's union of choices was 45.9 chunks at L = 8192
#   for 5 blocks a query, most of its work masked out; a 16-row tile visits at most QB * S blocks, builds
#   nothing, and per call was as fast or faster at every L measured (200 to 32,768).
# * other block sizes: 16-position tiles scanning presence bytes (WALK 1) up to TC_MAX_LEN, beyond it the
#   CUDA-core gather kernels (the presence scan grows with L).
SLOT_WALK_MIN_LEN = 0
TC_MAX_LEN = 8192


def select_blocks(q, k_cmp, mem_key, block_len, stride, select_size, n_select, chunk_size=1024, scale=None,
                  pool="probs", *, bt=64, bc=32, precision=None, num_warps=4):
    """Fused twin of :func:`recbole_blossom.ops.naive.select_blocks` (``chunk_size`` is not needed here:
    nothing ``L x Nc`` is stored). Slots come in no particular order. ``bt, bc, precision, num_warps`` tune
    the kernel (``benchmarks/kernels.py``); ``precision`` defaults to exact products for float32 ``q`` (the
    choice then matches the PyTorch path's up to summation order) and TF32 for bf16/fp16 ``q``."""
    B, H, L, D = q.shape
    precision = precision or ("ieee" if q.dtype == torch.float32 else "tf32")
    Hkv, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    pool_heads = H // Hkv if pool == "logits" else 1  # logits: the kernel scores the group-mean query
    H = H // pool_heads
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # the kernel converts on load and reads q through its strides: no float32 copies, and no copy of a q that is
    # a view of the layer's fused projection (without RoPE; it cost a (B, H, L, D) copy a layer)
    q, k_cmp, mem_key = _last_dim_dense(q.detach()), _last_dim_dense(k_cmp.detach()), mem_key.detach().contiguous()
    idx = torch.empty(B, Hkv, L, n_select + 1, dtype=torch.int32, device=q.device)
    launch(_select_kernel, (_cdiv(L, bt), B * Hkv),
           q, k_cmp, mem_key, idx, L, n_cmp, scale, *q.stride()[:3], *k_cmp.stride()[:3], *idx.stride()[:3],
           HKV=Hkv, G=H // Hkv, D=D, D_P2=max(16, _next_pow2(D)), BLOCK_LEN=block_len, STRIDE=stride,
           SEL=select_size, N_SEL=n_select, N_SEL_P2=_next_pow2(n_select),
           N_OV=overlap_count(block_len, stride, select_size), G_P2=_next_pow2(H // Hkv), BT=bt, BC=bc,
           PRECISION=precision, POOL=pool_heads, num_warps=num_warps)
    return idx


def _launch_args(q, k, idx, block):
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    n_slots = idx.shape[-1]
    block_p2 = _next_pow2(block)
    chunk = max(CHUNK, block_p2)
    slots_per_chunk = chunk // block_p2
    meta = dict(H=H, HKV=Hkv, G=H // Hkv, D=D, D_P2=_next_pow2(D), N_SLOTS=n_slots, BLOCK=block,
                BLOCK_P2=block_p2, SLOTS_PER_CHUNK=slots_per_chunk, N_CHUNKS=-(-n_slots // slots_per_chunk),
                CHUNK_=chunk)
    strides = (*q.stride()[:3], *k.stride()[:3], *idx.stride()[:3])
    return meta, strides


def _rows_per_tile(G):
    """Positions per tile of the forward/dq kernels: 32 rows of (position, head)."""
    return max(1, 32 // _next_pow2(G))


class _GatheredAttention(torch.autograd.Function):
    """``out[b, h, t] = softmax_j(q . k[pos_j] * scale) v[pos_j]`` over the slots ``idx[b, h // G, t]``."""

    @staticmethod
    def forward(ctx, q, k, v, idx, lengths, block, scale, dropout_p):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        meta, strides = _launch_args(q, k, idx, block)
        seed = _seeds(dropout_p, lengths)[0]
        out = torch.empty_like(q)
        lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        bt = _rows_per_tile(H // Hkv)
        launch(_fwd_kernel, (_cdiv(L, bt), B * Hkv), q, k, v, out, lse, idx, lengths, L, scale, dropout_p, seed,
               *strides, G_P2=_next_pow2(H // Hkv), BT=bt, DROPOUT=dropout_p > 0.0,
               num_warps=4, **meta)
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
        launch(_bwd_dq_kernel, (_cdiv(L, bt), B * Hkv), q, k, v, dout, dq, *common,
               G_P2=_next_pow2(H // Hkv), BT=bt, DROPOUT=ctx.dropout_p > 0.0, num_warps=4, **meta)
        dk = torch.zeros(B, Hkv, L, D, device=q.device, dtype=torch.float32)
        dv = torch.zeros_like(dk)
        launch(_bwd_dkdv_kernel, (_cdiv(L, 16), B * Hkv), q, k, v, dout, dk, dv, *common,
               BT=16, DROPOUT=ctx.dropout_p > 0.0, num_warps=4, **meta)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


_BIG = 2 ** 30


def tile_chunks(idx, block, length):
    """Key chunks each query tile visits: the union over its ``QB`` queries of the ``KB``-key chunks that
    meet their slots. ``idx`` ``(B', H', L, S)`` slots (``-1`` empty) of ``block`` keys each. Returns
    ``chunks`` ``(B', H', T, U)`` int32 (ascending, ``-1`` after the ``counts`` ``(B', H', T)`` valid ones),
    ``T = ceil(L / QB)``."""
    Bp, Hp, L, S = idx.shape
    j = idx.long()
    span = _span(block)
    first, last = j * block // KB, ((j + 1) * block - 1) // KB
    c = first[..., None] + torch.arange(span, device=idx.device)
    t = torch.arange(L, device=idx.device).view(L, 1, 1)
    # chunk c holds a key of block j at or before the query: max(block start, chunk start) <= the query, the
    # block's end and the chunk's end
    lo = torch.maximum(j[..., None] * block, c * KB)
    seen = (j[..., None] >= 0) & (c <= last[..., None]) & (lo <= t) & (lo <= c * KB + KB - 1)
    c = torch.where(seen, c, _BIG).flatten(-2)
    T = -(-length // QB)
    c = torch.nn.functional.pad(c, (0, 0, 0, T * QB - L), value=_BIG).view(Bp, Hp, T, -1)
    c = c.sort(-1).values
    dup = torch.zeros_like(c, dtype=torch.bool)
    dup[..., 1:] = c[..., 1:] == c[..., :-1]
    c = c.masked_fill(dup, _BIG).sort(-1).values
    counts = (c < _BIG).sum(-1, dtype=torch.int32)
    return torch.where(c < _BIG, c, -1).to(torch.int32), counts


def _span(block):
    """Most KB-key chunks one selection block of ``block`` keys can meet."""
    return block // KB if block % KB == 0 else -(-(block - 1) // KB) + 1


def tile_presence(idx, block, length):
    """The chunks of :func:`tile_chunks` as presence bytes, built by one kernel without sorting: ``(B', H', T,
    NCH)`` uint8, 1 where query tile ``t`` visits chunk ``c`` (``NCH = ceil(L / KB)``)."""
    Bp, Hp, L, S = idx.shape
    T, n_chunks = -(-length // QB), -(-length // KB)
    presence = torch.zeros(Bp, Hp, T, n_chunks, dtype=torch.uint8, device=idx.device)
    launch(_presence_kernel, (T, Bp * Hp), idx, presence, L, *idx.stride()[:3], *presence.stride()[:3], HP=Hp,
           S=S, S_P2=_next_pow2(S), QB=QB, KB=KB, BLOCK=block, SPAN=_span(block))
    return presence


def stis_tile_chunks(length, window, sink, device):
    """:func:`tile_chunks` of the STIS pattern (the same for every batch row and kv head), ``(1, 1, T, U)``."""
    return tile_chunks(stis_slots(length, window, sink, device), 1, length)


def _seeds(dropout_p, lengths):
    """Dropout seeds of two independent streams (LTIS, STIS), each a one-element int32 tensor on the device that
    the kernels read: drawn from PyTorch's generator of that device, so ``torch.manual_seed`` repeats the masks,
    and a CUDA graph that records the draw draws new seeds at each replay (a host integer would be recorded as a
    constant, and every replayed training step would drop the same scores). Without dropout no draw: ``lengths``
    is passed in their place and its value is never used."""
    if dropout_p == 0.0:
        return lengths, lengths
    seeds = torch.randint(0, 2 ** 30, (2,), device=lengths.device, dtype=torch.int32)
    return seeds[:1], seeds[1:]


def _block_forward(q, k, v, idx, chunks, counts, lengths, plan, scale, dropout_p, seed):
    """Launch the tensor-core forward: ``out`` (``q``'s layout) and the log-sum-exp ``(B, H, L)`` float32.
    ``q`` contiguous (its strides are also out's, dout's and dq's); ``k, v`` are read through their own strides,
    so the views of the fused projection need no copy."""
    B, H, L, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    launch(_tc_fwd_kernel, _grid(q, k, plan), q, k, v, out, lse, idx, chunks, counts, lengths, L, scale, dropout_p,
           seed, *_strides(q, k, v, idx, chunks, counts), **_meta_of(q, k, idx, plan, dropout_p))
    return out, lse


def _block_backward(q, k, v, out, dout, lse, idx, chunks, counts, lengths, plan, scale, dropout_p, seed, dq, dkv,
                    acc_dq):
    """Launch the tensor-core backward: writes ``dq`` (adds to it with ``acc_dq``) and adds dk, dv into the
    float32 ``dkv`` ``(2, B, Hkv, L, D)``."""
    launch(_tc_bwd_kernel, _grid(q, k, plan), q, k, v, out, dout, dq, dkv[0], dkv[1], lse, idx, chunks, counts,
           lengths, q.shape[2], scale, dropout_p, seed, *_strides(q, k, v, idx, chunks, counts),
           ACC_DQ=acc_dq, **_meta_of(q, k, idx, plan, dropout_p))


def _dense_inputs(q, k, v):
    return q.contiguous(), _last_dim_dense(k), _last_dim_dense(v)


class _BlockAttention(torch.autograd.Function):
    """Forward and backward of :func:`gathered_attention` / :func:`stis_attention` on tensor cores."""

    @staticmethod
    def forward(ctx, q, k, v, idx, chunks, counts, plan, lengths, scale, dropout_p):
        q, k, v = _dense_inputs(q, k, v)
        seed = _seeds(dropout_p, lengths)[0]
        out, lse = _block_forward(q, k, v, idx, chunks, counts, lengths, plan, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, idx, chunks, counts, lengths)
        ctx.plan, ctx.scale, ctx.dropout_p, ctx.seed = plan, scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, idx, chunks, counts, lengths = ctx.saved_tensors
        dq = torch.empty_like(q)
        dkv = torch.zeros(2, *k.shape, device=k.device, dtype=torch.float32)  # one fill and one cast for both
        _block_backward(q, k, v, out, dout.contiguous(), lse, idx, chunks, counts, lengths, ctx.plan, ctx.scale,
                        ctx.dropout_p, ctx.seed, dq, dkv, False)
        dk, dv = dkv.to(k.dtype).unbind(0)
        return dq, dk, dv, None, None, None, None, None, None, None


def _branch_forward(q, k, v, logits, lengths, idx, chunks, counts, plan, s_idx, s_chunks, s_counts, s_plan, scale,
                    dropout_p):
    """Both tensor-core branches and the gate, forward: ``(out, seed, dense q, k, v, logits, ltis, lse, stis,
    s_lse)`` (what :class:`_BranchAttention` saves)."""
    q, k, v = _dense_inputs(q, k, v)
    logits = _last_dim_dense(logits)
    seed = _seeds(dropout_p, lengths)  # (LTIS's, STIS's): two independent streams
    ltis, lse = _block_forward(q, k, v, idx, chunks, counts, lengths, plan, scale, dropout_p, seed[0])
    stis, s_lse = _block_forward(q, k, v, s_idx, s_chunks, s_counts, lengths, s_plan, scale, dropout_p, seed[1])
    B, H, L, D = q.shape
    out = torch.empty(B, L, H * D, device=q.device, dtype=q.dtype)
    _gate_launch(logits, ltis, stis, out, out, ltis, stis, logits, backward=False)
    return out, seed, q, k, v, logits, ltis, lse, stis, s_lse


def _needs_grad(*tensors):
    """Whether autograd will want a backward of an op on ``tensors`` (else the op skips its autograd node: in
    inference each ``Function.apply`` costs the host time and there is nothing to save)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _BranchAttention(torch.autograd.Function):
    """:func:`branch_attention` in one autograd node: LTIS and STIS forward, the gate; backward: the gate, then
    both branches' kernels into one dq (the second adds) and one dk/dv buffer (one fill, one cast). One node
    instead of three saves the host the Python of two autograd calls and of the gradient sums each way."""

    @staticmethod
    def forward(ctx, q, k, v, logits, lengths, idx, chunks, counts, plan, s_idx, s_chunks, s_counts, s_plan, scale,
                dropout_p):
        out, seed, q, k, v, logits, ltis, lse, stis, s_lse = _branch_forward(
            q, k, v, logits, lengths, idx, chunks, counts, plan, s_idx, s_chunks, s_counts, s_plan, scale, dropout_p)
        ctx.save_for_backward(q, k, v, logits, lengths, ltis, lse, idx, chunks, counts, stis, s_lse, s_idx, s_chunks,
                              s_counts)
        ctx.plans, ctx.scale, ctx.dropout_p, ctx.seed = (plan, s_plan), scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, logits, lengths, ltis, lse, idx, chunks, counts, stis, s_lse, s_idx, s_chunks, s_counts = \
            ctx.saved_tensors
        dout = _last_dim_dense(dout)
        d_ltis, d_stis = torch.empty_like(ltis), torch.empty_like(stis)
        dlog = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
        _gate_launch(logits, ltis, stis, dout, dout, d_ltis, d_stis, dlog, backward=True)
        dq = torch.empty_like(q)
        dkv = torch.zeros(2, *k.shape, device=k.device, dtype=torch.float32)
        plan, s_plan = ctx.plans
        p, seed = ctx.dropout_p, ctx.seed
        _block_backward(q, k, v, ltis, d_ltis, lse, idx, chunks, counts, lengths, plan, ctx.scale, p, seed[0], dq,
                        dkv, False)
        _block_backward(q, k, v, stis, d_stis, s_lse, s_idx, s_chunks, s_counts, lengths, s_plan, ctx.scale, p,
                        seed[1], dq, dkv, True)
        dk, dv = dkv.to(k.dtype).unbind(0)
        return (dq, dk, dv, dlog) + (None,) * 11


def _grid(q, k, plan):
    return (_cdiv(q.shape[2], plan.qb), q.shape[0] * k.shape[1])


def _strides(q, k, v, idx, chunks, counts):
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *idx.stride()[:3], *chunks.stride()[:3],
            *counts.stride()[:2])


class Plan(NamedTuple):
    """How the tensor-core kernels run: ``pattern`` ``"slots"`` (LTIS, with ``block``) or ``"stis"`` (with
    ``window, sink``), ``walk`` (how a tile finds its chunks) and ``qb`` (positions per tile)."""
    pattern: str
    walk: int
    qb: int
    block: int = 1
    window: int = 0
    sink: bool = False


def _meta_of(q, k, idx, plan, dropout_p):
    return _meta(q.shape[1], k.shape[1], q.shape[3], idx.shape[-1], q.dtype == torch.float32, plan, dropout_p > 0.0)


@functools.lru_cache(maxsize=None)
def _meta(H, Hkv, D, S, fp32, plan, dropout):
    """Compile-time arguments of the tensor-core kernels (cached: building the dict cost ~13 us a launch). A tile of
    16 rows (LTIS: 4 positions x 4 heads) runs on one warp: two split each 16 x 16 product and the online softmax
    between them, and took 1.2-1.7x the forward time (``benchmarks/kernels.py --warps``, ``benchmarks/NOTES.md`` v8)."""
    stis = plan.pattern == "stis"
    G_P2 = _next_pow2(H // Hkv)
    return dict(HKV=Hkv, G=H // Hkv, G_P2=G_P2, D=D, D_P2=max(16, _next_pow2(D)), S=S,
                S_P2=_next_pow2(S), PATTERN=1 if stis else 0, BLOCK=plan.block,
                UNIFORM=plan.block % KB == 0, WINDOW=plan.window, SINK=plan.sink, QB=plan.qb, KB=KB, DROPOUT=dropout,
                PRECISION="ieee" if fp32 else "tf32", WALK=plan.walk, num_warps=4 if plan.qb * G_P2 > 16 else 1)


_PLACEHOLDERS = {}  # device -> tiny int32 tensors for kernel arguments a walk does not read (no launch per call)


def _placeholder(device, fill):
    """A ``(1, 1, 1, 1)`` int32 tensor of ``fill`` on ``device``, made once (only its pointer and strides are
    passed; kernels that read it are given real data)."""
    key = (str(device), fill)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.full((1, 1, 1, 1), fill, dtype=torch.int32, device=device)
    return _PLACEHOLDERS[key]


def _prepare(q, lengths, dropout_p, training, scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = float(dropout_p) if training else 0.0
    if lengths is None:
        lengths = torch.full((q.shape[0],), q.shape[2], device=q.device, dtype=torch.int32)
    return lengths.to(torch.int32), scale, p


LTIS_KERNELS = ("auto", "presence", "slots", "gather")


def ltis_kernel(q, block):
    """Which kernels :func:`gathered_attention` runs by default for ``q`` and blocks of ``block`` keys (see
    ``SLOT_WALK_MIN_LEN``): ``gather`` in float32 (exact products), else ``slots`` or ``presence``."""
    L = q.shape[2]
    if q.dtype == torch.float32:
        return "gather"
    if block % KB == 0 and L >= SLOT_WALK_MIN_LEN:
        return "slots"
    return "presence" if L <= TC_MAX_LEN else "gather"


def _ltis_inputs(q, k, idx, block, kernel):
    """``(idx, chunks, counts, plan)`` of the tensor-core LTIS kernels (``kernel`` ``slots`` or ``presence``),
    broadcast to ``(B, Hkv, ...)``."""
    if kernel == "slots":
        chunks = _placeholder(q.device, 0)  # unused: each tile reads its own slots
        plan = Plan("slots", walk=2, qb=max(1, 16 // _next_pow2(q.shape[1] // k.shape[1])), block=block)
    else:
        chunks = tile_presence(idx, block, q.shape[2])
        plan = Plan("slots", walk=1, qb=QB, block=block)
    counts = _placeholder(q.device, 0)[0]  # unused: only list walks (STIS) read counts
    expand = (q.shape[0], k.shape[1])
    idx, chunks, counts = (x.expand(*expand, *x.shape[2:]) for x in (idx, chunks, counts))
    return idx, chunks, counts, plan


_STIS_CHUNKS = {}  # (L, window, sink, device) -> tile chunks: the pattern depends on L only


def _stis_inputs(q, k, window, sink):
    """``(idx, chunks, counts, plan)`` of the tensor-core STIS kernels: a fixed chunk list per L, no slots."""
    key = (q.shape[2], window, bool(sink), str(q.device))
    if key not in _STIS_CHUNKS:
        _STIS_CHUNKS[key] = stis_tile_chunks(q.shape[2], window, sink, q.device)
    chunks, counts = _STIS_CHUNKS[key]
    expand = (q.shape[0], k.shape[1])
    chunks, counts = chunks.expand(*expand, *chunks.shape[2:]), counts.expand(*expand, counts.shape[-1])
    dummy = _placeholder(q.device, -1).expand(*expand, q.shape[2], 1)  # STIS reads no slots: all empty
    return dummy, chunks, counts, Plan("stis", walk=0, qb=QB, window=window, sink=bool(sink))


def _ltis_kernel_checked(q, block, kernel):
    if kernel not in LTIS_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(LTIS_KERNELS)}; got {kernel!r}")
    kernel = ltis_kernel(q, block) if kernel == "auto" else kernel
    if kernel == "slots" and block % KB:
        raise ValueError(f"kernel='slots' needs blocks of whole {KB}-key chunks; got block={block}")
    return kernel


def gathered_attention(q, k, v, idx, block, lengths=None, dropout_p=0.0, training=False, scale=None, *,
                       kernel="auto"):
    """Triton twin of :func:`recbole_blossom.ops.naive.gathered_attention` (same arguments and result;
    ``idx`` int32, its first two dims may be broadcast with stride 0). ``kernel`` (default :func:`ltis_kernel`):
    ``presence`` / ``slots``, tensor cores over each tile's chunks (WALK 1 / 2 of the kernels); ``gather``, the
    CUDA-core kernels over each query's own gathered keys."""
    kernel = _ltis_kernel_checked(q, block, kernel)
    lengths, scale, p = _prepare(q, lengths, dropout_p, training, scale)
    idx = idx.to(torch.int32)
    if kernel == "gather":
        expand = (q.shape[0], k.shape[1])
        return _GatheredAttention.apply(q, k, v, idx.expand(*expand, *idx.shape[2:]), lengths, block, scale, p)
    return _BlockAttention.apply(q, k, v, *_ltis_inputs(q, k, idx, block, kernel), lengths, scale, p)


def stis_attention(q, k, v, window, sink, lengths=None, dropout_p=0.0, training=False, scale=None):
    """Triton twin of :func:`recbole_blossom.ops.naive.stis_attention`. bfloat16/float16: the tensor-core kernels
    with the STIS mask computed from the offsets (no slot tensor is read); float32: :func:`gathered_attention`
    over the STIS slots."""
    if q.dtype == torch.float32:
        return gathered_attention(q, k, v, cached_stis_slots(q.shape[2], window, bool(sink), str(q.device)), 1,
                                  lengths, dropout_p, training, scale)
    lengths, scale, p = _prepare(q, lengths, dropout_p, training, scale)
    return _BlockAttention.apply(q, k, v, *_stis_inputs(q, k, window, sink), lengths, scale, p)


def branch_attention(q, k, v, idx, block, window, sink, logits, lengths=None, dropout_p=0.0, training=False,
                     scale=None, *, kernel="auto"):
    """Triton twin of :func:`recbole_blossom.ops.naive.branch_attention`. Where both branches run on the
    tensor-core kernels (bfloat16/float16 by default, LTIS selecting), one autograd node
    (:class:`_BranchAttention`); otherwise the branch ops one by one (float32 by default: the exact gather
    kernels; ``idx`` None: LTIS is causal attention). ``kernel``: as :func:`gathered_attention`'s."""
    kernel = None if idx is None else _ltis_kernel_checked(q, block, kernel)  # auto: gather in float32
    if kernel in (None, "gather"):
        if kernel == "gather" and q.dtype == torch.float32:  # both branches run the gather kernels, which need
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # dense q, k, v: copy (and save) them once
        ltis = (naive.causal_attention(q, k, v, lengths, dropout_p, training, scale) if idx is None else
                gathered_attention(q, k, v, idx, block, lengths, dropout_p, training, scale, kernel=kernel))
        return gate_combine(logits, ltis, stis_attention(q, k, v, window, sink, lengths, dropout_p, training, scale))
    lengths, scale, p = _prepare(q, lengths, dropout_p, training, scale)
    inputs = (q, k, v, logits, lengths, *_ltis_inputs(q, k, idx.to(torch.int32), block, kernel),
              *_stis_inputs(q, k, window, sink), scale, p)
    if not _needs_grad(q, k, v, logits):
        return _branch_forward(*inputs)[0]
    return _BranchAttention.apply(*inputs)


def _rope(q, k, cos, sin, sign):
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    q, k = _last_dim_dense(q), _last_dim_dense(k)
    q_out = torch.empty(B, H, L, D, device=q.device, dtype=q.dtype)
    k_out = torch.empty(B, Hkv, L, D, device=k.device, dtype=k.dtype)
    bl = 64
    launch(_rope_kernel, (_cdiv(L, bl), B * (H + Hkv)), q, k, q_out, k_out, cos, sin, L, *q.stride()[:3],
           *k.stride()[:3], sign, H=H, HKV=Hkv, HALF=D // 2, HALF_P2=_next_pow2(D // 2), BL=bl, num_warps=2)
    return q_out, k_out


class _Rotary(torch.autograd.Function):
    """RoPE forward; its backward is the inverse rotation of the incoming gradients (same kernel, sign -1)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(q, k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = _rope(dq, dk, cos, sin, -1.0)
        return dq_in, dk_in, None, None


def rotary(q, k, cos, sin):
    """Triton twin of :func:`recbole_blossom.ops.naive.rotary`: one launch for q and k (any strides in,
    contiguous out), products in float32 (the PyTorch path multiplies in the input dtype)."""
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    return _Rotary.apply(q, k, cos, sin) if _needs_grad(q, k) else _rope(q, k, cos, sin, 1.0)


def _gate_launch(logits, a, br, out, dout, da, db, dlog, backward):
    B, H, L, D = a.shape
    bl = 64
    launch(_gate_kernel, (_cdiv(L, bl), B * H), logits, a, br, out, dout, da, db, dlog, L, logits.stride(0),
           logits.stride(1), out.stride(0), out.stride(1), BACKWARD=backward, H=H, D=D, D_P2=_next_pow2(D), BL=bl,
           num_warps=2)


class _GateCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, a, br):
        B, H, L, D = a.shape
        # a copy of the (B, L, 2H) logits, not the view of the layer's fused projection that they arrive as:
        # saving the view would keep the whole (B, L, q + k + v + gate) output alive until the backward
        logits, a, br = logits.contiguous(), a.contiguous(), br.contiguous()
        out = torch.empty(B, L, H * D, device=a.device, dtype=a.dtype)
        _gate_launch(logits, a, br, out, out, a, br, logits, backward=False)
        ctx.save_for_backward(logits, a, br)
        return out

    @staticmethod
    def backward(ctx, dout):
        logits, a, br = ctx.saved_tensors
        dout = _last_dim_dense(dout)
        da, db = torch.empty_like(a), torch.empty_like(br)
        dlog = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)  # written in its dtype: no cast
        _gate_launch(logits, a, br, dout, dout, da, db, dlog, backward=True)
        return dlog, da, db


def _last_dim_dense(x):
    """``x`` with unit stride in its last dim (what the kernels index with ``+ d``)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def gate_combine(logits, ltis, stis):
    """Triton twin of :func:`recbole_blossom.ops.naive.gate_combine`: one launch forward and one backward (the
    PyTorch path takes about five and ten), gates and products in float32."""
    return _GateCombine.apply(logits, ltis, stis)


def compress_blocks(k, pos, w1, b1, w2, b2, block_len, stride):
    """Triton twin of :func:`recbole_blossom.ops.naive.compress_blocks`, forward only (LTIS scores without
    autograd): one launch instead of about ten (window copy, position add, casts of the frozen weights under
    autocast, two matrix products, GELU). Float32 values; the result has ``k``'s dtype. The products are exact
    float32 for float32 ``k`` (the PyTorch path's choice of blocks); for bf16/fp16 ``k`` TF32 on tensor cores in
    tiles of 64 blocks (the selection kernel scores them in TF32 as well: only the choice of blocks uses them),
    where exact products on CUDA cores in tiles of 16 cost ~80 us a layer at 65,536 tokens."""
    B, Hkv, L, D = k.shape
    n_cmp = num_compressed_blocks(L, block_len, stride)
    out = torch.empty(B, Hkv, n_cmp, D, device=k.device, dtype=k.dtype)
    if n_cmp == 0:
        return out
    k = k if k.stride(-1) == 1 else k.contiguous()
    exact = k.dtype == torch.float32
    bc = 16 if exact else 64
    launch(_compress_kernel, (_cdiv(n_cmp, bc), B * Hkv),
           k, pos.contiguous(), w1.contiguous(), b1, w2.contiguous(), b2, out, n_cmp, *k.stride()[:3], HKV=Hkv, D=D,
           D_P2=max(16, _next_pow2(D)), H2_P2=max(16, _next_pow2(2 * D)),
           BLOCK_LEN=block_len, STRIDE=stride, BC=bc, KC=64, PRECISION="ieee" if exact else "tf32", num_warps=4)
    return out
