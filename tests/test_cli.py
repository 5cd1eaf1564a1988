"""run_recbole_blossom.py end to end, as a user runs it."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import recbole_blossom
from recbole_blossom.hparams import LONG_HISTORY

CLI = str(Path(__file__).resolve().parents[1] / "run_recbole_blossom.py")
spec = importlib.util.spec_from_file_location("run_recbole_blossom", CLI)
run_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_cli)


def cli(args, cwd):
    return subprocess.run([sys.executable, CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_cli_trains_and_prints_the_metric_table(tmp_path, tiny_args):
    config = tmp_path / "mine.yaml"
    config.write_text("n_slc_blocks: 3\n")
    args = [a for a in tiny_args if not a.startswith("--n_slc_blocks=")]
    res = cli(["--model=BlossomSASRec", "--dataset=ml-100k", f"--config_files={config}", *args], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    table = res.stdout.split("BlossomSASRec on ml-100k")[-1]
    assert "best valid" in table and "ndcg@10" in table and "recall@10" in table
    assert "n_slc_blocks = 3" in res.stdout + res.stderr  # the user's file was applied
    assert "--dataset=ml-100k" in res.stderr  # the log records the command
    (checkpoint,) = (tmp_path / "saved").glob("BlossomSASRec-*.pth")  # RecBole's checkpoint, in the user's cwd
    (log,) = (tmp_path / "log" / "BlossomSASRec").glob("*.log")
    assert f"checkpoint: {checkpoint}" in table and f"log: {log}" in table  # the end says where things went


def readme_long_history_yaml():
    """The yaml block the README gives for long histories (after "passed with `--config_files=long.yaml`")."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return readme.split("--config_files=long.yaml`:", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]


def test_readme_long_history_yaml_trains(tmp_path, tiny_args):
    """The README's long-history settings as the user would pass them (its yaml file; the tiny sizes, a length
    where LTIS selects, on the command line, which wins over files) reach the model and train."""
    block = readme_long_history_yaml()
    assert {key: yaml.safe_load(block)[key] for key in LONG_HISTORY} == LONG_HISTORY  # what the benchmarks name
    config = tmp_path / "long.yaml"
    config.write_text(block)
    res = cli(["--model=BlossomSASRec", "--dataset=ml-100k", f"--config_files={config}", *tiny_args], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    for line in ("ltis_compression = mean", "use_rope = False", "gate_bias_ltis = 10.0", "MAX_ITEM_LIST_LENGTH = 10"):
        assert re.search(rf"^{line}$", out, re.M), line
    assert "ndcg@10" in res.stdout.split("BlossomSASRec on ml-100k")[-1]


def test_cli_runs_builtin_models(tmp_path, tiny_args):
    res = cli(["--model=GRU4Rec", "--dataset=ml-100k", "--embedding_size=16", *tiny_args], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GRU4Rec on ml-100k" in res.stdout


def write_mydata(root, users=4, steps=6):
    """dataset/mydata/mydata.inter in the documented format: user, item and a timestamp column."""
    folder = root / "dataset" / "mydata"
    folder.mkdir(parents=True)
    rows = [f"{u}\t{(u * t) % 9 + 1}\t{t}" for u in range(1, users + 1) for t in range(1, steps + 1)]
    (folder / "mydata.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    return folder


def test_custom_dataset_with_a_timestamp_runs_end_to_end(tmp_path, tiny_args, monkeypatch):
    """The README's custom-data example: --dataset=mydata, the space form --epochs 1, a checkpoint that loads
    from another folder, no library warnings, the device settings as used."""
    write_mydata(tmp_path)
    args = [a for a in tiny_args if not a.startswith(("--epochs=", "--user_inter_num_interval="))]
    res = cli(["--model=BlossomSASRec", "--dataset=mydata", "--epochs", "1", *args], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "BlossomSASRec on mydata" in res.stdout and "ndcg@10" in res.stdout
    assert re.search(r"^epochs = 1$", out, re.M)  # the space form reached the config
    assert "epoch 0 training" in out and "epoch 1 training" not in out
    assert "Warning" not in res.stderr  # neither torch's GradScaler nor the read-only numpy warning
    if not torch.cuda.is_available():
        assert re.search(r"^use_gpu = False$", out, re.M) and re.search(r"^gpu_id = $", out, re.M)
    (checkpoint,) = (tmp_path / "saved").glob("BlossomSASRec-*.pth")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the checkpoint stores the absolute folder of the data
    config, model, dataset, *_ = recbole_blossom.load_data_and_model(str(checkpoint))
    assert config["data_path"] == str(tmp_path / "dataset" / "mydata")
    assert dataset.user_num == 4 + 1 and "timestamp" in dataset.field2type


def test_missing_dataset_gives_a_clear_message_not_a_traceback(tmp_path):
    res = cli(["--model=BlossomSASRec", "--dataset=ml-1m"], tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert str(tmp_path / "dataset" / "ml-1m") in res.stderr and "ml-1m.inter" in res.stderr
    assert "--data_path" in res.stderr
    assert not (tmp_path / "dataset").exists()  # nothing was created or downloaded


@pytest.mark.parametrize("args, message", [
    (["--model=NoSuchRec"], "model 'NoSuchRec' is unknown"),
    (["--model=SASRek"], "model 'SASRek' is unknown. Did you mean SASRec"),
    (["--model=SASRec", "--epoch=1"], "config key 'epoch' (from the config dict or the command line) is unknown; "
                                      "did you mean 'epochs'?"),
    (["--model=SASRec", "--max_item_list_length=5"], "did you mean 'MAX_ITEM_LIST_LENGTH'?"),
    (["--model=SASRec", "--epochs"], "--epochs has no value: write --epochs=VALUE (or --epochs VALUE)"),
    (["--model=SASRec", "stray"], "unrecognised argument 'stray'"),
    (["--model=SASRec", "--config_files=missing.yaml"], "config file missing.yaml does not exist"),
    (["--model=SASRec", "--config_files=broken.yaml"], "config file broken.yaml, line 2 is not valid yaml"),
    (["--model=BlossomSASRec", "--config_files=typo.yaml"],
     "config key 'n_slc_block' (from typo.yaml) is unknown; did you mean 'n_slc_blocks'?"),
    (["--model=SASRec", "--config_files=list.yaml"], "config file list.yaml must hold 'key: value' lines"),
    (["--model=SASRec", "--MAX_ITEM_LIST_LENGTH=0"], "MAX_ITEM_LIST_LENGTH must be a positive integer"),
    (["--model=BPR", "--train_neg_sample_args=None"], "BPR trains on pairs of a positive and a sampled negative"),
])
def test_bad_input_is_one_line_before_any_work(workdir, capsys, args, message):
    (workdir / "broken.yaml").write_text("epochs: [1\n")
    (workdir / "typo.yaml").write_text("n_slc_block: 8\n")
    (workdir / "list.yaml").write_text("- epochs\n")
    before = sorted(os.listdir(workdir))
    assert run_cli.main([*args, "--dataset=ml-100k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(os.listdir(workdir)) == before  # no log/, no saved/


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only bad input is one line; an error from inside the work (here a KeyError) is not hidden."""
    def crash(*args, **kwargs):
        raise KeyError("neg_item_id")

    monkeypatch.setattr(recbole_blossom, "run", crash)
    with pytest.raises(KeyError, match="neg_item_id"):
        run_cli.main(["--model=SASRec", "--dataset=ml-100k"])
