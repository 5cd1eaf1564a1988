"""benchmarks/make_long_dataset.py (deterministic, with the planted structure) and benchmarks/pipeline.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from make_long_dataset import copy_rule, generate, last_seen, make, window_report, window_rule_recall  # noqa: E402

SMALL = {"clusters": 4, "interests": 3, "cycle": 20, "episode_min": 10, "episode_max": 20}


def read(folder, name="long"):
    with open(os.path.join(folder, f"{name}.inter")) as f:
        header = f.readline().rstrip("\n")
        rows = [line.rstrip("\n").split("\t") for line in f]
    return header, rows


def test_same_seed_same_file_other_seed_other_file(tmp_path):
    paths = [make(6, 50, 100, seed, str(tmp_path / str(i)), **SMALL) for i, seed in enumerate((3, 3, 4))]
    data = [open(os.path.join(p, "long.inter"), "rb").read() for p in paths]
    assert data[0] == data[1] and data[0] != data[2]


def test_file_shape(tmp_path):
    header, rows = read(make(6, 50, 100, 0, str(tmp_path), **SMALL))
    assert header == "user_id:token\titem_id:token\ttimestamp:float"
    assert len(rows) == 6 * 50 and all(len(r) == 3 for r in rows)
    for u in range(6):
        mine = [r for r in rows if int(r[0]) == u]
        assert [int(float(r[2])) for r in mine] == list(range(50))
    assert all(0 <= int(r[1]) < 100 for r in rows)


def test_copy_rule_on_a_known_history():
    # x: a b c a b d a ; after the 2nd a: b (hit, 3 back), after 2nd b: d (miss), after 3rd a: end
    hit_rate, distances = copy_rule(np.array([[1, 2, 3, 1, 2, 4, 1]]))
    assert hit_rate == pytest.approx(1 / 2) and distances.tolist() == [3, 3]


def test_planted_structure_is_long_range():
    histories = generate(8, 600, 400, seed=1, noise=0.0, **SMALL)
    hit_rate, distances = copy_rule(histories)
    # Without noise the next item is what followed the previous one last time, except around episode switches
    # (about 2 misses per episode of 15), and the previous time is never less than a cycle back.
    assert hit_rate > 0.8 and distances.min() >= SMALL["cycle"]
    assert np.median(distances) >= SMALL["interests"] * SMALL["cycle"] * 0.8
    # Each user stays within its m interests: at most m * cycle distinct items.
    assert all(len(set(h)) <= SMALL["interests"] * SMALL["cycle"] for h in histories)
    noisy, _ = copy_rule(generate(8, 600, 400, seed=1, noise=0.3, **SMALL))
    assert noisy < hit_rate - 0.3


def test_last_seen_against_a_loop():
    histories = np.random.default_rng(0).integers(0, 6, (3, 40))
    expected = np.full(histories.shape, -1)
    for u, row in enumerate(histories):
        for t in range(len(row)):
            earlier = [s for s in range(t) if row[s] == row[t]]
            if earlier:
                expected[u, t] = t - earlier[-1]
    assert (last_seen(histories) == expected).all()


def test_random_draws_plant_favourites_far_back():
    # 6 interests a user, episodes of 10-20: an interest's previous episode is at least 5 * 10 = 50 steps back.
    options = {**SMALL, "interests": 6, "clusters": 8, "cycle": 8}
    cycles = generate(8, 600, 400, seed=1, noise=0.0, **options)
    assert (generate(8, 600, 400, seed=1, noise=0.0, draws="cycle", **options) == cycles).all()
    histories = generate(8, 600, 400, seed=1, noise=0.0, draws="random", **options)
    # The same favourites (each (user, interest) its cycle's items), drawn in another order.
    assert all(set(h) == set(c) for h, c in zip(histories, cycles))
    assert not (histories == cycles).all()
    # Each episode's items come from one interest's 8 favourites: about every item has been seen before, and a
    # window of 40 items (shorter than the gap between episodes of an interest) sees far fewer of them than 200.
    distance = last_seen(histories)[:, 100:]
    near, far = ((distance >= 1) & (distance <= 40)).mean(), ((distance >= 1) & (distance <= 200)).mean()
    assert far > 0.97 and near < far - 0.25
    assert last_seen(cycles)[:, 100:].min() >= options["cycle"]  # a cycle never repeats within C


def test_window_rule_recall_on_a_known_history():
    # interests of 10 ids; at t = 6 the previous item (12) is interest 1: in a window of 6 its items are
    # 11 (twice), 12, 13 -> top 2 = 11, then 12 (more recent than 13); interest-0 items are not ranked.
    row = np.array([[11, 13, 1, 11, 2, 12, 12]])
    assert window_rule_recall(row, 6, 10, [6], k=2) == 1.0
    assert window_rule_recall(row, 6, 10, [6], k=1) == 0.0
    assert window_rule_recall(row, 1, 10, [6], k=1) == 1.0  # the window holds only 12
    row[0, 6] = 13
    assert window_rule_recall(row, 6, 10, [6], k=2) == 0.0 and window_rule_recall(row, 6, 10, [6], k=3) == 1.0


def test_random_draws_reward_a_long_window():
    """The counting rule gains from a window that reaches an interest's earlier episodes."""
    options = {**SMALL, "interests": 6, "clusters": 8, "cycle": 8}
    histories = generate(30, 600, 400, seed=2, draws="random", **options)
    short, long = (window_rule_recall(histories, w, 50, range(500, 600)) for w in (40, 300))
    assert long > short + 0.15, (short, long)


