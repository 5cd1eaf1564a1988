"""Each compatibility shim of recbole_blossom.compat, checked on the behaviour it fixes."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import recbole_blossom


def test_numpy_aliases_let_recbole_config_build():
    assert np.float_ is np.float64 and np.complex_ is np.complex128 and np.unicode_ is np.str_
    config = recbole_blossom.BlossomConfig(model="SASRec", dataset="ml-100k")  # runs compatibility_settings
    assert config["model"] == "SASRec" and np.float is np.float64


def test_import_does_not_need_ray_and_keeps_anomaly_mode_off():
    code = ("import sys, torch, recbole_blossom; "
            "print('ray' in sys.modules, torch.is_anomaly_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_users_anomaly_mode_is_kept():
    code = ("import torch; torch.autograd.set_detect_anomaly(True); import recbole_blossom; "
            "print(torch.is_anomaly_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True"]


@pytest.fixture
def atomic_dataset(tmp_path):
    """A tiny dataset with missing values in a token_seq, a token and a float item feature."""
    root = tmp_path / "tiny"
    root.mkdir()
    rows = [f"{u}\t{i}\t{t}" for u in range(1, 4) for t, i in enumerate(range(1, 7))]
    (root / "tiny.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    items = ["1\ta b\tx\t1.0", "2\t\ty\t3.0", "3\tc\t\t", "4\ta\tx\t5.0", "5\tb\ty\t", "6\tc\tz\t2.0"]
    (root / "tiny.item").write_text("item_id:token\tgenre:token_seq\tbrand:token\tprice:float\n" + "\n".join(items) + "\n")
    return tmp_path


def test_missing_values_are_filled_under_pandas_copy_on_write(atomic_dataset):
    from recbole.data import create_dataset

    config = recbole_blossom.BlossomConfig(
        model="SASRec", dataset="tiny",
        config_dict={"data_path": str(atomic_dataset), "normalize_all": False,
                     "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                                  "item": ["item_id", "genre", "brand", "price"]}})
    dataset = create_dataset(config)
    feat = dataset.item_feat
    item = {raw: dataset.token2id("item_id", raw) for raw in ["2", "3", "5"]}
    assert feat["genre"][item["2"]].sum().item() == 0  # empty token sequence, not a crash
    assert feat["brand"][item["3"]].item() == 0  # missing token -> [PAD]
    assert feat["price"][item["5"]].item() == pytest.approx((1.0 + 3.0 + 5.0 + 2.0) / 4)  # mean imputation
    assert not np.isnan(np.asarray(feat["price"], dtype=float)).any()


def test_ensure_dir_survives_another_process_creating_the_folder_first(tmp_path, monkeypatch):
    import os

    import recbole.data.utils as data_utils
    import recbole.trainer.trainer as trainer_module
    import recbole.utils.logger as logger_module

    folder = tmp_path / "saved"
    folder.mkdir()  # the other process won the race
    monkeypatch.setattr(os.path, "exists", lambda path: False)  # ...after this process had checked
    for module in (trainer_module, logger_module, data_utils):
        module.ensure_dir(str(folder))  # RecBole's own raised FileExistsError here
    assert folder.is_dir()


def test_recbole_dataset_tensors_own_their_memory():
    """pandas 3 hands out read-only arrays; RecBole's dataset module copies them instead of sharing them."""
    import recbole.data.dataset.dataset as dataset_module

    array = np.arange(5, dtype=np.int64)
    array.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" UserWarning would raise here
        tensor = dataset_module.torch.LongTensor(array)
        floats = dataset_module.torch.FloatTensor(array.astype(np.float64))
    tensor[0] = 7  # defined behaviour: the tensor owns its memory
    assert array[0] == 0 and tensor.tolist() == [7, 1, 2, 3, 4] and floats.dtype == torch.float32
    assert dataset_module.torch.nn is torch.nn  # everything else is torch's


def test_trainer_amp_has_no_deprecation_warning():
    import recbole.trainer.trainer as trainer_module

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.cuda.amp.GradScaler(...) raises a FutureWarning here
        scaler = trainer_module.amp.GradScaler(enabled=False)
        with trainer_module.amp.autocast(enabled=False):
            pass
    assert isinstance(scaler, torch.amp.GradScaler) and not scaler.is_enabled()
