"""Accuracy comparison: train every (dataset, model) pair under one protocol and tabulate the results.

    python benchmarks/compare.py --models GRU4Rec,SASRec,SASRecSDPA,LinRec,BlossomSASRec,BlossomLinRec \\
        --datasets ml-100k,amazon-video-games --data_path ../shared/datasets --out bench_out/compare

Every pair runs through the plugin's quick-start machinery (``BlossomConfig``, so ``properties/overall.yaml``
is the shared protocol: leave-one-out in time order, CE loss over all items, early stopping on NDCG@10 with
``stopping_step`` patience). RecBole's built-in baselines get the plugin models' size (:data:`REFERENCE`), and
every model trains per prefix (:data:`PROTOCOL`; BlossomSASRec's own default is every-position training) unless
``--seq_train_mode`` or a config file names the mode.
For each pair it records Recall@10, NDCG@10 and MRR@10 on the test split (full ranking, or 100 sampled
negatives with ``--eval-mode uni100``), the trainable parameter count, seconds per training epoch (the
trainer's ``_train_epoch`` timed, evaluation excluded), peak GPU memory (``torch.cuda.max_memory_allocated``
over training and testing; ``n/a`` on CPU) and the epochs run.

Outputs under ``--out``: ``results/<dataset>__<model>__<mode>.json`` (one a finished pair), ``results.md``,
``results.csv`` and ``results.png`` (``-uni100`` in the names for that mode), and RecBole's logs and
checkpoints. A rerun skips the pairs already finished with the same settings (so an interrupted sweep
resumes); ``--force`` reruns them. ``--resume FILE`` continues one pair from a checkpoint kept with
``--keep-checkpoints`` (a run longer than one sitting: the table's ``epochs_run`` counts this sitting's epochs,
``start_epoch`` where it began). Any ``--key=value`` (or ``--key value``) not listed below overrides a
RecBole config key for every pair, e.g. ``--train_batch_size=256 --hidden_size=32`` for a small CPU run.
"""

import contextlib
import csv
import gc
import json
import logging
import math
import os
import resource
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import yaml  # noqa: E402
from recbole.utils import get_trainer, init_logger  # noqa: E402

import recbole_blossom  # noqa: E402  (applies the RecBole compatibility shims)
from recbole_blossom import checkpoint, cli  # noqa: E402
from recbole_blossom.checks import check_dataset  # noqa: E402
from recbole_blossom.cli import UsageError  # noqa: E402
from recbole_blossom.config import get_model_class  # noqa: E402
from recbole_blossom.quick_start import build_model, make_config as make_blossom_config, prepare  # noqa: E402

DEFAULT_MODELS = "GRU4Rec,SASRec,SASRecSDPA,LinRec,BlossomSASRec,BlossomLinRec"
METRICS = ("recall@10", "ndcg@10", "mrr@10")
COLUMNS = ("dataset", "model", "eval_mode", *METRICS, "params", "sec_per_epoch", "peak_gpu_mem_mib",
           "epochs_run", "stopped_by", "best_valid_ndcg@10", "total_s", "device", "peak_host_rss_mib",
           "start_epoch")
EVAL_MODES = ("full", "uni100")

# RecBole's own yamls size its baselines differently (SASRec: 64 hidden, 2 heads, dropout 0.5); under the
# comparison they get the plugin models' reference size (properties/model/*.yaml). --key=value still wins.
REFERENCE = {
    "SASRec": {"n_layers": 2, "n_heads": 8, "hidden_size": 128, "inner_size": 256, "hidden_dropout_prob": 0.2,
               "attn_dropout_prob": 0.2, "hidden_act": "gelu", "loss_type": "CE"},
    "GRU4Rec": {"embedding_size": 128, "hidden_size": 128, "num_layers": 1, "dropout_prob": 0.2,
                "loss_type": "CE"},
}
# One training protocol for every pair: BlossomSASRec's own default is seq_train_mode: every_position, which
# RecBole's baselines cannot do, so a sweep trains every model per prefix unless the command line or a config
# file names the mode.
PROTOCOL = {"seq_train_mode": "per_prefix"}


class _TimeBudgetSpent(Exception):
    """Raised between epochs once ``--max-train-minutes`` is spent."""


