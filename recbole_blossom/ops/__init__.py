"""Blossom's attention primitives, each a pair with one signature: a pure PyTorch reference
(:mod:`.naive`) and Triton kernels (:mod:`.parallel`). The functions here pick one by ``impl``
(``auto`` | ``torch`` | ``fast``) and the tensor's device and dtype."""

import torch

from recbole_blossom.ops import naive, parallel
# One op for every device: the block mean is a single PyTorch reduction (no kernel of ours to pair it with).
from recbole_blossom.ops.naive import causal_attention, mean_blocks, zero_padding_rows  # noqa: F401  (public API)

FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_fast(impl, x):
    """Whether to run the Triton kernels on tensor ``x`` under ``blossom_impl = impl``.

    ``auto``: on a CUDA tensor of a supported dtype when Triton is there, else PyTorch; ``torch``: always
    PyTorch; ``fast``: always the kernels (a clear error where they cannot run).
    """
    if impl == "torch":
        return False
    if impl not in ("auto", "fast"):
        raise ValueError(f"blossom_impl must be one of auto, torch, fast; got {impl!r}")
    ok = parallel.triton is not None and x.is_cuda and x.dtype in FAST_DTYPES
    if impl == "fast" and not ok:
        raise RuntimeError(
            f"blossom_impl='fast' needs Triton and a CUDA tensor of dtype float32, bfloat16 or float16; got "
            f"device={x.device}, dtype={x.dtype}, triton={'yes' if parallel.triton is not None else 'missing'}. "
            "Use blossom_impl='auto' or 'torch'.")
    return ok


def select_blocks(q, k_cmp, mem_key, block_len, stride, select_size, n_select, chunk_size=1024, scale=None,
                  pool="probs", impl="auto"):
    """LTIS block selection; see :func:`recbole_blossom.ops.naive.select_blocks`."""
    fn = parallel.select_blocks if use_fast(impl, q) else naive.select_blocks
    return fn(q, k_cmp, mem_key, block_len, stride, select_size, n_select, chunk_size, scale, pool)


def gathered_attention(q, k, v, idx, block, lengths=None, dropout_p=0.0, training=False, scale=None,
                       impl="auto"):
    """Attention over the keys each query's slots name; see :func:`recbole_blossom.ops.naive.gathered_attention`."""
    fn = parallel.gathered_attention if use_fast(impl, q) else naive.gathered_attention
    return fn(q, k, v, idx, block, lengths, dropout_p, training, scale)


def stis_attention(q, k, v, window, sink, lengths=None, dropout_p=0.0, training=False, scale=None, impl="auto"):
    """STIS attention (recent window, power-of-two distances, sink); see :func:`recbole_blossom.ops.naive.stis_attention`."""
    fn = parallel.stis_attention if use_fast(impl, q) else naive.stis_attention
    return fn(q, k, v, window, sink, lengths, dropout_p, training, scale)


def rotary(q, k, cos, sin, impl="auto"):
    """RoPE of queries and keys; see :func:`recbole_blossom.ops.naive.rotary`."""
    fn = parallel.rotary if use_fast(impl, q) else naive.rotary
    return fn(q, k, cos, sin)


def gate_combine(logits, ltis, stis, impl="auto"):
    """Gated sum of the two branches; see :func:`recbole_blossom.ops.naive.gate_combine`."""
    fn = parallel.gate_combine if use_fast(impl, ltis) else naive.gate_combine
    return fn(logits, ltis, stis)


def compress_blocks(k, pos, w1, b1, w2, b2, block_len, stride, impl="auto"):
    """LTIS block compression; see :func:`recbole_blossom.ops.naive.compress_blocks`. The kernel has no
    backward: where autograd needs one (the trainable-compression variant) the PyTorch path runs."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (k, pos, w1, b1, w2, b2))
    fn = parallel.compress_blocks if use_fast(impl, k) and not needs_grad else naive.compress_blocks
    return fn(k, pos, w1, b1, w2, b2, block_len, stride)


def branch_attention(q, k, v, idx, block, window, sink, logits, lengths=None, dropout_p=0.0, training=False,
                     scale=None, impl="auto"):
    """Both branches and the gate; see :func:`recbole_blossom.ops.naive.branch_attention` (on the GPU, one autograd
    node for the two tensor-core branches and the gate)."""
    fn = parallel.branch_attention if use_fast(impl, q) else naive.branch_attention
    return fn(q, k, v, idx, block, window, sink, logits, lengths, dropout_p, training, scale)
