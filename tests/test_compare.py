"""benchmarks/compare.py on a small slice of ml-100k: tables, resume, clear errors."""

import csv
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_compare():
    spec = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, "benchmarks", "compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = load_compare()


@pytest.fixture
def small(tmp_path):
    """A yaml shrinking ml-100k to about 200 users, and the overrides that shrink the models."""
    path = tmp_path / "small.yaml"
    path.write_text('user_inter_num_interval: "[20,30]"\nMAX_ITEM_LIST_LENGTH: 20\n'
                    "train_batch_size: 512\neval_batch_size: 512\n")
    return ["--config_files", str(path), "--hidden_size", "16", "--inner_size=32", "--embedding_size=16",
            "--n_heads=2"]  # config keys in both forms


def test_sweep_writes_tables_and_resumes(tmp_path, small, capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    argv = ["--models", "GRU4Rec,LinRec", "--datasets", "ml-100k", "--epochs", "1", "--out", str(out), *small]
    assert compare.main(argv) == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(compare.COLUMNS)
    assert [(r["dataset"], r["model"]) for r in rows] == [("ml-100k", "GRU4Rec"), ("ml-100k", "LinRec")]
    for row in rows:
        assert all(0.0 <= float(row[m]) <= 1.0 for m in compare.METRICS)
        assert row["epochs_run"] == "1" and float(row["sec_per_epoch"]) > 0 and int(row["params"]) > 0
        assert row["peak_gpu_mem_mib"] == "n/a" and row["device"] == "cpu" and row["eval_mode"] == "full"
    # the overrides reached the models: LinRec with hidden 16 on ~700 items is far below the 128-wide size
    assert int(rows[1]["params"]) < 50_000
    table = (out / "results.md").read_text()
    assert "| Dataset | Model | Recall@10 | NDCG@10 | MRR@10 | Params | s/epoch | Peak GPU MiB | Epochs |" in table
    assert table.count("| ml-100k |") == 2
    assert (out / "results.png").stat().st_size > 1000
    assert not list((out / "saved").rglob("*.pth"))  # checkpoints are removed unless --keep-checkpoints
    assert list(cwd.iterdir()) == [] and (out / "log" / "LinRec").is_dir()  # RecBole's logs go under --out
    printed = capsys.readouterr().out
    assert table in printed  # the table on the console too
    assert f"written to {out}: results.md, results.csv, results.png" in printed
    assert "1 epoch at" in printed and "1 epochs" not in printed

    # a rerun trains nothing: every pair is read back
    def no_training(*args, **kwargs):
        raise AssertionError("a finished pair was trained again")

    original, compare.run_pair = compare.run_pair, no_training
    try:
        assert compare.main(argv) == 0
    finally:
        compare.run_pair = original
    assert capsys.readouterr().out.count("finished before, skipped") == 2
    with open(out / "results.csv", newline="") as f:
        assert list(csv.DictReader(f)) == rows

    # other settings on the same --out are refused, naming what changed
    assert compare.main([*argv[:5], "2", *argv[6:]]) == 2
    assert "epochs" in capsys.readouterr().err


def test_interrupted_pair_is_rerun(tmp_path, small, monkeypatch):
    out = tmp_path / "out"
    argv = ["--models", "GRU4Rec", "--datasets", "ml-100k", "--epochs", "1", "--out", str(out), *small]
    calls = []

    def fake_run(args, model, dataset, out_dir):
        calls.append(model)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return {c: 0.5 for c in compare.COLUMNS} | {"dataset": dataset, "model": model, "eval_mode": "full",
                                                     "device": "cpu", "stopped_by": "early stopping or --epochs",
                                                     "params": 10, "epochs_run": 1}

    monkeypatch.setattr(compare, "run_pair", fake_run)
    assert compare.main([*argv, "--no-plot"]) == 1  # the failure is reported, nothing stored
    assert not (out / "results" / "ml-100k__GRU4Rec__full.json").exists()
    assert compare.main([*argv, "--no-plot"]) == 0 and calls == ["GRU4Rec", "GRU4Rec"]
    stored = json.loads((out / "results" / "ml-100k__GRU4Rec__full.json").read_text())
    assert stored["row"]["model"] == "GRU4Rec" and stored["settings"]["config"]["epochs"] == 1


def test_resume_continues_a_kept_checkpoint(tmp_path, small, capsys, monkeypatch):
    """--resume: the second sitting starts where the kept checkpoint ended (epoch, weights, optimizer) and
    trains only the epochs left; the user's checkpoint file is left as it was; a path relative to the working
    directory works (the pair itself runs in its --out folder)."""
    first, second = tmp_path / "first", tmp_path / "second"
    argv = ["--models", "GRU4Rec", "--datasets", "ml-100k", "--no-plot", *small]
    assert compare.main([*argv, "--epochs", "1", "--keep-checkpoints", "--out", str(first)]) == 0
    (kept,) = (first / "saved").rglob("*.pth")
    before = kept.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert compare.main([*argv, "--epochs", "3", "--resume", str(kept.relative_to(tmp_path)), "--out", "second"]) == 0
    row = json.loads((second / "results" / "ml-100k__GRU4Rec__full.json").read_text())["row"]
    assert row["start_epoch"] == 1 and row["epochs_run"] == 2  # epochs 1 and 2 of range(1, 3)
    assert kept.read_bytes() == before
    first_row = json.loads((first / "results" / "ml-100k__GRU4Rec__full.json").read_text())["row"]
    assert first_row["start_epoch"] == 0 and first_row["epochs_run"] == 1
    # resuming into a finished --out trains again (the stored result is the sitting before)
    assert compare.main([*argv, "--epochs", "2", "--resume", str(kept), "--out", str(first)]) == 0
    row = json.loads((first / "results" / "ml-100k__GRU4Rec__full.json").read_text())["row"]
    assert row["start_epoch"] == 1 and row["epochs_run"] == 1
    # a sitting that does not improve on the checkpoint reports the checkpoint's best validation score
    assert compare.main([*argv, "--epochs", "1", "--resume", str(kept), "--out", str(tmp_path / "third")]) == 0
    row = json.loads((tmp_path / "third" / "results" / "ml-100k__GRU4Rec__full.json").read_text())["row"]
    assert row["epochs_run"] == 0 and row["best_valid_ndcg@10"] == first_row["best_valid_ndcg@10"] > 0
    # another model's checkpoint is refused before any training, naming both models
    assert compare.main(["--models", "LinRec", *argv[2:], "--resume", str(kept), "--out", str(tmp_path / "x")]) == 2
    assert "holds a GRU4Rec model, but it is being loaded into a LinRec model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["--models", "SASRec,NoSuchModel"], "model 'NoSuchModel' is unknown. Plugin models: BlossomLinRec"),
    (["--models", "SASRec", "--datasets", "no-such-data", "--data_path", "/nonexistent"],
     "dataset 'no-such-data' not found: looked in /nonexistent/no-such-data"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--models", "SASRec", "stray"], "config keys are written --key=value (or --key value)"),
    (["--models", "SASRec", "--hidden_size"], "--hidden_size has no value"),
    (["--models", "SASRec", "--hiden_size=8"], "config key 'hiden_size' (from the config dict or the command line) "
                                               "is unknown; did you mean 'hidden_size'?"),
    (["--model=SASRec"], "--model is not an option of this command; did you mean --models?"),
    (["--models", "SASRec", "--no_plot"], "did you mean --no-plot?"),
    (["--config_files", "/nonexistent.yaml"], "--config_files: /nonexistent.yaml does not exist"),
    (["--models", "SASRec", "--resume", "/nonexistent.pth"], "--resume: /nonexistent.pth does not exist"),
    (["--models", "SASRec,GRU4Rec", "--resume", __file__], "--resume continues one pair: give one model"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    assert compare.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # a refused run leaves no empty --out behind


def test_one_training_mode_for_every_pair(tmp_path):
    """BlossomSASRec's own default is every_position; a sweep trains every model per prefix unless the command
    line or a config file names the mode."""
    def modes(*argv):
        args = compare.parse_args(["--models", "SASRec,BlossomSASRec", "--out", str(tmp_path / "out"), *argv])
        return [compare.make_config(args, m, "ml-100k", str(tmp_path / "out"))["seq_train_mode"] for m in args.models]

    assert modes() == ["per_prefix", "per_prefix"]
    assert modes("--seq_train_mode=every_position")[1] == "every_position"
    path = tmp_path / "mode.yaml"
    path.write_text("seq_train_mode: every_position\n")
    assert modes("--config_files", str(path))[1] == "every_position"
