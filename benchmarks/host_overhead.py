"""Host (CPU) cost of BlossomSASRec on one GPU: where a step's enqueue time goes when the step is bound by the
CPU that issues it rather than by the GPU.

    python benchmarks/host_overhead.py                 # both parts
    python benchmarks/host_overhead.py --part step     # host ms of forward / backward / Adam, Blossom vs SDPA
    python benchmarks/host_overhead.py --part ops      # host us per call of each op, one layer, nn.MHA

``step``: the bf16 training step of ``efficiency.py`` (same model, batch and settings) split into forward+loss,
backward and optimizer, timed on the host with a sync before each step (median of 7), for Blossom-fast and
SASRec-SDPA, with Python's garbage collector running and paused. ``ops``: host microseconds per call with tiny tensors (B = 2, L = 256), so the GPU never holds the
host back: each Triton op of the fast path (through its public wrapper, its autograd node, and the raw kernel
launch), one Blossom attention layer forward and forward+backward under bf16 autocast, and
``torch.nn.MultiheadAttention`` (fused causal attention) forward+backward for reference.
"""

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import efficiency  # noqa: E402
from recbole_blossom.attention import BlossomAttention  # noqa: E402
from recbole_blossom.hparams import BlossomHParams, BlossomRuntime  # noqa: E402
from recbole_blossom.ops import parallel  # noqa: E402
from recbole_blossom.rotary import rotary_cos_sin  # noqa: E402


def host_us(fn, n=300):
    """Host microseconds per call of ``fn`` (no sync inside the loop; tiny inputs keep the GPU ahead)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def step_phases(name, L, n_items=20000):
    """Host ms of forward+loss, backward and Adam of one bf16 training step (median over 7 steps)."""
    dev = torch.device("cuda")
    cls, extra = efficiency.model_classes()[name]
    torch.manual_seed(0)
    model = cls(efficiency.make_config(L, dev, extra), efficiency.FakeDataset(n_items)).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = efficiency.make_batch(65536 // L, L, n_items, dev, torch.Generator().manual_seed(0))

    def phases():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.calculate_loss(data)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3

    for _ in range(5):
        phases()
    for collector in ("on", "off"):  # Python's garbage collector paused or not: its passes land in some steps
        gc.collect()
        if collector == "off":
            gc.disable()
        runs = []
        for _ in range(7):
            torch.cuda.synchronize()
            runs.append(phases())
        torch.cuda.synchronize()
        gc.enable()
        fwd, bwd, opt_ms = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{name:14s} L={L} gc {collector:3s}: host ms forward+loss {fwd:.2f}, backward {bwd:.2f}, "
              f"Adam {opt_ms:.2f} (slowest step {max(sum(r) for r in runs):.2f})")


def op_costs():
    dev, dt = "cuda", torch.bfloat16
    B, H, Hkv, L, D = 2, 8, 2, 256, 16

    def leaf(*shape):
        return torch.randn(*shape, device=dev, dtype=dt, requires_grad=True)

    q, k, v = leaf(B, H, L, D), leaf(B, Hkv, L, D), leaf(B, Hkv, L, D)
    lens = torch.full((B,), L, device=dev, dtype=torch.int32)
    idx = torch.randint(0, L // 16, (B, Hkv, L, 5), device=dev, dtype=torch.int32)
    cos, sin = rotary_cos_sin(L, D, 10000.0, dev)
    k_cmp = torch.randn(B, Hkv, (L - 32) // 16 + 1, D, device=dev, dtype=dt)
    mem = torch.randn(Hkv, D, device=dev, dtype=dt)
    logits = leaf(B, L, 2 * H)
    ltis_in = parallel._ltis_inputs(q, k, idx, 16, "slots")
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=dev)
    meta = parallel._meta_of(q, k, ltis_in[0], ltis_in[3], 0.2)
    strides = parallel._strides(q, k, v, *ltis_in[:3])
    grid = parallel._grid(q, k, ltis_in[3])
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    rows = {
        "torch add (one launch)": lambda: qd + 1,
        "raw Triton launch (LTIS forward kernel)": lambda: parallel._tc_fwd_kernel[grid](
            qd, kd, vd, out, lse, *ltis_in[:3], lens, L, 0.25, 0.2, 123, *strides, **meta),
        "LTIS autograd node (_BlockAttention)": lambda: parallel._BlockAttention.apply(q, k, v, *ltis_in, lens, 0.25,
                                                                                      0.2),
        "rotary": lambda: parallel.rotary(q, k, cos, sin),
        "select_blocks": lambda: parallel.select_blocks(qd, k_cmp, mem, 32, 16, 16, 4, 1024, None, "logits"),
        "gathered_attention (LTIS)": lambda: parallel.gathered_attention(q, k, v, idx, 16, lens, 0.2, True),
        "stis_attention": lambda: parallel.stis_attention(q, k, v, 8, True, lens, 0.2, True),
        "gate_combine": lambda: parallel.gate_combine(logits, q, q),
        "branch_attention (both branches + gate)": lambda: parallel.branch_attention(q, k, v, idx, 16, 8, True, logits,
                                                                                    lens, 0.2, True),
    }
    for name, fn in rows.items():
        print(f"{name:44s} {host_us(fn):8.1f} us")
    layer = BlossomAttention(BlossomHParams(hidden_size=128, n_heads=8, n_kv_heads=2),
                             BlossomRuntime(blossom_impl="fast")).to(dev)
    mha = torch.nn.MultiheadAttention(128, 8, batch_first=True).to(dev)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, device=dev)
    x = torch.randn(B, L, 128, device=dev, requires_grad=True)
    with torch.autocast("cuda", dtype=dt):
        layers = {
            "Blossom layer forward": lambda: layer(x, lens),
            "Blossom layer forward+backward": lambda: layer(x, lens).sum().backward(),
            "nn.MultiheadAttention forward+backward": lambda: mha(x, x, x, need_weights=False, is_causal=True,
                                                                  attn_mask=causal)[0].sum().backward(),
        }
        for name, fn in layers.items():
            print(f"{name:44s} {host_us(fn):8.1f} us")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["step", "ops", "both"], default="both")
    parser.add_argument("--lengths", type=int, nargs="+", default=[200])
    args = parser.parse_args()
    if not torch.cuda.is_available() or parallel.triton is None:
        sys.exit("host_overhead.py measures the CUDA fast path: it needs a GPU and Triton")
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    if args.part in ("step", "both"):
        for L in args.lengths:
            for name in ("SASRec-SDPA", "Blossom-fast"):
                step_phases(name, L)
    if args.part in ("ops", "both"):
        op_costs()


if __name__ == "__main__":
    main()