def parse_args(argv):
    parser = cli.new_parser(__doc__, epilog="Other --key=value (or --key value) arguments override RecBole "
                                            "config keys.")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    parser.add_argument("--datasets", default="ml-100k", help="comma-separated dataset names (default ml-100k)")
    shared = [os.path.join(base, "shared", "datasets") for base in (os.path.dirname(ROOT), ROOT)]
    parser.add_argument("--data_path", "--data-path", dest="data_path",
                        default=next((p for p in shared if os.path.isdir(p)), "dataset"),
                        help="folder holding <dataset>/<dataset>.inter (ml-100k ships inside RecBole)")
    parser.add_argument("--out", default=os.path.join("bench_out", "compare"), help="output folder")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: overall.yaml's)")
    parser.add_argument("--eval-mode", "--eval_mode", dest="eval_mode", default="full", choices=EVAL_MODES,
                        help="full: rank all items; uni100: the target against 100 sampled negatives")
    parser.add_argument("--max-train-minutes", "--max_train_minutes", dest="max_train_minutes", type=float,
                        default=None, help="per pair: start no epoch after this many minutes of training; the "
                                           "best checkpoint so far is tested and the table marks the pair")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files applied to every pair")
    parser.add_argument("--force", action="store_true", help="rerun pairs that already have results")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each pair's best checkpoint")
    parser.add_argument("--resume", default=None,
                        help="continue one pair from a checkpoint kept by an earlier run (--keep-checkpoints): "
                             "weights, optimizer state, epoch, best validation score and early-stopping count; "
                             "the file is copied first and never changed")
    parser.add_argument("--no-plot", action="store_true", help="skip the bar chart")
    parser.add_argument("--verbose", action="store_true", help="RecBole's per-epoch log on the console")
    args, _ = cli.parse(parser, argv)
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs must be a positive integer, got {args.epochs}")
    if args.max_train_minutes is not None and args.max_train_minutes <= 0:
        raise UsageError(f"--max-train-minutes must be a positive number, got {args.max_train_minutes}")
    args.models = _names(args.models, "--models")
    args.datasets = _names(args.datasets, "--datasets")
    if args.resume is not None:
        if not os.path.isfile(args.resume):
            raise UsageError(f"--resume: {args.resume} does not exist")
        args.resume = os.path.abspath(args.resume)  # each pair runs in its --out folder (RecBole's logs go there)
        if len(args.models) != 1 or len(args.datasets) != 1:
            raise UsageError("--resume continues one pair: give one model in --models and one dataset in "
                             "--datasets")
    args.config_files = args.config_files.split() if args.config_files else []
    for path in args.config_files:
        if not os.path.isfile(path):
            raise UsageError(f"--config_files: {path} does not exist")
    return args


def _names(text, flag):
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UsageError(f"{flag} needs at least one name, e.g. {flag} {DEFAULT_MODELS.split(',')[0]}")
    return names


@contextlib.contextmanager
def working_directory(path):
    """RecBole writes ``log/`` and ``log_tensorboard/`` under the working directory: keep them in ``--out``."""
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


def _set_by_files(config_files, key):
    """Whether one of the yaml config files sets ``key`` (a file that is no yaml mapping: no; BlossomConfig
    reports it with its line)."""
    for path in config_files:
        with open(path, encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError:
                continue
        if isinstance(loaded, dict) and key in loaded:
            return True
    return False


def pair_settings(args, model):
    """Everything that decides a pair's result besides model and dataset (compared on resume)."""
    settings = {"config": dict(REFERENCE.get(model, {})), "overrides": cli.as_arguments(args.overrides),
                "config_files": [os.path.abspath(p) for p in args.config_files], "eval_mode": args.eval_mode}
    if args.epochs is not None:
        settings["config"]["epochs"] = args.epochs
    if args.max_train_minutes is not None:
        settings["max_train_minutes"] = args.max_train_minutes
    if args.eval_mode != "full":
        settings["config"]["eval_args"] = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                                           "mode": args.eval_mode}
    return settings


def make_config(args, model, dataset, out_dir):
    # Not in pair_settings: results stored before the pin (all per_prefix, the default then) still resume.
    protocol = {key: value for key, value in PROTOCOL.items()
                if key not in args.overrides and not _set_by_files(args.config_files, key)}
    config_dict = {**protocol, **pair_settings(args, model)["config"], "data_path": os.path.abspath(args.data_path),
                   "checkpoint_dir": os.path.join(out_dir, "saved", dataset), "show_progress": False,
                   **cli.typed(args.overrides)}  # the command line wins, as in RecBole
    with cli.hidden_argv():
        return make_blossom_config(model, dataset, args.config_files or None, config_dict)


def validate(args, out_dir):
    """Fail before any training: unknown models, missing datasets, bad config values."""
    for model in args.models:
        get_model_class(model)  # ValueError listing the plugin's and RecBole's models
    for dataset in args.datasets:
        configs = [make_config(args, model, dataset, out_dir) for model in args.models]
        check_dataset(configs[0])
    if args.resume is not None:  # unreadable, or another model's: refused here, before any data is prepared
        checkpoint.check_model(checkpoint.load(args.resume, map_location="cpu"), args.resume, args.models[0])


