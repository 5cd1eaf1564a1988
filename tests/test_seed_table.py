"""benchmarks/seed_table.py on fake compare.py results: mean and spread over seeds, both inputs, errors."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seed_table = load("seed_table")
compare = load("compare")  # the fake results are written by compare.py's own writer, in its own layout


def row(model, ndcg, recall, mrr, epochs, capped=False, dataset="ml-100k", eval_mode="full"):
    return {"dataset": dataset, "model": model, "eval_mode": eval_mode, "recall@10": recall, "ndcg@10": ndcg,
            "mrr@10": mrr, "params": 1000, "sec_per_epoch": 1.0, "peak_gpu_mem_mib": "n/a", "epochs_run": epochs,
            "best_valid_ndcg@10": 0.1, "total_s": 10.0, "device": "cpu", "peak_host_rss_mib": 100.0,
            "stopped_by": "time budget" if capped else "early stopping or --epochs"}


# three seeds of A at L = 200, one of B, two of A at L = 50 (one ended by the time cap)
JOBS = [
    ("ep200_A_s2021", row("A", 0.0500, 0.1100, 0.0300, 30)),
    ("ep200_A_s2020", row("A", 0.0600, 0.1200, 0.0360, 40)),
    ("ep200_A_s2022", row("A", 0.0700, 0.1600, 0.0330, 50)),
    ("ep200_B_s2020", row("B", 0.0450, 0.1000, 0.0250, 20)),
    ("pp50_A_s2020", row("A", 0.0520, 0.1300, 0.0310, 9, capped=True)),
    ("pp50_A_s2021", row("A", 0.0580, 0.1250, 0.0350, 12)),
]


def settings(seed, length=200):
    return {"config": {}, "overrides": [f"--seed={seed}", f"--MAX_ITEM_LIST_LENGTH={length}"],
            "config_files": [], "eval_mode": "full"}


def write_folders(base, jobs):
    for job, r in jobs:
        seed, length = job.rsplit("_s", 1)[1], 50 if job.startswith("pp50") else 200
        compare.write_json(compare.result_path(str(base / job), r["dataset"], r["model"], r["eval_mode"]),
                           {"settings": settings(seed, length), "row": r})


def line(text, kind, model):
    found = [ln for ln in text.splitlines() if ln.startswith(f"| {kind} |") and f"| {model} |" in ln]
    assert len(found) == 1, text
    return [c.strip() for c in found[0].strip("|").split("|")]


def test_mean_spread_and_per_seed_from_folders(tmp_path, capsys):
    write_folders(tmp_path / "grid", JOBS)
    assert seed_table.main([str(tmp_path / "grid")]) == 0
    text = capsys.readouterr().out
    # A at L = 200: NDCG 0.05 / 0.06 / 0.07 -> mean 0.06, max - min 0.02; Recall mean 0.13, spread 0.05;
    # MRR (0.030 + 0.036 + 0.033) / 3 = 0.033, spread 0.006; epochs 40; per seed in seed order
    assert line(text, "ep200", "A") == [
        "ep200", "ml-100k", "full", "A", "3", "0.0600 (0.0200)", "0.1300 (0.0500)", "0.0330 (0.0060)", "40.0",
        "2020: 0.0600 (40) / 2021: 0.0500 (30) / 2022: 0.0700 (50)"]
    # one seed: no spread
    assert line(text, "ep200", "B")[4:9] == ["1", "0.0450", "0.1000", "0.0250", "20.0"]
    # the time cap is marked per seed and counted
    assert line(text, "pp50", "A")[4:] == ["2", "0.0550 (0.0060)", "0.1275 (0.0050)", "0.0330 (0.0040)",
                                           "10.5 (1/2 capped)", "2020: 0.0520 (9*) / 2021: 0.0580 (12)"]


def test_json_list_gives_the_same_table_and_filters_order(tmp_path, capsys):
    write_folders(tmp_path / "grid", JOBS)
    rows_json = tmp_path / "rows.json"
    rows_json.write_text(json.dumps([list(j) for j in JOBS]))
    assert seed_table.main([str(tmp_path / "grid")]) == 0
    from_folders = capsys.readouterr().out
    assert seed_table.main([str(rows_json)]) == 0
    assert capsys.readouterr().out == from_folders
    assert seed_table.main([str(rows_json), "--kinds", "pp50,ep200", "--models", "B,A"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split("|")[1:5] for ln in out.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert [(r[0].strip(), r[3].strip()) for r in rows[1:]] == [("pp50", "A"), ("ep200", "B"), ("ep200", "A")]


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    def error(*argv):
        assert seed_table.main([str(a) for a in argv]) == 2
        return capsys.readouterr().err

    assert "no such file or folder" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no compare.py results (results/*.json)" in error(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ep200_A_s1": {}}))
    assert f"{bad}: expected a list of [job, row] pairs" in error(bad)
    bad.write_text(json.dumps([["ep200_A_s1", {"model": "A"}]]))
    assert "ep200_A_s1: the row lacks dataset, eval_mode, ndcg@10" in error(bad)
    bad.write_text(json.dumps([["x_A_s1", row("A", "n/a", 0.1, 0.1, 3)]]))
    assert "ndcg@10 is 'n/a', not a number" in error(bad)
    rows_json = tmp_path / "rows.json"
    rows_json.write_text(json.dumps([list(j) for j in JOBS]))
    assert "two results for A on ml-100k (full), kind 'ep200', seed 2021" in error(rows_json, rows_json)
    assert "--kinds: ep512 not among the results (have: ep200, pp50)" in error(rows_json, "--kinds", "ep512")
    # two folders of one kind whose settings differ by more than the seed are never averaged
    write_folders(tmp_path / "grid", JOBS[:1])
    other = tmp_path / "grid" / "ep200_A_s2020"
    compare.write_json(compare.result_path(str(other), "ml-100k", "A", "full"),
                       {"settings": settings(2020, length=512), "row": JOBS[1][1]})
    assert "same kind 'ep200' but other settings besides the seed (overrides)" in error(tmp_path / "grid")
