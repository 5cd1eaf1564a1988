"""Mean and spread over seeds of ``benchmarks/compare.py`` results, as a Markdown table.

    python benchmarks/seed_table.py bench_out/grid                      # every result folder under it
    python benchmarks/seed_table.py bench_out/grid --kinds ep50,ep200 --models SASRecSDPA,BlossomSASRec
    python benchmarks/seed_table.py benchmarks/results/accuracy_h100.json

Inputs are compare.py ``--out`` folders (or folders holding them; every ``results/*.json`` below is read) or a
JSON file holding a list of ``[job, row]`` (``row`` = one compare.py result row). A job is named
``<kind>_<Model>_s<seed>``: the ``--out`` folder's name, or the list's first element. Rows of one kind,
dataset, eval mode and model are one line of the table: the mean and (max - min) over their seeds of NDCG@10,
Recall@10 and MRR@10, the mean epochs, and per seed ``NDCG@10 (epochs)``, ``*`` where ``--max-train-minutes``
ended the training (not converged). A job without ``_s<seed>`` is a line of its own. Result folders of one
line must have the same stored settings but for the ``--seed`` override, so a line never mixes protocols.
"""

import argparse
import glob
import json
import os
import re
import sys

METRICS = ("ndcg@10", "recall@10", "mrr@10")
NAMES = {"ndcg@10": "NDCG@10", "recall@10": "Recall@10", "mrr@10": "MRR@10"}
REQUIRED = ("dataset", "model", "eval_mode", *METRICS, "epochs_run", "stopped_by")
SEED = re.compile(r"_s(\d+)$")


class TableError(ValueError):
    """Bad input: names the file or job and what is wrong."""


def _without_seed(settings):
    """Stored compare.py settings less the ``--seed=N`` override: what the seeds of one line share."""
    return {**settings, "overrides": [a for a in settings.get("overrides", []) if not a.startswith("--seed=")]}


