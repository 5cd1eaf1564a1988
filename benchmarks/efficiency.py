"""Efficiency benchmark: time and peak GPU memory of a training step and an inference batch against L.

Models (reference settings: hidden 128, 2 layers, 8 heads; BlossomSASRec with 2 kv heads):

* ``SASRec``: RecBole's SASRec (explicit ``L x L`` attention);
* ``SASRec-SDPA``: the plugin's ``SASRecSDPA``, the same model with PyTorch's fused attention (causal);
* ``LinRec``: ``recbole_blossom.model.linrec.LinRec`` when it is importable;
* ``Blossom-torch`` / ``Blossom-fast``: BlossomSASRec with ``blossom_impl`` torch / fast;
* ``Blossom-fast-mean``: ``Blossom-fast`` with ``ltis_compression: mean`` (block means pick the blocks, no MLP);
* ``Blossom-fast-long``: the long-history settings of ``docs/long_histories.md`` (``ltis_compression: mean``,
  ``use_rope: False``, ``gate_bias_ltis: 10``): no rotation kernels, otherwise ``Blossom-fast-mean``.
* ``Blossom-fast-long-kv8`` / ``Blossom-fast-long-head``: ``Blossom-fast-long`` with a kv head per query head
  (``n_kv_heads: 8``), or with 2 kv heads and blocks picked per query head (``ltis_score_pool: head``).

Every batch holds the same number of tokens (``--tokens``, batch = tokens // L), all sequences full length.
A training step is forward, CE loss over all items, backward and an Adam step, which for the plugin models replays
the encoder's forward and backward from CUDA graphs (``train_cuda_graph``, their default; ``--no-train-graph``
runs them eagerly); an inference batch is
``full_sort_predict`` (scores over all items) in eval mode under ``no_grad``, which for the plugin models (not
RecBole's ``SASRec``) replays the encoder from a CUDA graph (``eval_cuda_graph``, their default;
``--no-eval-graph`` runs it eagerly). Times are medians of ``--repeats`` CUDA-event timings after ``--warmup``
steps; memory is ``torch.cuda.max_memory_allocated`` over the timed steps (parameters and optimizer state included;
for training plus what the training graphs' pool holds between steps, the activations' space; for inference over
the warm-up too, where the graph is recorded). A run that runs out of memory reads OOM.
No data files are needed: the models are built from a config dict and a stand-in dataset.

    python benchmarks/efficiency.py --out bench_out            # the table, CSV and plot
    python benchmarks/efficiency.py --max-len-search --batch 64  # longest L that trains at batch 64
"""

import argparse
import csv
import gc
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recbole_blossom  # noqa: E402,F401  (applies the RecBole compatibility shims)
from recbole.model.sequential_recommender import SASRec  # noqa: E402

from recbole_blossom.config import model_defaults  # noqa: E402
from recbole_blossom.hparams import LONG_HISTORY  # noqa: E402
from recbole_blossom.model import BlossomSASRec, SASRecSDPA  # noqa: E402

FIELDS = dict(USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", LIST_SUFFIX="_list",
              ITEM_LIST_LENGTH_FIELD="item_length", NEG_PREFIX="neg_")


class FakeDataset:
    """What ``SequentialRecommender.__init__`` reads from a dataset: the number of items."""

    def __init__(self, n_items):
        self.n_items = n_items

    def num(self, field):
        return self.n_items


def model_classes():
    classes = {"SASRec": (SASRec, {}), "SASRec-SDPA": (SASRecSDPA, {})}
    try:
        from recbole_blossom.model.linrec import LinRec
        classes["LinRec"] = (LinRec, {})
    except ImportError as err:
        print(f"note: LinRec skipped ({err})")
    classes["Blossom-torch"] = (BlossomSASRec, {"blossom_impl": "torch"})
    classes["Blossom-fast"] = (BlossomSASRec, {"blossom_impl": "fast"})
    classes["Blossom-fast-mean"] = (BlossomSASRec, {"blossom_impl": "fast", "ltis_compression": "mean"})
    long = {"blossom_impl": "fast", **LONG_HISTORY}
    classes["Blossom-fast-long"] = (BlossomSASRec, long)
    classes["Blossom-fast-long-kv8"] = (BlossomSASRec, dict(long, n_kv_heads=8))
    classes["Blossom-fast-long-head"] = (BlossomSASRec, dict(long, ltis_score_pool="head"))
    return classes


def make_config(max_len, device, extra):
    config = model_defaults("BlossomSASRec")  # the SASRec keys are the shared reference settings
    config.update(FIELDS, MAX_ITEM_LIST_LENGTH=max_len, device=device, **extra)
    return config


