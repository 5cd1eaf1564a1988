"""run_recbole_blossom.py end to end, as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

CLI = str(Path(__file__).resolve().parents[1] / "run_recbole_blossom.py")
TINY = ["--user_inter_num_interval=[20,25]", "--hidden_size=16", "--inner_size=32", "--n_heads=2",
        "--n_kv_heads=1", "--n_layers=1", "--MAX_ITEM_LIST_LENGTH=20", "--train_batch_size=256", "--epochs=1",
        "--show_progress=False"]


def cli(args, cwd):
    return subprocess.run([sys.executable, CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_cli_trains_and_prints_the_metric_table(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("n_slc_blocks: 2\n")
    res = cli(["--model=BlossomSASRec", "--dataset=ml-100k", f"--config_files={config}", *TINY], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    table = res.stdout.split("BlossomSASRec on ml-100k")[-1]
    assert "best valid" in table and "ndcg@10" in table and "recall@10" in table
    assert "n_slc_blocks = 2" in res.stdout + res.stderr  # the user's file was applied
    assert list((tmp_path / "saved").glob("BlossomSASRec-*.pth"))  # RecBole's checkpoint, in the user's cwd


def test_cli_runs_builtin_models(tmp_path):
    res = cli(["--model=GRU4Rec", "--dataset=ml-100k", "--embedding_size=16", *TINY], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GRU4Rec on ml-100k" in res.stdout


def test_missing_dataset_gives_a_clear_message_not_a_traceback(tmp_path):
    res = cli(["--model=BlossomSASRec", "--dataset=ml-1m"], tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert str(tmp_path / "dataset" / "ml-1m") in res.stderr and "ml-1m.inter" in res.stderr
    assert "--data_path" in res.stderr
    assert not (tmp_path / "dataset").exists()  # nothing was created or downloaded


def test_unknown_model_lists_the_available_ones(tmp_path):
    res = cli(["--model=NoSuchRec", "--dataset=ml-100k"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "NoSuchRec" in res.stderr and "BlossomSASRec" in res.stderr and "SASRec" in res.stderr