def read_folder(path):
    """``(job, row, settings, source)`` for every compare.py result under ``path``."""
    files = sorted(glob.glob(os.path.join(path, "**", "results", "*.json"), recursive=True))
    if not files:
        raise TableError(f"{path}: no compare.py results (results/*.json) in this folder or below it")
    entries = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                stored = json.load(f)
            row, settings = stored["row"], stored["settings"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TableError(f"{file}: not a compare.py result ({type(err).__name__}: {err})") from None
        job = os.path.basename(os.path.dirname(os.path.dirname(file)))
        entries.append((job, row, settings, file))
    return entries


def read_rows_json(path):
    """``(job, row, None, source)`` for every ``[job, row]`` of a JSON list."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as err:
        raise TableError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                             and isinstance(e[1], dict) for e in data):
        raise TableError(f"{path}: expected a list of [job, row] pairs (job a string, row a compare.py row)")
    return [(job, row, None, f"{path}: {job}") for job, row in data]


def read(paths):
    entries = []
    for path in paths:
        if os.path.isdir(path):
            entries += read_folder(path)
        elif os.path.isfile(path):
            entries += read_rows_json(path)
        else:
            raise TableError(f"{path}: no such file or folder")
    return entries


def split_job(job, model):
    """``<kind>_<Model>_s<seed>`` -> (kind, seed); the model part is optional, the seed may be absent."""
    match = SEED.search(job)
    seed = match.group(1) if match else None
    kind = job[:match.start()] if match else job
    if kind.endswith("_" + model):
        kind = kind[:-len(model) - 1]
    return kind, seed


def group(entries):
    """{(kind, dataset, eval_mode, model): {seed: (row, settings, source)}}, checked."""
    groups = {}
    for job, row, settings, source in entries:
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise TableError(f"{source}: the row lacks {', '.join(missing)} "
                             f"(a compare.py row has {', '.join(REQUIRED)})")
        kind, seed = split_job(job, row["model"])
        key = (kind, row["dataset"], row["eval_mode"], row["model"])
        seeds = groups.setdefault(key, {})
        seed = seed if seed is not None else "-"
        if seed in seeds:
            raise TableError(f"{source} and {seeds[seed][2]}: two results for {row['model']} on {row['dataset']} "
                             f"({row['eval_mode']}), kind {kind!r}, seed {seed}; keep one")
        for _, other_settings, other_source in seeds.values():
            if settings is None or other_settings is None:
                continue
            mine, theirs = _without_seed(settings), _without_seed(other_settings)
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if changed:
                raise TableError(f"{source} and {other_source}: same kind {kind!r} but other settings besides "
                                 f"the seed ({', '.join(changed)}); give them different folder names")
        seeds[seed] = (row, settings, source)
    return groups


def _number(row, metric, source):
    value = row[metric]
    if not isinstance(value, (int, float)):
        raise TableError(f"{source}: {metric} is {value!r}, not a number")
    return float(value)


def summarise(seeds):
    """Mean and (max - min) of each metric, mean epochs, and the per-seed cells, over a group's seeds."""
    order = sorted(seeds, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    stats = {}
    for metric in METRICS:
        values = [_number(seeds[s][0], metric, seeds[s][2]) for s in order]
        stats[metric] = (sum(values) / len(values), max(values) - min(values))
    epochs = [seeds[s][0]["epochs_run"] for s in order]
    capped = [seeds[s][0]["stopped_by"] == "time budget" for s in order]
    per_seed = [f"{s}: {_number(seeds[s][0], 'ndcg@10', seeds[s][2]):.4f} ({e}{'*' if c else ''})"
                for s, e, c in zip(order, epochs, capped)]
    return {"seeds": order, "stats": stats, "epochs": sum(epochs) / len(epochs), "capped": sum(capped),
            "per_seed": per_seed}


def _pick(names, wanted, flag):
    """The wanted names in the wanted order (all, in order of appearance, when none given)."""
    if not wanted:
        return names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise TableError(f"{flag}: {', '.join(unknown)} not among the results (have: {', '.join(names)})")
    return wanted


def table(groups, kinds=None, models=None):
    """The Markdown table: one line per (kind, dataset, eval mode, model)."""
    all_kinds = list(dict.fromkeys(k[0] for k in groups))
    all_models = list(dict.fromkeys(k[3] for k in groups))
    kinds, models = _pick(all_kinds, kinds, "--kinds"), _pick(all_models, models, "--models")
    lines = ["| kind | dataset | eval | model | seeds | " + " | ".join(f"{NAMES[m]} mean (max-min)" for m in METRICS)
             + " | epochs (mean) | per seed |",
             "|---|---|---|---|---:|" + "---:|" * len(METRICS) + "---:|---|"]
    keys = sorted((k for k in groups if k[0] in kinds and k[3] in models),
                  key=lambda k: (kinds.index(k[0]), k[1], k[2], models.index(k[3])))
    for key in keys:
        summary = summarise(groups[key])
        n = len(summary["seeds"])
        cells = [f"{mean:.4f} ({spread:.4f})" if n > 1 else f"{mean:.4f}"
                 for mean, spread in (summary["stats"][m] for m in METRICS)]
        epochs = f"{summary['epochs']:.1f}" + (f" ({summary['capped']}/{n} capped)" if summary["capped"] else "")
        lines.append(f"| {' | '.join(key)} | {n} | {' | '.join(cells)} | {epochs} | "
                     f"{' / '.join(summary['per_seed'])} |")
    lines.append("")
    lines.append("Per seed: `seed: test NDCG@10 (epochs run)`; * = the time cap "
                 "(--max-train-minutes) ended training.")
    return "\n".join(lines) + "\n"


def _names(text):
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="compare.py --out folders (or folders holding them), "
                                                  "or JSON files of [job, row] pairs")
    parser.add_argument("--kinds", help="comma-separated kinds to show, in this order (default: all)")
    parser.add_argument("--models", help="comma-separated models to show, in this order (default: all)")
    args = parser.parse_args(argv)
    try:
        print(table(group(read(args.inputs)), _names(args.kinds), _names(args.models)), end="")
    except TableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