def make_batch(batch, max_len, n_items, device, gen):
    seq = torch.randint(1, n_items, (batch, max_len), generator=gen).to(device)
    return {"item_id_list": seq, "item_length": torch.full((batch,), max_len, device=device),
            "item_id": torch.randint(1, n_items, (batch,), generator=gen).to(device)}


def timed(fn, warmup, repeats, device, peak_from_start=False):
    """Median milliseconds of ``fn()`` and the peak memory (MiB) over the timed calls (``peak_from_start``: over
    the warm-up calls too, where an inference records its CUDA graph: its memory stays in the graph's pool)."""
    if device.type == "cuda" and peak_from_start:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        if not peak_from_start:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), torch.cuda.max_memory_allocated() / 2 ** 20
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), float("nan")


def is_oom(err):
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free(device):
    gc.collect()
    if device.type == "cuda":
        # cuBLAS keeps a workspace per stream (32 MiB each on an H100) in the caching allocator: the streams an
        # inference graph records on would otherwise count in every later model's peak memory
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()


def measure(name, cls, extra, max_len, batch, args, device, dtype, with_infer=True):
    """One row: training step and inference batch of model ``name`` at ``max_len``."""
    row = {"model": name, "L": max_len, "batch": batch}
    model = opt = data = None
    try:
        torch.manual_seed(0)
        model = cls(make_config(max_len, device, extra), FakeDataset(args.n_items)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        data = make_batch(batch, max_len, args.n_items, device, torch.Generator().manual_seed(0))
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        def train_step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = model.calculate_loss(data)
            loss.backward()
            opt.step()

        def infer_batch():
            with torch.no_grad(), autocast:
                model.full_sort_predict(data)

        model.train()
        row["train_ms"], row["train_mib"] = timed(train_step, args.warmup, args.repeats, device)
        graphs = getattr(model, "_train_graphs", None)
        if graphs is not None and device.type == "cuda":  # replays write into the pool, not through the allocator
            reserved, allocated = graphs.pool_bytes()
            row["train_mib"] += (reserved - allocated) / 2 ** 20
        row["train_tok_per_s"] = batch * max_len / row["train_ms"] * 1e3
        opt.zero_grad(set_to_none=True)
        model.eval()
        if with_infer:
            row["infer_ms"], row["infer_mib"] = timed(infer_batch, args.warmup, args.repeats, device, True)
        row["status"] = "ok"
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not is_oom(err):
            raise
        row["status"] = "OOM"
    finally:
        del model, opt, data
        free(device)
    return row


def fmt(row, key, digits=1):
    value = row.get(key)
    if value is None:
        return row.get("status", "-")
    return "-" if isinstance(value, float) and math.isnan(value) else f"{value:.{digits}f}"


def print_table(rows):
    head = ["model", "L", "batch", "train ms", "train Mtok/s", "train MiB", "infer ms", "infer MiB"]
    lines = [head]
    for r in rows:
        tput = r.get("train_tok_per_s")
        lines.append([r["model"], str(r["L"]), str(r["batch"]), fmt(r, "train_ms", 2),
                      f"{tput / 1e6:.2f}" if tput else r["status"], fmt(r, "train_mib", 0), fmt(r, "infer_ms", 2),
                      fmt(r, "infer_mib", 0)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib missing, no plot")
        return
    panels = [("train_ms", "training step (ms)"), ("train_mib", "peak training memory (MiB)"),
              ("infer_ms", "inference batch (ms)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        for name in dict.fromkeys(r["model"] for r in rows):
            pts = [(r["L"], r[key]) for r in rows if r["model"] == name and r["status"] == "ok"
                   and not math.isnan(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="max_seq_length L", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def profile(name, cls, extra, max_len, batch, args, device, dtype):
    """Print the costliest kernels of a few training steps (after a warm-up)."""
    torch.manual_seed(0)
    model = cls(make_config(max_len, device, extra), FakeDataset(args.n_items)).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = make_batch(batch, max_len, args.n_items, device, torch.Generator().manual_seed(0))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model.calculate_loss(data)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    enqueue = []  # host time to issue a step; when it is close to the step time, the step is bound by the host
    for _ in range(5):
        start = time.perf_counter()
        step()
        enqueue.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"\n== {name} L={max_len} B={batch}: 3 training steps; host time to issue one step "
          f"{sorted(enqueue)[2]:.2f} ms (median of 5)")
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    del model, opt, data
    free(device)


def fits(cls, extra, max_len, batch, args, device, dtype):
    """Whether a training step of ``batch`` sequences of length ``max_len`` runs (after two warm-up steps)."""
    # two warm-up steps: with train_cuda_graph the first runs eagerly and the second records, so the timed step is a
    # replay (a recording step's peak counts the graph's memory twice: while recorded and as its pool)
    small = argparse.Namespace(**{**vars(args), "warmup": 2, "repeats": 1})
    row = measure("search", cls, extra, max_len, batch, small, device, dtype, with_infer=False)
    return row["status"] == "ok", row


def max_len_search(classes, args, device, dtype):
    """Longest L (a multiple of ``--search-step``) whose training step runs at batch ``--batch``."""
    results = []
    for name in args.models:
        cls, extra = classes[name]
        lo, hi, L = 0, None, args.search_start
        while hi is None and L <= args.search_max:  # doubling
            ok, row = fits(cls, extra, L, args.batch, args, device, dtype)
            print(f"  {name} L={L}: {row['status']} {fmt(row, 'train_mib', 0)} MiB", flush=True)
            lo, hi = (L, None) if ok else (lo, L)
            L *= 2
        if hi is None:
            results.append((name, lo, f">= {lo} (search cap)"))
            continue
        while hi - lo > args.search_step:  # bisection
            mid = (lo + hi) // 2 // args.search_step * args.search_step
            if mid <= lo:
                break
            ok, row = fits(cls, extra, mid, args.batch, args, device, dtype)
            print(f"  {name} L={mid}: {row['status']} {fmt(row, 'train_mib', 0)} MiB", flush=True)
            lo, hi = (mid, hi) if ok else (lo, mid)
        results.append((name, lo, f"{lo} (OOM at {hi})"))
    print(f"\nLongest max_seq_length that trains at batch {args.batch} ({args.dtype}):")
    print("| model | longest L |\n|---|---|")
    for name, _, text in results:
        print(f"| {name} | {text} |")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 1024, 4096, 8192, 32768])
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per batch (batch = tokens // L)")
    parser.add_argument("--models", nargs="+", default=None, help="subset of the model names")
    parser.add_argument("--n-items", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="bf16 / fp16 = autocast in that precision")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_out", help="folder for the CSV and the plot")
    parser.add_argument("--no-eval-graph", action="store_true",
                        help="inference without CUDA graphs (eval_cuda_graph: False) for the plugin models")
    parser.add_argument("--no-train-graph", action="store_true",
                        help="training without CUDA graphs (train_cuda_graph: False) for the plugin models")
    parser.add_argument("--profile", action="store_true", help="profile one training step of each model/L")
    parser.add_argument("--max-len-search", action="store_true")
    parser.add_argument("--batch", type=int, default=64, help="batch size of --max-len-search")
    parser.add_argument("--search-start", type=int, default=512)
    parser.add_argument("--search-max", type=int, default=262144)
    parser.add_argument("--search-step", type=int, default=256)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    classes = model_classes()
    for flag, key in ((args.no_eval_graph, "eval_cuda_graph"), (args.no_train_graph, "train_cuda_graph")):
        if flag:
            classes = {name: (cls, {**extra, key: False}) for name, (cls, extra) in classes.items()}
    unknown = [m for m in args.models or () if m not in classes]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; allowed: {', '.join(classes)}")
    if device.type != "cuda":
        fast = [name for name, (_, extra) in classes.items() if extra.get("blossom_impl") == "fast"]
        for name in fast:
            classes.pop(name)
        print(f"note: {', '.join(fast)} skipped (need CUDA)")
    args.models = [m for m in (args.models or list(classes)) if m in classes]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton
        tver = triton.__version__
    except ImportError:
        tver = "none"
    print(f"device: {gpu} | torch {torch.__version__} | triton {tver} | dtype {args.dtype} | "
          f"n_items {args.n_items}", flush=True)
    if args.max_len_search:
        max_len_search(classes, args, device, dtype)
        return
    if args.profile:
        for L in args.lengths:
            for name in args.models:
                profile(name, *classes[name], L, max(1, args.tokens // L), args, device, dtype)
        return
    rows = []
    for L in args.lengths:
        batch = max(1, args.tokens // L)
        for name in args.models:
            cls, extra = classes[name]
            row = measure(name, cls, extra, L, batch, args, device, dtype)
            rows.append(row)
            print(f"  {name:14s} L={L:6d} B={batch:5d} train {fmt(row, 'train_ms', 2)} ms "
                  f"{fmt(row, 'train_mib', 0)} MiB | infer {fmt(row, 'infer_ms', 2)} ms", flush=True)
    os.makedirs(args.out, exist_ok=True)
    tag = f"efficiency_{args.dtype}"
    keys = ["model", "L", "batch", "status", "train_ms", "train_tok_per_s", "train_mib", "infer_ms", "infer_mib"]
    with open(os.path.join(args.out, f"{tag}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{gpu}, {args.dtype}, {args.tokens} tokens per batch")
    print_table(rows)
    plot(rows, os.path.join(args.out, f"{tag}.png"))


if __name__ == "__main__":
    main()
