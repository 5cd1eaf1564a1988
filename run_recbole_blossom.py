"""Train and evaluate a plugin or RecBole model, like RecBole's ``run_recbole.py``.

    python run_recbole_blossom.py                                   # demo: BlossomSASRec on ml-100k, CPU-sized
    python run_recbole_blossom.py --model=BlossomSASRec --dataset=ml-1m
    python run_recbole_blossom.py --model=SASRec --dataset=ml-100k --config_files="a.yaml b.yaml" --epochs=5

Any other ``--key=value`` (or ``--key value``) sets a config key; it wins over the config files.
"""

import os
import sys

import recbole_blossom
from recbole_blossom import cli

# A CPU-sized configuration for the no-argument demo: a few minutes on 2 cores.
DEMO = {
    "model": "BlossomSASRec",
    "dataset": "ml-100k",
    "config_dict": {
        "epochs": 2,
        "hidden_size": 64,
        "inner_size": 128,
        "n_heads": 4,
        "n_kv_heads": 2,
        "train_batch_size": 1024,
        "eval_batch_size": 4096,
        "MAX_ITEM_LIST_LENGTH": 20,
        "show_progress": True,
    },
}


def parse_args(argv):
    """The options below, and ``args.overrides``: ``{key: raw value}`` of every other ``--key``."""
    parser = cli.new_parser(__doc__)
    parser.add_argument("--model", "-m", type=str, default=None, help="plugin or RecBole model name")
    parser.add_argument("--dataset", "-d", type=str, default=None, help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated yaml files")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this machine")
    parser.add_argument("--ip", type=str, default="localhost", help="master address of torch.distributed")
    parser.add_argument("--port", type=str, default="5678", help="master port of torch.distributed")
    parser.add_argument("--world_size", type=int, default=-1, help="processes over all machines")
    parser.add_argument("--group_offset", type=int, default=0, help="global rank of this machine's first process")
    args, _ = cli.parse(parser, argv)
    return args


def result_table(result):
    """Best-valid and test metrics as a text table."""
    valid, test = result["best_valid_result"], result["test_result"]
    rows = [f"{'metric':<12}{'best valid':>12}{'test':>12}"]
    rows += [f"{name:<12}{valid.get(name, float('nan')):>12.4f}{test.get(name, float('nan')):>12.4f}" for name in test]
    return "\n".join(rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        if not argv:
            model, dataset, config_dict = DEMO["model"], DEMO["dataset"], dict(DEMO["config_dict"])
            print(f"No arguments: running the demo, {model} on {dataset} with a CPU-sized config {config_dict}")
        else:
            model, dataset, config_dict = args.model, args.dataset, cli.typed(args.overrides)
        config_files = args.config_files.split() if args.config_files else None
        with cli.hidden_argv():
            result = recbole_blossom.run(model, dataset, config_file_list=config_files, config_dict=config_dict,
                                         nproc=args.nproc, world_size=args.world_size, ip=args.ip, port=args.port,
                                         group_offset=args.group_offset)
    except recbole_blossom.USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(f"\n{result['model']} on {dataset or ''}\n{result_table(result)}")
        if result.get("saved_model_file"):
            print(f"checkpoint: {os.path.abspath(result['saved_model_file'])}")
        if result.get("log_file"):
            print(f"log: {result['log_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
