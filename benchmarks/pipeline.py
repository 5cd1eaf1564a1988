"""Data-preparation time and peak host memory of RecBole's sequence pipeline and ours, against L.

Generates (or reuses) a set of ``--users`` users with ``--history`` interactions each
(``benchmarks/make_long_dataset.py``), then for each pipeline and each ``MAX_ITEM_LIST_LENGTH`` runs a fresh
Python process that creates the dataset and the three dataloaders (``create_dataset`` + ``data_preparation``)
and then draws the first ``--batches`` training batches. One JSON line per configuration:

* ``prep_s``: seconds from ``create_dataset`` to having the three dataloaders (reading the file included);
* ``peak_rss_mib``: peak resident host memory of the process at that point;
* ``batches_s``, ``batches_peak_rss_mib``: the same after drawing the first batches (``train_batch_size`` rows
  of length L each, which any pipeline must hand to the model);
* ``status``: ``ok``, ``over_limit`` (stopped at ``--max-rss-gb`` so the machine is not taken down) or
  ``killed``/``error`` with the reason.

``--seq_train_mode every_position`` (ours only) measures the every-position training rows instead (there
``train_batch_size`` counts targets: a batch is about ``train_batch_size / mean targets a window`` windows).

Pipelines: ``recbole`` (``seq_pipeline: recbole``, RecBole's SequentialDataset) and ``ours``
(``seq_pipeline: windows``).

    python benchmarks/pipeline.py                                  # 500 x 2,000, L in 50 512 2048 8192, both
    python benchmarks/pipeline.py --pipeline recbole --lengths 50 512
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from make_long_dataset import make  # noqa: E402

PIPELINES = {"recbole": "recbole", "ours": "windows"}
PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(args):
    """One configuration in this process: prepare the data, draw a few batches, print one JSON line."""
    import recbole_blossom  # noqa: F401  (applies the RecBole compatibility shims)
    from recbole.utils import init_seed

    from recbole_blossom.config import BlossomConfig
    from recbole_blossom.data import create_dataset, data_preparation

    config = BlossomConfig(args.model, args.name, config_dict={
        "data_path": args.data_path, "MAX_ITEM_LIST_LENGTH": args.length, "seq_pipeline": PIPELINES[args.pipeline],
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "train_batch_size": args.train_batch_size,
        "seq_train_mode": args.seq_train_mode, "show_progress": False,
        "checkpoint_dir": os.path.join(args.data_path, "saved")})
    init_seed(config["seed"], config["reproducibility"])
    start = time.perf_counter()
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    prep_s, peak = time.perf_counter() - start, _peak_rss_mib()
    start = time.perf_counter()
    for i, _ in enumerate(train):
        if i + 1 >= args.batches:
            break
    result = {"pipeline": args.pipeline, "L": args.length, "seq_train_mode": args.seq_train_mode,
              "prep_s": round(prep_s, 2), "peak_rss_mib": round(peak), "batches": args.batches,
              "batches_s": round(time.perf_counter() - start, 2), "batches_peak_rss_mib": round(_peak_rss_mib()),
              "train_rows": len(train._dataset), "status": "ok"}
    print(json.dumps(result), flush=True)


def _rss_mib(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_MIB
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def run_one(args, pipeline, length):
    """Run one configuration in a fresh process under the memory guard; returns its result dict."""
    limit = int(args.max_rss_gb * 2**30)
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--pipeline", pipeline, "--lengths",
               str(length), "--data_path", args.data_path, "--name", args.name, "--batches", str(args.batches),
               "--train_batch_size", str(args.train_batch_size), "--seq_train_mode", args.seq_train_mode,
               "--model", args.model]

    def limit_memory():
        # Backstop in the kernel: address space beyond the RSS budget plus room for torch's untouched
        # reservations. The watchdog below stops the process at the RSS budget itself.
        room = limit + 8 * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (room, room))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit_memory, env=env, cwd=args.data_path)
    watched_peak, over = 0.0, False
    while proc.poll() is None:
        rss = _rss_mib(proc.pid)
        watched_peak = max(watched_peak, rss)
        if rss > limit / 2**20:
            over = True
            proc.kill()
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    base = {"pipeline": pipeline, "L": length, "seq_train_mode": args.seq_train_mode}
    if over:
        return {**base, "prep_s": None, "peak_rss_mib": round(watched_peak), "status": "over_limit",
                "reason": f"resident memory passed --max-rss-gb {args.max_rss_gb}; stopped"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (err.strip().splitlines() or ["no output"])[-1]
    memory = proc.returncode in (-9, 137) or "MemoryError" in err or "Cannot allocate memory" in err
    return {**base, "prep_s": None, "peak_rss_mib": round(watched_peak), "status": "killed" if memory else "error",
            "reason": ("out of memory: " if memory else f"exit {proc.returncode}: ") + tail[-300:]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--history", type=int, default=2000, help="interactions per user")
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data set")
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 512, 2048, 8192])
    parser.add_argument("--pipeline", choices=["recbole", "ours", "both"], default="both")
    parser.add_argument("--data_path", default=os.path.join(ROOT, "dataset"),
                        help="folder for the generated set (reused when its arguments match)")
    parser.add_argument("--batches", type=int, default=5, help="training batches drawn after preparation")
    parser.add_argument("--train_batch_size", type=int, default=2048)
    parser.add_argument("--seq_train_mode", choices=["per_prefix", "every_position"], default="per_prefix",
                        help="training rows (every_position needs --pipeline ours)")
    parser.add_argument("--model", default=None,
                        help="sequential model whose data are prepared (not built): SASRec, or BlossomSASRec with "
                             "every_position")
    parser.add_argument("--max-rss-gb", dest="max_rss_gb", type=float, default=20.0,
                        help="stop a configuration whose resident memory passes this (GiB)")
    parser.add_argument("--name", default=None, help="data set name (default: pipeline_u{users}_h{history})")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.lengths) < 1 or args.batches < 1 or args.max_rss_gb <= 0:
        parser.error("--lengths and --batches must be >= 1 and --max-rss-gb > 0")
    if args.seq_train_mode == "every_position" and args.pipeline != "ours":
        parser.error("--seq_train_mode every_position needs --pipeline ours (RecBole has no such rows)")
    args.model = args.model or ("BlossomSASRec" if args.seq_train_mode == "every_position" else "SASRec")
    args.data_path = os.path.abspath(args.data_path)
    args.name = args.name or f"pipeline_u{args.users}_h{args.history}"
    if args.worker:
        args.length = args.lengths[0]
        return worker(args)
    try:
        make(args.users, args.history, args.items, args.seed, args.data_path, args.name)
    except ValueError as err:
        parser.error(str(err))
    pipelines = ["recbole", "ours"] if args.pipeline == "both" else [args.pipeline]
    for pipeline in pipelines:
        for length in args.lengths:
            print(json.dumps(run_one(args, pipeline, length)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