def result_path(out_dir, dataset, model, eval_mode):
    return os.path.join(out_dir, "results", f"{dataset}__{model}__{eval_mode}.json")


def load_result(path, settings):
    """The stored result of a finished pair, or None; a result made with other settings is an error."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    before = stored.get("settings", {})
    if stored.get("row", {}).get("stopped_by") != "time budget":  # a cap that never bound decides nothing
        before = {k: v for k, v in before.items() if k != "max_train_minutes"}
        settings = {k: v for k, v in settings.items() if k != "max_train_minutes"}
    if before != settings:
        changed = ", ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now"
                            for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k))
        raise UsageError(f"{path} was made with other settings ({changed}): pass --force to rerun it, "
                         f"or use another --out")
    return stored


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup_logging(config, verbose):
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    init_logger(config)  # RecBole's file log under <out>/log/
    for handler in root.handlers:
        if not hasattr(handler, "baseFilename") and not verbose:
            handler.setLevel(logging.WARNING)


def _copy_to_checkpoint_dir(path, checkpoint_dir):
    """A copy of the checkpoint to resume from: the trainer saves its improvements over the file it resumed,
    and the user's file must stay as it was."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    copy = os.path.join(checkpoint_dir, f"{stem}-resumed-{time.strftime('%Y%m%d-%H%M%S')}{ext}")
    shutil.copyfile(path, copy)
    return copy


