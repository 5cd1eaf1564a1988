"""Tune plugin and RecBole models with RecBole's ``HyperTuning`` (hyperopt), like RecBole's ``run_hyper.py``.

    python run_hyper.py --model=BlossomSASRec --dataset=ml-100k --params_file=hyper/blossom.hyper \\
        --algo=bayes --max_evals=30 --output_file=hyper_out/blossom.result
    python run_hyper.py --config_files=hyper/blossom.yaml --params_file=hyper/blossom.hyper --algo=random

Each trial is :func:`recbole_blossom.objective_function` (train with early stopping, test the best
checkpoint) on the fixed config (``--config_files``, ``--model``, ``--dataset`` and any other
``--key=value`` or ``--key value``) plus the trial's parameters, which win. The output paths are checked (and
their folders created) before the first trial, and ``--output_file`` is rewritten after every trial. The params file is RecBole's format, one parameter
a line: ``name choice [a,b,...]``, ``name uniform low,high``, ``name quniform low,high,q`` or
``name loguniform low,high`` (bounds of the log). ``--algo exhaustive`` (RecBole's default) tries every
combination and needs ``choice`` parameters only; ``random`` and ``bayes`` (TPE) draw ``--max_evals``.
As in RecBole, logs go to ``log/`` and checkpoints to ``checkpoint_dir`` (``saved/``).
"""

import os
import sys

import hyperopt
from recbole.trainer import HyperTuning

import recbole_blossom
from recbole_blossom import cli
from recbole_blossom.checks import check_config_keys, check_dataset
from recbole_blossom.cli import UsageError
from recbole_blossom.config import known_keys
from recbole_blossom.quick_start import make_config

ALGOS = ("exhaustive", "random", "bayes")
PARAM_TYPES = {"choice": 1, "uniform": 2, "quniform": 3, "loguniform": 2}  # type -> comma-separated values


def parse_args(argv):
    parser = cli.new_parser(__doc__, epilog="Other --key=value (or --key value) arguments set config keys for "
                                            "every trial.")
    parser.add_argument("--config_files", type=str, default=None, help="fixed config files (space-separated)")
    parser.add_argument("--params_file", type=str, default=os.path.join("hyper", "blossom.hyper"),
                        help="search space, RecBole's format")
    parser.add_argument("--output_file", type=str, default=os.path.join("hyper_out", "hyper.result"),
                        help="every trial's parameters and results, rewritten after each trial")
    parser.add_argument("--display_file", type=str, default=None, help="plotly HTML of the trials")
    parser.add_argument("--tool", type=str, default="hyperopt", help="hyperopt (ray is not supported)")
    parser.add_argument("--algo", type=str, default="exhaustive", help=f"one of {', '.join(ALGOS)}")
    parser.add_argument("--max_evals", type=int, default=100, help="trials for random / bayes")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without gain")
    parser.add_argument("--model", type=str, default=None, help="plugin or RecBole model")
    parser.add_argument("--dataset", type=str, default=None, help="dataset name")
    args, _ = cli.parse(parser, argv)
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
    return args


def check_output_paths(args):
    """Create the folders of --output_file and --display_file and make sure both can be written, before any
    trial (a search that ends in a traceback after hours of training loses nothing it can keep)."""
    for flag, path in (("--output_file", args.output_file), ("--display_file", args.display_file)):
        if path is None:
            continue
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a folder; give a file name")
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise UsageError(f"{flag} {path}: cannot create its folder {folder} ({err.strerror})") from None
        if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise UsageError(f"{flag} {path} cannot be written (no permission)")


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
    def objective(config_dict, config_file_list=None):
        try:
            return recbole_blossom.objective_function({**fixed, **config_dict}, config_file_list)
        except recbole_blossom.USER_ERRORS as err:
            raise UsageError(f"the trial {config_dict} is invalid: {err}. Adjust {params_file}") from err

    return objective


def make_tuner(objective, args):
    """RecBole's ``HyperTuning`` that rewrites ``--output_file`` after every trial and prints one line a trial
    instead of hyperopt's progress bar (which interleaves with RecBole's log)."""
    class Tuner(HyperTuning):
        def trial(self, params):
            outcome = super().trial(params)
            self.export_result(output_file=args.output_file)
            print(f"trial {len(self.params2result)} done: {self.params2str(params)}; valid score "
                  f"{self.params2result[self.params2str(params)]['best_valid_score']:.4f}; all trials so far: "
                  f"{args.output_file}", flush=True)
            return outcome

        def run(self):
            hyperopt.fmin(self.trial, self.space, algo=self.algo, max_evals=self.max_evals,
                          early_stop_fn=self.early_stop_fn, show_progressbar=False)
            if self.display_file is not None:
                self.plot_hyper()

    return Tuner(objective, algo=args.algo, params_file=args.params_file,
                 fixed_config_file_list=args.config_files or None, display_file=args.display_file,
                 max_evals=args.max_evals, early_stop=args.early_stop)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    with cli.hidden_argv():  # RecBole's Config would read --key=value itself, above the trial's parameters
        try:
            args = parse_args(argv)
            names = check_params_file(args.params_file, args.algo)
            unknown = check_config_keys({name: args.params_file for name in names}, known_keys())
            if unknown:
                print(f"warning: {args.params_file} sets {', '.join(unknown)}, which neither RecBole nor "
                      f"recbole_blossom reads (passed on: your own model may read them)", file=sys.stderr)
            fixed = cli.typed(args.overrides)
            fixed.update({k: v for k, v in (("model", args.model), ("dataset", args.dataset)) if v is not None})
            check_dataset(make_config(config_dict=fixed, config_file_list=args.config_files or None))
            check_output_paths(args)
            tuner = make_tuner(make_objective(fixed, args.params_file), args)
            tuner.run()
        except recbole_blossom.USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        tuner.export_result(output_file=args.output_file)
        print("best params: ", tuner.best_params)
        print("best result: ")
        print(tuner.params2result[tuner.params2str(tuner.best_params)])
        print(f"all trials: {args.output_file}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
