"""Tune plugin and RecBole models with RecBole's ``HyperTuning`` (hyperopt), like RecBole's ``run_hyper.py``.

    python run_hyper.py --model=BlossomSASRec --dataset=ml-100k --params_file=hyper/blossom.hyper \\
        --algo=bayes --max_evals=30 --output_file=hyper_out/blossom.result
    python run_hyper.py --config_files=hyper/blossom.yaml --params_file=hyper/blossom.hyper --algo=random

Each trial is :func:`recbole_blossom.objective_function` (train with early stopping, test the best
checkpoint) on the fixed config (``--config_files``, ``--model``, ``--dataset`` and any other
``--key=value``) plus the trial's parameters, which win. The params file is RecBole's format, one parameter
a line: ``name choice [a,b,...]``, ``name uniform low,high``, ``name quniform low,high,q`` or
``name loguniform low,high`` (bounds of the log). ``--algo exhaustive`` (RecBole's default) tries every
combination and needs ``choice`` parameters only; ``random`` and ``bayes`` (TPE) draw ``--max_evals``.
As in RecBole, logs go to ``log/`` and checkpoints to ``checkpoint_dir`` (``saved/``).
"""

import argparse
import os
import sys

ALGOS = ("exhaustive", "random", "bayes")
PARAM_TYPES = {"choice": 1, "uniform": 2, "quniform": 3, "loguniform": 2}  # type -> comma-separated values


class UsageError(ValueError):
    """Bad command-line input or params file; the message says what is allowed."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Other --key=value arguments set config keys for every trial.")
    parser.add_argument("--config_files", type=str, default=None, help="fixed config files (space-separated)")
    parser.add_argument("--params_file", type=str, default=os.path.join("hyper", "blossom.hyper"),
                        help="search space, RecBole's format")
    parser.add_argument("--output_file", type=str, default=os.path.join("hyper_out", "hyper.result"),
                        help="every trial's parameters and results")
    parser.add_argument("--display_file", type=str, default=None, help="plotly HTML of the trials")
    parser.add_argument("--tool", type=str, default="hyperopt", help="hyperopt (ray is not supported)")
    parser.add_argument("--algo", type=str, default="exhaustive", help=f"one of {', '.join(ALGOS)}")
    parser.add_argument("--max_evals", type=int, default=100, help="trials for random / bayes")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without gain")
    parser.add_argument("--model", type=str, default=None, help="plugin or RecBole model")
    parser.add_argument("--dataset", type=str, default=None, help="dataset name")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and a.count("=") == 1 and len(a.split("=")[0]) > 2)]
    if bad:
        raise UsageError(f"unrecognised arguments {bad}: config keys are written --key=value")
    if args.tool.lower() != "hyperopt":
        raise UsageError(f"--tool must be hyperopt, got {args.tool!r}: the plugin runs without ray")
    if args.algo not in ALGOS:
        raise UsageError(f"--algo must be one of {', '.join(ALGOS)}, got {args.algo!r}")
    for key in ("max_evals", "early_stop"):
        if getattr(args, key) <= 0:
            raise UsageError(f"--{key} must be a positive integer, got {getattr(args, key)}")
    args.config_files = args.config_files.split() if args.config_files else []
    for path in args.config_files:
        if not os.path.isfile(path):
            raise UsageError(f"--config_files: {path} does not exist")
    args.overrides = dict(a[2:].split("=", 1) for a in rest)
    return args


def check_params_file(path, algo):
    """Validate the search space before any training; returns the parameter names."""
    if not os.path.isfile(path):
        raise UsageError(f"--params_file: {path} does not exist")
    names = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{path}:{number}"
            if len(parts) < 3 or parts[1] not in PARAM_TYPES:
                raise UsageError(f"{where}: expected 'name type values' with type one of "
                                 f"{', '.join(PARAM_TYPES)}, got {line.strip()!r}")
            name, kind, values = parts[0], parts[1], "".join(parts[2:])
            if kind == "choice":
                if not (values.startswith("[") and values.endswith("]")):
                    raise UsageError(f"{where}: choice values are a list like [16,32], got {values!r}")
            elif len(values.split(",")) != PARAM_TYPES[kind]:
                raise UsageError(f"{where}: {kind} takes {PARAM_TYPES[kind]} comma-separated numbers, "
                                 f"got {values!r}")
            if algo == "exhaustive" and kind != "choice":
                raise UsageError(f"{where}: --algo exhaustive tries every combination, so it needs choice "
                                 f"parameters only ({name} is {kind}): use --algo random or --algo bayes")
            names.append(name)
    if not names:
        raise UsageError(f"--params_file: {path} defines no parameter")
    return names


def make_objective(fixed, params_file):
    """The trial function ``HyperTuning`` calls: the fixed config plus the trial's parameters."""
    import recbole_blossom

    def objective(config_dict, config_file_list=None):
        try:
            return recbole_blossom.objective_function({**fixed, **config_dict}, config_file_list)
        except ValueError as err:
            raise UsageError(f"the trial {config_dict} is invalid: {err}. Adjust {params_file}") from err

    return objective


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    saved_argv = sys.argv
    sys.argv = sys.argv[:1]  # RecBole's Config would read --key=value itself, above the trial's parameters
    try:
        import recbole_blossom
        from recbole.config import Config
        from recbole.trainer import HyperTuning

        from recbole_blossom.config import BlossomConfig
        from recbole_blossom.quick_start import check_dataset

        try:
            args = parse_args(argv)
            check_params_file(args.params_file, args.algo)
            fixed = Config._convert_config_dict(None, dict(args.overrides))  # RecBole's typing of --key=value
            fixed.update({k: v for k, v in (("model", args.model), ("dataset", args.dataset)) if v is not None})
            check_dataset(BlossomConfig(config_dict=fixed, config_file_list=args.config_files or None))
            tuner = HyperTuning(make_objective(fixed, args.params_file), algo=args.algo,
                                params_file=args.params_file, fixed_config_file_list=args.config_files or None,
                                display_file=args.display_file, max_evals=args.max_evals,
                                early_stop=args.early_stop)
            tuner.run()
        except (UsageError, recbole_blossom.DatasetNotFoundError, ValueError, KeyError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        tuner.export_result(output_file=args.output_file)
        print("best params: ", tuner.best_params)
        print("best result: ")
        print(tuner.params2result[tuner.params2str(tuner.best_params)])
        print(f"all trials: {args.output_file}")
        return 0
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    sys.exit(main())
