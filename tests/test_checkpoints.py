"""Safe checkpoints: weights_only loading with an explicit allow-list, clear errors, save/resume/load still work."""

import ast
import collections
import io
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from recbole.utils import get_trainer
from tiny_runs import inside, tiny

import recbole_blossom  # noqa: F401  (applies the shims)
from recbole_blossom.checkpoint import CheckpointError, protocol2_pickle, resolve_model_class, save
from recbole_blossom.checkpoint import load_checked as safe_torch_load
from recbole_blossom.checkpoint import static_safe_globals as checkpoint_safe_globals
from recbole_blossom.checks import DatasetNotFoundError
from recbole_blossom.config import BlossomConfig
from recbole_blossom.model import BlossomSASRec
from recbole_blossom.quick_start import build_model, load_data_and_model, prepare, run_recbole


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny BlossomSASRec run; its result and the folder it ran in."""
    directory = tmp_path_factory.mktemp("trained")
    with inside(directory):
        result = run_recbole("BlossomSASRec", "ml-100k", config_dict=tiny(directory))
    return result, directory


def pickle_protocol(path):
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        return archive.read(name)[1]


def trainer_for(model, directory, **overrides):
    config = BlossomConfig(model, "ml-100k", config_dict=tiny(directory, **overrides))
    _, train_data, valid_data, test_data = prepare(config)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, build_model(config, train_data))
    return trainer, train_data, valid_data, test_data


def assert_same_checkpoint(a, b):
    assert a.keys() == b.keys()
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["config"].final_config_dict == b["config"].final_config_dict
    assert a["config"].model_class is b["config"].model_class
    assert a["best_valid_score"] == b["best_valid_score"] and type(a["best_valid_score"]) is type(b["best_valid_score"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name])


def test_saved_checkpoint_loads_weights_only_with_the_allow_list(trained):
    result, _ = trained
    path = result["saved_model_file"]
    assert pickle_protocol(path) == 2  # the trainer shim saves what weights_only loading reads
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # torch alone refuses it: RecBole's Config is not allowed
    with torch.serialization.safe_globals(checkpoint_safe_globals() + [BlossomSASRec]):
        plain = torch.load(path, weights_only=True)
    checkpoint = safe_torch_load(path)
    assert_same_checkpoint(checkpoint, plain)
    assert checkpoint["config"]["model"] == "BlossomSASRec"
    assert checkpoint["config"].model_class is BlossomSASRec
    assert checkpoint["epoch"] == 0 and isinstance(checkpoint["best_valid_score"], np.float64)


def test_stock_recbole_protocol4_checkpoint_loads(trained, tmp_path):
    result, _ = trained
    checkpoint = safe_torch_load(result["saved_model_file"])
    legacy = tmp_path / "stock.pth"
    torch.save(checkpoint, legacy, pickle_protocol=4)  # what RecBole's trainer writes
    assert pickle_protocol(legacy) == 4
    with pytest.raises(pickle.UnpicklingError, match="Unsupported operand"):
        with torch.serialization.safe_globals(checkpoint_safe_globals() + [BlossomSASRec]):
            torch.load(legacy, weights_only=True)  # torch's weights_only unpickler cannot read protocol 4
    assert_same_checkpoint(safe_torch_load(legacy), checkpoint)


@pytest.mark.parametrize("protocol", [2, 4])
def test_protocol2_reencoding_keeps_every_value(protocol):
    shared = ["a", "b"]
    value = {
        "strings": ["x", "x", "é\u2603", "y" * 300],
        "numbers": (1, -2, 70000, 2**70, -(2**70), 1.5, float("inf")),
        "flags": [None, True, False],
        "shared": (shared, shared),
        "nested": collections.OrderedDict(a={"b": [1, (2, 3)]}, c=()),
        "bytes": [b"\x00\xff raw", b"", b"x" * 300],
        "types": [collections.OrderedDict, torch.device],
    }
    reencoded = protocol2_pickle(pickle.dumps(value, protocol=protocol))
    assert reencoded[1] == 2
    assert {op.name for op, _, _ in __import__("pickletools").genops(reencoded)}.isdisjoint(
        {"FRAME", "MEMOIZE", "STACK_GLOBAL", "SHORT_BINUNICODE", "SHORT_BINBYTES", "BINBYTES"})
    loaded = pickle.loads(reencoded)
    assert loaded == value
    assert loaded["shared"][0] is loaded["shared"][1]


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_checkpoint_with_arbitrary_code_is_refused(trained, tmp_path, protocol):
    result, _ = trained
    checkpoint = safe_torch_load(result["saved_model_file"])
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({**checkpoint, "other_parameter": _RunsCommand(marker)}, path, pickle_protocol=protocol)
    with pytest.raises(CheckpointError) as err:
        safe_torch_load(path)
    assert str(path) in str(err.value) and f"'{os.system.__module__}.system'" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("obj, name", [
    (__import__("argparse").Namespace(lr=0.1), "argparse.Namespace"),
    (io.BytesIO, "_io.BytesIO"),
    (__import__("recbole.model.layers", fromlist=["MLPLayers"]).MLPLayers, "recbole.model.layers.MLPLayers"),
])
def test_types_outside_the_allow_list_are_refused(tmp_path, obj, name):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {}, "extra": obj}, path)
    with pytest.raises(CheckpointError, match=f"{path}.*'{name}'"):
        safe_torch_load(path)


def test_model_classes_resolve_only_for_plugin_and_recbole_models():
    from recbole.model.sequential_recommender.sasrec import SASRec

    assert resolve_model_class("recbole_blossom.model.blossom_sasrec.BlossomSASRec") is BlossomSASRec
    assert resolve_model_class("recbole.model.sequential_recommender.sasrec.SASRec") is SASRec
    assert resolve_model_class("recbole.model.layers.MLPLayers") is None  # not a recommender
    assert resolve_model_class("recbole.model.abstract_recommender.torch") is None  # a module, not a class
    assert resolve_model_class("recbole.model.sequential_recommender.sasrec.nn") is None
    assert resolve_model_class("os.system") is None
    assert resolve_model_class("recbole.model.no_such_module.Model") is None


def test_recbole_model_checkpoint_loads(tmp_path):
    from recbole.model.sequential_recommender.sasrec import SASRec

    path = tmp_path / "class.pth"
    torch.save({"model_class": SASRec, "device": torch.device("cpu")}, path, pickle_protocol=4)
    assert safe_torch_load(path)["model_class"] is SASRec


def test_corrupt_truncated_and_missing_files_name_the_file(trained, tmp_path):
    result, _ = trained
    data = open(result["saved_model_file"], "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 100)
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match=f"checkpoint {path} is not readable"):
            safe_torch_load(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        safe_torch_load(tmp_path / "missing.pth")


def test_trainer_loads_through_the_safe_loader(monkeypatch):
    import recbole.trainer.trainer as trainer_module

    with pytest.raises(ValueError, match="weights_only=False"):
        trainer_module.torch.load("any.pth", weights_only=False)
    assert trainer_module.torch.nn is torch.nn  # everything else is torch's


def test_resume_training_continues_from_the_checkpoint(trained, tmp_path):
    result, directory = trained
    path = str(tmp_path / "resume.pth")  # the resumed run saves into the file it resumed from
    shutil.copyfile(result["saved_model_file"], path)
    with inside(directory):
        trainer, train_data, valid_data, _ = trainer_for("BlossomSASRec", directory, epochs=2)
        trainer.resume_checkpoint(path)
        checkpoint = safe_torch_load(path)
        assert trainer.start_epoch == 1 and trainer.best_valid_score == checkpoint["best_valid_score"]
        for key, value in trainer.model.state_dict().items():
            assert torch.equal(value, checkpoint["state_dict"][key]), key
        trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    resumed = safe_torch_load(path)
    assert resumed["epoch"] == 1
    assert any(not torch.equal(resumed["state_dict"][k], checkpoint["state_dict"][k]) for k in checkpoint["state_dict"])


def test_checkpoint_of_another_model_is_refused(trained):
    result, directory = trained
    with inside(directory):
        trainer, _, _, test_data = trainer_for("SASRec", directory)
        with pytest.raises(CheckpointError, match="holds a BlossomSASRec model.*into a SASRec model"):
            trainer.resume_checkpoint(result["saved_model_file"])
        with pytest.raises(CheckpointError, match="BlossomSASRec.*SASRec"):
            trainer.evaluate(test_data, load_best_model=True, model_file=result["saved_model_file"])


def test_load_data_and_model_reproduces_the_test_result(trained):
    result, directory = trained
    with inside(directory):
        config, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
        assert isinstance(model, BlossomSASRec) and config["model"] == "BlossomSASRec"
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        assert trainer.evaluate(test_data, load_best_model=False) == result["test_result"]


def test_load_data_and_model_evaluates_in_a_fresh_process(trained):
    """A new process that builds no Config (RecBole's ``Config.__init__`` is what sets the numpy 1 aliases its
    metrics read, e.g. ``np.float`` in MRR) loads the checkpoint and evaluates it, to the same result."""
    result, directory = trained
    code = ("import recbole_blossom\n"
            "from recbole.utils import get_trainer\n"
            f"config, model, _, _, _, test = recbole_blossom.load_data_and_model({result['saved_model_file']!r})\n"
            "trainer = get_trainer(config['MODEL_TYPE'], config['model'])(config, model)\n"
            "print(repr({k: float(v) for k, v in trainer.evaluate(test, load_best_model=False).items()}))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(recbole_blossom.__file__)))  # this checkout first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=directory, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    want = {k: float(v) for k, v in result["test_result"].items()}
    assert ast.literal_eval(done.stdout.strip().splitlines()[-1]) == want


def test_checkpoint_with_a_relative_data_path_loads_with_data_path(trained, tmp_path):
    """Checkpoints of older versions store data_path relative to where the run started."""
    result, directory = trained
    checkpoint = safe_torch_load(result["saved_model_file"])
    data_root = os.path.dirname(checkpoint["config"]["data_path"])  # the folder holding ml-100k/
    assert os.path.isabs(checkpoint["config"]["data_path"])  # what this version stores
    checkpoint["config"]["data_path"] = os.path.join("dataset", "ml-100k")
    old = tmp_path / "old.pth"
    save(checkpoint, old)
    with inside(tmp_path):
        with pytest.raises(DatasetNotFoundError, match=r"pass load_data_and_model\(.*old\.pth', data_path=FOLDER\)"):
            load_data_and_model(str(old))
        config, model, _, _, _, test_data = load_data_and_model(str(old), data_path=data_root)
        assert config["data_path"] == os.path.join(data_root, "ml-100k")
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        assert trainer.evaluate(test_data, load_best_model=False) == result["test_result"]


class NotAllowed:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_trainer_loads_checkpoints_weights_only(tmp_path):
    import recbole.trainer.trainer as trainer_module

    path = tmp_path / "ck.pth"
    trainer_module.torch.save({"config": BlossomConfig(model="BlossomSASRec", dataset="ml-100k"),
                               "w": torch.ones(2)}, path)
    loaded = trainer_module.torch.load(path, map_location="cpu")
    assert loaded["config"]["model"] == "BlossomSASRec" and torch.equal(loaded["w"], torch.ones(2))
    with pytest.raises(ValueError, match="weights_only=False"):
        trainer_module.torch.load(path, weights_only=False)
    torch.save({"evil": NotAllowed()}, tmp_path / "evil.pth")  # a class outside the allow-list
    with pytest.raises(Exception, match="print"):
        trainer_module.torch.load(tmp_path / "evil.pth")
