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

@pytest.fixture
def workdir(workdir, tiny_yaml):
    """The shared workdir, with fixed.yaml: the tiny config for BlossomSASRec on ml-100k."""
    (workdir / "fixed.yaml").write_text(tiny_yaml(model="BlossomSASRec", dataset="ml-100k").read_text())
    return workdir


def test_exhaustive_search_over_a_plugin_model(workdir, capsys):
    (workdir / "space.hyper").write_text("learning_rate choice [0.0001,0.01]\n")
    out = workdir / "results" / "trials.result"
    display = workdir / "plots" / "trials.html"  # a folder that does not exist yet
    code = run_hyper.main(["--config_files=fixed.yaml", "--params_file=space.hyper", f"--output_file={out}",
                           f"--display_file={display}", "--epochs", "1", "--checkpoint_dir", str(workdir / "saved")])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert display.stat().st_size > 1000  # the plot was written into the created folder
    text = out.read_text()
    trials = re.findall(r"learning_rate:(\S+)\nValid result:\n.*ndcg@10 : ([\d.]+)\nTest result:\n(.*)", text)
    assert sorted(float(lr) for lr, _, _ in trials) == [0.0001, 0.01]  # both grid points, through hyperopt 0.3
    assert all("ndcg@10" in test for _, _, test in trials)
    scores = {float(lr): float(ndcg) for lr, ndcg, _ in trials}
    assert scores[0.01] != scores[0.0001]  # the trial's parameter reached the model
    best = max(scores, key=scores.get)
    assert f"best params:  {{'learning_rate': {best}}}" in captured.out
    assert captured.out.count("trial 2 done: learning_rate:") == 1  # one line a trial ...
    assert "trial, best loss" not in captured.out + captured.err  # ... instead of hyperopt's progress bar
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
    (["--epochs"], "lr choice [1]\n", "--epochs has no value"),
    (["--epoch=3"], "lr choice [1]\n", "config key 'epoch' (from the config dict or the command line) is unknown"),
    (["--max_eval=3"], "lr choice [1]\n", "--max_eval is not an option of this command; did you mean --max_evals?"),
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
    assert "the trial {'n_kv_heads': 3} is invalid" in err and "n_heads (2) must be divisible by n_kv_heads (3)" in err


def test_output_paths_are_checked_before_the_first_trial(workdir, capsys):
    (workdir / "space.hyper").write_text("learning_rate choice [0.001]\n")
    (workdir / "a_file").write_text("")
    for flag in ("--output_file", "--display_file"):
        assert run_hyper.main(["--config_files=fixed.yaml", "--params_file=space.hyper",
                               f"{flag}={workdir / 'a_file' / 'out.txt'}"]) == 2
        assert f"{flag} {workdir / 'a_file' / 'out.txt'}: cannot create its folder" in capsys.readouterr().err
    assert run_hyper.main(["--config_files=fixed.yaml", "--params_file=space.hyper", f"--output_file={workdir}"]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert not (workdir / "log").exists()  # no trial started


def test_each_trial_is_written_as_it_finishes(workdir):
    """A search that crashes in its second trial keeps the first trial's result on disk."""
    out = workdir / "trials.result"
    (workdir / "space.hyper").write_text("learning_rate choice [0.1,0.2]\n")
    args = run_hyper.parse_args(["--params_file=space.hyper", f"--output_file={out}"])
    calls = []

    def objective(config_dict, config_file_list=None):
        calls.append(config_dict["learning_rate"])
        if len(calls) == 2:
            raise RuntimeError("the machine went away (simulated)")
        result = {"ndcg@10": 0.25}
        return {"model": "SASRec", "best_valid_score": 0.25, "valid_score_bigger": True,
                "best_valid_result": result, "test_result": result}

    with pytest.raises(RuntimeError, match="went away"):
        run_hyper.make_tuner(objective, args).run()
    assert re.findall(r"learning_rate:(\S+)\nValid result:\nndcg@10 : 0.25", out.read_text()) == [str(calls[0])]


@pytest.mark.parametrize("space, message", [
    ("learning_rte choice [0.1]\n", "config key 'learning_rte' (from space.hyper) is unknown; did you mean "
                                     "'learning_rate'?"),
])
def test_typo_in_the_space_is_refused_before_any_trial(workdir, capsys, space, message):
    (workdir / "space.hyper").write_text(space)
    assert run_hyper.main(["--config_files=fixed.yaml", "--params_file=space.hyper"]) == 2
    assert message in capsys.readouterr().err and not (workdir / "log").exists()
