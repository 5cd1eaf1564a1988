"""Microbenchmark of Blossom's attention primitives on one GPU: the fused block selection and the gathered
attention (forward + backward) of each branch, per call, at the reference sizes; LTIS with each of its kernels
(``presence``, ``slots``, ``gather``; ``auto`` is what the model runs), without and with attention dropout.

    python benchmarks/kernels.py --lengths 200 1024 8192 --tokens 65536
    python benchmarks/kernels.py --lengths 200 4096 --dtypes bf16 --warps 1 2 4   # num_warps of the tensor-core kernels
"""

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_blossom.ops.naive import num_compressed_blocks  # noqa: E402
from recbole_blossom.ops import parallel  # noqa: E402


def bench(fn, warmup=3, repeats=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def warps_sweep(q, k, v, idx, dout, warps, L, B, dtype):
    """The tensor-core LTIS (``slots``) and STIS kernels with ``num_warps = warps`` (the library's choice is in
    ``parallel._meta``; this wraps it for the sweep only)."""
    meta_of = parallel._meta_of
    parallel._meta_of = lambda *a: {**meta_of(*a), "num_warps": warps}
    try:
        for name, op in (("ltis slots", lambda *x: parallel.gathered_attention(*x, idx, 16, kernel="slots")),
                         ("stis", lambda *x: parallel.stis_attention(*x, 8, True))):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            fwd = bench(lambda: op(*leaves))
            both = bench(lambda: op(*leaves).backward(dout))
            print(f"L={L:6d} B={B:4d} {str(dtype)[6:]:8s} {name} num_warps={warps}: fwd {fwd:.3f} ms, "
                  f"fwd+bwd {both:.3f} ms", flush=True)
    finally:
        parallel._meta_of = meta_of


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--sweep", action="store_true", help="also sweep the selection kernel's tile sizes")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--warps", type=int, nargs="+", default=None,
                        help="also time the tensor-core LTIS (slots) and STIS kernels with each of these num_warps")
    args = parser.parse_args()
    H, Hkv, D = 8, 2, 16
    print(f"device: {torch.cuda.get_device_name()} | triton {parallel.triton.__version__}")
    dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[d] for d in args.dtypes]
    for L, dtype in itertools.product(args.lengths, dtypes):
        B = max(1, args.tokens // L)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H, L, D, device="cuda", generator=gen).to(dtype)
        k, v = (torch.randn(B, Hkv, L, D, device="cuda", generator=gen).to(dtype) for _ in range(2))
        k_cmp = torch.randn(B, Hkv, num_compressed_blocks(L, 32, 16), D, device="cuda", generator=gen).to(dtype)
        mem = torch.randn(Hkv, D, device="cuda")
        configs = [dict()]
        if args.sweep:
            configs = [dict(bt=bt, bc=bc, precision=p, num_warps=w) for bt, bc, p, w in itertools.product(
                (32, 64), (32, 64), ("ieee", "tf32"), (4, 8))]
        for cfg in configs:
            ms = bench(lambda: parallel.select_blocks(q, k_cmp, mem, 32, 16, 16, 4, pool="logits", **cfg))
            print(f"L={L:6d} B={B:4d} {str(dtype)[6:]:8s} select {cfg or 'default'}: {ms:.3f} ms", flush=True)
        idx = parallel.select_blocks(q, k_cmp, mem, 32, 16, 16, 4, pool="logits")
        dout = torch.randn_like(q)
        auto = parallel.ltis_kernel(q, 16)
        ops = [(f"ltis {kern}{' (auto)' if kern == auto else ''} p={p}",
                lambda *x, kern=kern, p=p: parallel.gathered_attention(*x, idx, 16, None, p, p > 0, kernel=kern))
               for kern in ("presence", "slots", "gather") for p in (0.0, 0.2)]
        ops += [(f"stis p={p}", lambda *x, p=p: parallel.stis_attention(*x, 8, True, None, p, p > 0))
                for p in (0.0, 0.2)]
        ops.append(("sdpa causal (reference) p=0.0", lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True)))
        for name, op in ops:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            fwd = bench(lambda: op(*leaves))

            def step():
                op(*leaves).backward(dout)
            both = bench(step)
            print(f"L={L:6d} B={B:4d} {str(dtype)[6:]:8s} {name} attention fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms",
                  flush=True)
        for w in args.warps or ():
            warps_sweep(q, k, v, idx, dout, w, L, B, dtype)
        chunks, counts = parallel.tile_chunks(idx, 16, L)
        print(f"L={L:6d} LTIS chunks per tile: mean {counts.float().mean():.1f}, max {int(counts.max())}; "
              f"tile_presence (in the ltis presence times) {bench(lambda: parallel.tile_presence(idx, 16, L)):.3f} ms",
              flush=True)


if __name__ == "__main__":
    main()
