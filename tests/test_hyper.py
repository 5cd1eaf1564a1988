"""run_hyper.py: RecBole's HyperTuning drives the plugin's objective on a tiny space and dataset."""

import importlib.util
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("run_hyper", os.path.join(ROOT, "run_hyper.py"))
run_hyper = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_hyper)

FIXED = """model: BlossomSASRec
dataset: ml-100k
user_inter_num_interval: "[20,30]"
MAX_ITEM_LIST_LENGTH: 20
train_batch_size: 512
eval_batch_size: 512
hidden_size: 16
inner_size: 32
n_heads: 4
n_layers: 1
show_progress: False
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole writes log/ and log_tensorboard/ under the working directory
    (tmp_path / "fixed.yaml").write_text(FIXED)
    return tmp_path


def test_exhaustive_search_over_a_plugin_model(workdir, capsys):
    (workdir / "space.hyper").write_text("learning_rate choice [0.0001,0.01]\n")
    out = workdir / "results" / "trials.result"
    code = run_hyper.main(["--config_files=fixed.yaml", "--params_file=space.hyper", f"--output_file={out}",
                           "--epochs=1", f"--checkpoint_dir={workdir / 'saved'}"])
    assert code == 0
    text = out.read_text()
    trials = re.findall(r"learning_rate:(\S+)\nValid result:\n.*ndcg@10 : ([\d.]+)\nTest result:\n(.*)", text)
    assert sorted(float(lr) for lr, _, _ in trials) == [0.0001, 0.01]  # both grid points, through hyperopt 0.3
    assert all("ndcg@10" in test for _, _, test in trials)
    scores = {float(lr): float(ndcg) for lr, ndcg, _ in trials}
    assert scores[0.01] != scores[0.0001]  # the trial's parameter reached the model
    best = max(scores, key=scores.get)
    assert f"best params:  {{'learning_rate': {best}}}" in capsys.readouterr().out
    assert len(list((workdir / "log" / "BlossomSASRec").iterdir())) == 2  # one RecBole log a trial


def test_random_search_draws_max_evals_trials(workdir):
    (workdir / "space.hyper").write_text("learning_rate loguniform -7,-4\n")
    out = workdir / "trials.result"
    assert run_hyper.main(["--config_files=fixed.yaml", "--params_file=space.hyper", f"--output_file={out}",
                           "--algo=random", "--max_evals=1", "--epochs=1", "--model=LinRec", "--n_layers=1",
                           f"--checkpoint_dir={workdir / 'saved'}"]) == 0
    (lr,) = re.findall(r"learning_rate:(\S+)", out.read_text())
    assert np.exp(-7) <= float(lr) <= np.exp(-4)
    assert (workdir / "log" / "LinRec").is_dir()  # --model overrides the model of the config file


def test_example_space_is_valid_for_every_algorithm():
    names = run_hyper.check_params_file(os.path.join(ROOT, "hyper", "blossom.hyper"), "bayes")
    assert {"learning_rate", "cmp_block_len", "cmp_stride", "slc_block_size", "n_slc_blocks", "stis_window",
            "n_kv_heads", "hidden_dropout_prob"} <= set(names)


def test_example_space_only_holds_valid_blossom_settings():
    """Every combination of the example's choices builds: no trial of a long search dies on a bad combo."""
    import itertools

    from recbole_blossom import BlossomHParams

    choices = {}
    with open(os.path.join(ROOT, "hyper", "blossom.hyper")) as f:
        for line in f:
            name, kind, values = line.split(maxsplit=2)
            if kind == "choice" and name in BlossomHParams.__dataclass_fields__:
                choices[name] = eval(values)
    for combo in itertools.product(*choices.values()):
        BlossomHParams(**dict(zip(choices, combo))).validate()


@pytest.mark.parametrize("args, space, message", [
    ([], "lr loguniform -8,0\n", "--algo exhaustive tries every combination, so it needs choice parameters"),
    (["--algo=bayes"], "lr normal 0,1\n", "space.hyper:1: expected 'name type values' with type one of choice"),
    (["--algo=bayes"], "lr uniform 0\n", "uniform takes 2 comma-separated numbers"),
    (["--algo=bayes"], "\n", "defines no parameter"),
    (["--tool=ray"], "lr choice [1]\n", "--tool must be hyperopt"),
    (["--algo=grid"], "lr choice [1]\n", "--algo must be one of exhaustive, random, bayes"),
    (["--dataset=ml-1m", "--data_path=/nonexistent"], "lr choice [1]\n", "dataset 'ml-1m' not found"),
    (["--model=NoSuchModel"], "lr choice [1]\n", "model 'NoSuchModel' is unknown"),
])
def test_bad_input_is_a_clear_error(workdir, capsys, args, space, message):
    (workdir / "space.hyper").write_text(space)
    assert run_hyper.main(["--config_files=fixed.yaml", "--params_file=space.hyper", *args]) == 2
    assert message in capsys.readouterr().err


def test_invalid_trial_names_the_space(workdir, capsys):
    (workdir / "space.hyper").write_text("n_kv_heads choice [3]\n")
    assert run_hyper.main(["--config_files=fixed.yaml", "--params_file=space.hyper", "--epochs=1",
                           f"--checkpoint_dir={workdir / 'saved'}"]) == 2
    err = capsys.readouterr().err
    assert "the trial {'n_kv_heads': 3} is invalid" in err and "n_heads (4) must be divisible by n_kv_heads (3)" in err