def run_pair(args, model, dataset, out_dir):
    """Train, early-stop and test one pair; returns the row of the tables (metrics, cost, epochs)."""
    config = make_config(args, model, dataset, out_dir)
    with working_directory(out_dir):
        _setup_logging(config, args.verbose)
        _, train_data, valid_data, test_data = prepare(config)
        net = build_model(config, train_data)
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
        if args.resume is not None:
            trainer.resume_checkpoint(_copy_to_checkpoint_dir(args.resume, config["checkpoint_dir"]))
        device = torch.device(config["device"])
        epoch_times = []
        train_epoch = trainer._train_epoch
        budget = None if args.max_train_minutes is None else 60 * args.max_train_minutes

        def timed_train_epoch(*a, **kw):
            if budget is not None and time.perf_counter() - start > budget:
                raise _TimeBudgetSpent  # between epochs: the last epoch was validated (and saved if best)
            _sync(device)
            epoch_start = time.perf_counter()
            loss = train_epoch(*a, **kw)
            _sync(device)
            epoch_times.append(time.perf_counter() - epoch_start)
            return loss

        trainer._train_epoch = timed_train_epoch
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        stopped = "early stopping or --epochs"
        try:
            trainer.fit(train_data, valid_data, saved=True, show_progress=config["show_progress"])
        except _TimeBudgetSpent:
            stopped = "time budget"
        best_valid = trainer.best_valid_result or {}
        if "ndcg@10" not in best_valid and trainer.valid_metric == "ndcg@10" and math.isfinite(
                trainer.best_valid_score):  # resumed and not improved since: the checkpoint's best score
            best_valid = {"ndcg@10": trainer.best_valid_score}
        test = trainer.evaluate(test_data, load_best_model=True, show_progress=config["show_progress"])
        total = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else "n/a"
        if not args.keep_checkpoints and os.path.isfile(trainer.saved_model_file):
            os.remove(trainer.saved_model_file)
    row = {"dataset": dataset, "model": model, "eval_mode": args.eval_mode,
           **{m: float(test[m]) if m in test else "n/a" for m in METRICS},
           "params": sum(p.numel() for p in net.parameters() if p.requires_grad),
           "sec_per_epoch": sum(epoch_times) / len(epoch_times) if epoch_times else float("nan"),
           "peak_gpu_mem_mib": peak,
           "epochs_run": len(epoch_times), "best_valid_ndcg@10": float(best_valid.get("ndcg@10", "nan")),
           "total_s": total, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           # the process's peak so far: the pair's own peak when it is the process's first (or only) pair
           "peak_host_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "stopped_by": stopped, "start_epoch": trainer.start_epoch}
    del trainer, net, train_data, valid_data, test_data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # a sweep killed mid-write never leaves half a result


def _fmt(column, value):
    if isinstance(value, str):
        return value
    if column in METRICS or column.startswith("best_valid"):
        return f"{value:.4f}"
    if column == "params":
        return f"{value:,}"
    if column == "epochs_run":
        return str(value)
    return f"{value:.2f}" if column == "sec_per_epoch" else f"{value:.0f}"


def write_tables(rows, out_dir, suffix, command, eval_mode):
    """``results{suffix}.csv`` (raw values) and ``results{suffix}.md`` (best metric per dataset in bold)."""
    with open(os.path.join(out_dir, f"results{suffix}.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    shown = ("dataset", "model", *METRICS, "params", "sec_per_epoch", "peak_gpu_mem_mib", "epochs_run")
    names = {"recall@10": "Recall@10", "ndcg@10": "NDCG@10", "mrr@10": "MRR@10", "params": "Params",
             "sec_per_epoch": "s/epoch", "peak_gpu_mem_mib": "Peak GPU MiB", "epochs_run": "Epochs"}
    best = {}
    for row in rows:
        for m in METRICS:
            if not isinstance(row[m], str):
                best[row["dataset"], m] = max(best.get((row["dataset"], m), row[m]), row[m])
    ranking = "full ranking over all items" if eval_mode == "full" else "target vs 100 sampled negatives"
    devices = sorted({row["device"] for row in rows})
    lines = [f"Test split, {ranking}; device: {', '.join(devices) or 'n/a'}.", "", f"Command: `{command}`", "",
             "| " + " | ".join(names.get(c, c.capitalize()) for c in shown) + " |",
             "|" + "|".join("---" if c in ("dataset", "model") else "---:" for c in shown) + "|"]
    for row in rows:
        cells = []
        for c in shown:
            text = _fmt(c, row[c]) + (" (time cap)" if c == "epochs_run" and row["stopped_by"] == "time budget" else "")
            cells.append(f"**{text}**" if c in METRICS and row[c] == best.get((row["dataset"], c)) else text)
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(out_dir, f"results{suffix}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows, path):
    """Grouped bars: one panel a dataset, one group a metric, one bar a model."""
    import matplotlib  # here, not at the top: only the plot needs it (--no-plot runs without matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, dataset in zip(axes[0], datasets):
        by_model = {r["model"]: r for r in rows if r["dataset"] == dataset}
        for i, model in enumerate(models):
            values = [by_model[model][m] if model in by_model and not isinstance(by_model[model][m], str) else 0
                      for m in METRICS]
            ax.bar([j + (i - (len(models) - 1) / 2) * width for j in range(len(METRICS))], values, width,
                   label=model)
        ax.set_xticks(range(len(METRICS)), [m.replace("recall", "Recall").replace("ndcg", "NDCG").replace(
            "mrr", "MRR") for m in METRICS])
        ax.set_title(dataset)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        out_dir = os.path.abspath(args.out)
        validate(args, out_dir)
        pairs = [(d, m) for d in args.datasets for m in args.models]
        done = {}
        for d, m in pairs:
            stored = None if args.force or args.resume else load_result(
                result_path(out_dir, d, m, args.eval_mode), pair_settings(args, m))
            if stored is not None:
                done[d, m] = stored["row"]
    except recbole_blossom.USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(out_dir, exist_ok=True)  # only now: a refused run leaves no empty --out behind

    failed = []
    for i, (dataset, model) in enumerate(pairs, 1):
        tag = f"[{i}/{len(pairs)}] {dataset} / {model}"
        if (dataset, model) in done:
            print(f"{tag}: finished before, skipped (--force reruns it)", flush=True)
            continue
        print(f"{tag}: training (eval {args.eval_mode}) ...", flush=True)
        try:
            row = run_pair(args, model, dataset, out_dir)
        except Exception as err:  # noqa: BLE001  (one failed pair, e.g. out of memory, must not end the sweep)
            print(f"{tag}: FAILED: {type(err).__name__}: {err}", flush=True)
            failed.append(tag)
            continue
        write_json(result_path(out_dir, dataset, model, args.eval_mode),
                   {"settings": pair_settings(args, model), "row": row})
        done[dataset, model] = row
        epochs = f"{row['epochs_run']} epoch{'' if row['epochs_run'] == 1 else 's'}"
        print(f"{tag}: done in {row['total_s']:.0f}s, {epochs} at {row['sec_per_epoch']:.2f}"
              f" s/epoch; test NDCG@10 {_fmt('ndcg@10', row['ndcg@10'])}, Recall@10 "
              f"{_fmt('recall@10', row['recall@10'])}", flush=True)

    rows = [done[p] for p in pairs if p in done]
    suffix = "" if args.eval_mode == "full" else f"-{args.eval_mode}"
    command = "python benchmarks/compare.py " + " ".join(argv)
    if rows:
        write_tables(rows, out_dir, suffix, command, args.eval_mode)
        with open(os.path.join(out_dir, f"results{suffix}.md"), encoding="utf-8") as f:
            print("\n" + f.read(), flush=True)
        written = [f"results{suffix}.md", f"results{suffix}.csv"]
        if not args.no_plot:
            plot(rows, os.path.join(out_dir, f"results{suffix}.png"))
            written.append(f"results{suffix}.png")
        print(f"written to {out_dir}: {', '.join(written)}", flush=True)
    if failed:
        print(f"{len(failed)} pair(s) failed: {', '.join(failed)}; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