def test_window_report_on_known_histories():
    # test items (last column): 12, last seen 2 back; 5, seen 4 back; 7, never seen. Interests of 10 ids.
    rows = np.array([[11, 13, 12, 11, 12], [5, 1, 2, 3, 5], [1, 2, 3, 4, 7]])
    report = window_report(rows, [1, 2, 4, 5], 10, rule_users=2)
    assert [r["L"] for r in report] == [1, 2, 4, 5]
    assert [r["test_item_in_window"] for r in report] == [0.0, round(1 / 3, 4), round(2 / 3, 4), round(2 / 3, 4)]
    # the rule on the first two users: user 0's item before the test is 11 (interest 1), whose items in the
    # window include 12 from L = 2 on; user 1's is 3 (interest 0), whose window items include 5 from L = 4 on
    assert [r["rule_recall@10"] for r in report] == [0.0, 0.5, 1.0, 1.0]


def test_report_flag_prints_one_line_per_length(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "make_long_dataset.py")
    args = [sys.executable, script, "--users", "30", "--history", "200", "--items", "400", "--clusters", "8",
            "--interests", "6", "--cycle", "8", "--episode_min", "4", "--episode_max", "8", "--draws", "random",
            "--out", str(tmp_path)]
    res = subprocess.run(args + ["--report", "10", "150"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()[1:]]
    histories = generate(30, 200, 400, 0, clusters=8, interests=6, cycle=8, episode_min=4, episode_max=8,
                         draws="random")
    assert lines == window_report(histories, [10, 150], 50)
    assert lines[1]["test_item_in_window"] > lines[0]["test_item_in_window"]
    res = subprocess.run(args + ["--report", "0"], capture_output=True, text=True)
    assert res.returncode == 2 and "--report lengths must be >= 1" in res.stderr


def test_bad_arguments_are_clear(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "make_long_dataset.py")
    res = subprocess.run([sys.executable, script, "--users", "2", "--history", "5", "--items", "10",
                          "--cycle", "50", "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "cycle (50) <= items // clusters (0)" in res.stderr
    res = subprocess.run([sys.executable, script, "--users", "2", "--history", "5", "--items", "10",
                          "--draws", "shuffle", "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "--draws: invalid choice: 'shuffle'" in res.stderr
    with pytest.raises(ValueError, match="draws is 'shuffle'; allowed: cycle, random"):
        generate(2, 5, 10, 0, clusters=1, interests=1, cycle=5, draws="shuffle")


def run_pipeline(tmp_path, *flags):
    script = os.path.join(ROOT, "benchmarks", "pipeline.py")
    res = subprocess.run([sys.executable, script, "--users", "20", "--history", "30", "--items", "20000",
                          "--data_path", str(tmp_path), "--batches", "2", *flags], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_pipeline_benchmark_one_line_per_configuration(tmp_path):
    lines = run_pipeline(tmp_path, "--lengths", "5", "40", "--pipeline", "both")
    assert [(x["pipeline"], x["L"]) for x in lines] == [("recbole", 5), ("recbole", 40), ("ours", 5), ("ours", 40)]
    for x in lines:
        assert x["status"] == "ok" and x["prep_s"] > 0 and x["peak_rss_mib"] > 50
        assert x["train_rows"] == 20 * (30 - 3)  # leave-one-out training rows: all but the first, valid, test


def test_pipeline_benchmark_memory_guard(tmp_path):
    (line,) = run_pipeline(tmp_path, "--lengths", "5", "--pipeline", "ours", "--max-rss-gb", "0.05")
    assert line["status"] == "over_limit" and line["prep_s"] is None and "--max-rss-gb 0.05" in line["reason"]
