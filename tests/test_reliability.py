"""Bad input fails clearly before any work; training is reproducible, AMP-safe and runs in several processes."""

import glob
import logging
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from recbole.data import create_dataset
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import get_trainer
from tiny_runs import tiny

import recbole_blossom
from recbole_blossom import BlossomHParams, BlossomRuntime
from recbole_blossom.checkpoint import load_checked
from recbole_blossom.checks import (
    DatasetFormatError,
    DatasetNotFoundError,
    InputError,
    check_atomic_files,
    check_dataset,
)
from recbole_blossom.config import BlossomConfig, get_model_class, known_keys, model_defaults
from recbole_blossom.distributed import check_processes
from recbole_blossom.quick_start import build_model, make_config, prepare

# ------------------------------------------------------------------------------------ hyperparameters


@pytest.mark.parametrize("overrides, keys", [
    ({"hidden_size": 30, "n_heads": 4}, ["hidden_size", "n_heads", "divisible"]),
    ({"n_heads": 4, "n_kv_heads": 3}, ["n_heads", "n_kv_heads", "divisible"]),
    ({"cmp_stride": 16, "slc_block_size": 24}, ["slc_block_size", "cmp_stride", "multiple"]),
    ({"cmp_block_len": 8, "cmp_stride": 16, "slc_block_size": 16}, ["cmp_block_len", "cmp_stride", ">="]),
])
def test_inconsistent_hyperparameters_name_both_keys(overrides, keys):
    with pytest.raises(ValueError) as err:
        BlossomHParams(**overrides).validate()
    for key in keys:
        assert key in str(err.value)


COUNTS = [(BlossomHParams, k) for k in ("hidden_size", "n_heads", "n_kv_heads", "cmp_block_len", "cmp_stride",
                                         "slc_block_size", "n_slc_blocks", "stis_window")]
COUNTS.append((BlossomRuntime, "ltis_chunk_size"))


@pytest.mark.parametrize("schema,key", COUNTS)
@pytest.mark.parametrize("value", [0, -2, 1.5, "4"])
def test_non_positive_or_non_integer_counts_are_refused(schema, key, value):
    with pytest.raises(ValueError, match=f"^{key} must be a positive integer, got {value!r}"):
        schema(**{key: value}).validate()


def test_reference_hyperparameters_are_valid():
    BlossomHParams().validate()  # no error: the failures above come from the bad values


def test_bad_hyperparameters_fail_before_any_work(tmp_path, workdir):
    with pytest.raises(ValueError, match="n_heads .* n_kv_heads"):
        recbole_blossom.run("BlossomSASRec", "ml-100k", config_dict=tiny(tmp_path, n_heads=4, n_kv_heads=3))
    assert os.listdir(tmp_path) == []  # no log, no checkpoint folder: nothing started


# ----------------------------------------------------------------------------------------- model names


def test_unknown_model_lists_the_available_ones(tmp_path, workdir):
    with pytest.raises(ValueError) as err:
        get_model_class("BlossomSASRek")
    message = str(err.value)
    assert "'BlossomSASRek' is unknown" in message
    for name in ("BlossomSASRec", "SASRec", "BERT4Rec", "BPR"):
        assert name in message
    with pytest.raises(ValueError, match="'NoSuchModel' is unknown.*BlossomSASRec"):
        recbole_blossom.run("NoSuchModel", "ml-100k", config_dict=tiny(tmp_path))
    assert os.listdir(tmp_path) == []


def test_model_names_resolve_to_plugin_then_recbole_classes():
    from recbole.model.sequential_recommender import SASRec

    assert get_model_class("BlossomSASRec") is recbole_blossom.BlossomSASRec
    assert get_model_class("SASRec") is SASRec


# ------------------------------------------------------------------------------ checks before any work


@pytest.mark.parametrize("model, overrides, pattern", [
    ("SASRec", {"MAX_ITEM_LIST_LENGTH": 0}, "MAX_ITEM_LIST_LENGTH must be a positive integer .* got 0"),
    ("BlossomSASRec", {"MAX_ITEM_LIST_LENGTH": -3}, "MAX_ITEM_LIST_LENGTH must be a positive integer .* got -3"),
    ("LinRec", {"hidden_size": 30, "n_heads": 4}, r"hidden_size \(30\) must be divisible by n_heads \(4\)"),
    ("SASRec", {"hidden_size": 30, "n_heads": 4}, r"hidden_size \(30\) must be divisible by n_heads \(4\)"),
    pytest.param("BlossomSASRec", {"blossom_impl": "fast"}, "blossom_impl=fast runs Triton kernels on a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")),
])
def test_late_failures_are_checked_before_any_work(workdir, tiny_config, model, overrides, pattern):
    with pytest.raises(InputError, match=pattern):
        recbole_blossom.run(model, "ml-100k", config_dict=tiny_config(**overrides))
    assert os.listdir(workdir) == []  # no log/, no saved/: nothing started


def test_heads_are_only_checked_for_models_that_have_them(tmp_path):
    config = BlossomConfig("GRU4Rec", "ml-100k", config_dict=tiny(tmp_path, n_heads=3, hidden_size=16))
    assert config["n_heads"] == 3  # GRU4Rec has no attention heads: nothing to check


def test_recbole_config_errors_become_input_errors(tmp_path):
    with pytest.raises(InputError, match="dataset need to be specified"):
        make_config("SASRec", None, config_dict=tiny(tmp_path))
    with pytest.raises(InputError, match="no metric named 'Recal'"):
        make_config("SASRec", "ml-100k", config_dict=tiny(tmp_path, metrics=["Recal"]))


# -------------------------------------------------------------------------------------- config keys


def test_typo_in_a_config_file_names_the_file_the_key_and_the_intended_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 1\nn_slc_block: 8\n")
    with pytest.raises(InputError, match=f"'n_slc_block' \\(from {re.escape(str(path))}\\) is unknown; "
                                         f"did you mean 'n_slc_blocks'"):
        BlossomConfig("BlossomSASRec", "ml-100k", config_file_list=[str(path)])


@pytest.mark.parametrize("key, intended", [
    ("epoch", "epochs"), ("learning_rte", "learning_rate"), ("max_item_list_length", "MAX_ITEM_LIST_LENGTH"),
    ("stis_windw", "stis_window"), ("train_neg_sample_arg", "train_neg_sample_args"), ("hiden_size", "hidden_size"),
])
def test_typo_in_a_config_dict_is_an_error(key, intended):
    with pytest.raises(InputError, match=f"config key '{key}' .* did you mean '{intended}'"):
        BlossomConfig("BlossomSASRec", "ml-100k", config_dict={key: 1})


def test_legitimate_keys_pass(tmp_path):
    """Keys RecBole reads without a yaml default, dataset keys, the plugin's keys: no error, no warning."""
    given = {"load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "benchmark_filename": None,
             "numerical_features": [], "encoding": "utf-8", "unused_col": None, "val_interval": None,
             "n_slc_blocks": 2, "ltis_chunk_size": 64, "worker": 0, "wandb_project": "x", "enable_amp": False,
             "discretization": None, "kg_reverse_r": False, "checkpoint_dir": str(tmp_path)}
    config = BlossomConfig("BlossomSASRec", "ml-100k", config_dict=given)
    assert all(config[key] == value for key, value in given.items() if key != "load_col")


def test_other_unknown_keys_are_passed_on_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        config = BlossomConfig("SASRec", "ml-100k", config_dict={"my_experiment_tag": "run-7"})
    assert config["my_experiment_tag"] == "run-7"
    assert "my_experiment_tag (from the config dict or the command line)" in caplog.text


@pytest.mark.parametrize("amp, scaler, gpu, warned", [(True, False, True, True), (True, True, True, False),
                                                    (False, False, True, False), (True, False, False, False)])
def test_fp16_without_the_gradient_scaler_is_warned(caplog, monkeypatch, amp, scaler, gpu, warned):
    """RecBole's enable_amp is float16 on CUDA: without enable_scaler gradients underflow (the model did not learn
    on the H100); on the CPU autocast is bfloat16 and needs no scaler."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    with caplog.at_level(logging.WARNING):
        BlossomConfig("BlossomSASRec", "ml-100k", config_dict={"enable_amp": amp, "enable_scaler": scaler})
    assert ("enable_amp: True without enable_scaler: True" in caplog.text) == warned


class KnobRec(SequentialRecommender):
    """A user's own model: the keys its module reads are known."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.knob = config["my_knob_size"]


def test_keys_of_a_users_own_model_are_known(caplog):
    with caplog.at_level(logging.WARNING):
        config = BlossomConfig(KnobRec, "ml-100k", config_dict={"my_knob_size": 3, "loss_type": "CE"})
    assert config["my_knob_size"] == 3 and "my_knob_size" not in caplog.text
    with pytest.raises(InputError, match="'my_knob_sise' .* did you mean 'my_knob_size'"):
        BlossomConfig(KnobRec, "ml-100k", config_dict={"my_knob_sise": 3, "loss_type": "CE"})


def test_every_key_the_plugin_reads_is_known():
    """The plugin's keys reach the typo check through their yaml defaults (properties/): none is missing."""
    root = os.path.dirname(os.path.abspath(recbole_blossom.__file__))
    read = set()
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            read |= set(re.findall(r"""config\w*\s*(?:\[\s*|\.get\(\s*)["']([A-Za-z_]\w*)["']""", f.read()))
    assert read and read <= known_keys(), sorted(read - known_keys())


def test_model_defaults_are_the_models_own_yaml():
    """What benchmarks/efficiency.py builds its models from: the model's yaml, typed as RecBole types it."""
    blossom = model_defaults("BlossomSASRec")
    assert blossom["layer_norm_eps"] == 1e-12 and isinstance(blossom["layer_norm_eps"], float)  # not the string
    assert blossom["n_heads"] == 8 and blossom["stis_sink"] is True and "epochs" not in blossom  # no protocol keys
    assert model_defaults("SASRec")["n_heads"] == 2  # RecBole's own yaml
    assert model_defaults("NoSuchModel") == {}
    assert BlossomConfig("BlossomSASRec", "ml-100k")["n_slc_blocks"] == blossom["n_slc_blocks"]


def test_efficiency_benchmark_refuses_an_unknown_model_name():
    """A typo in ``--models`` is an error naming the allowed models, not a table without that model."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "efficiency.py")
    done = subprocess.run([sys.executable, script, "--device", "cpu", "--models", "SASRec-SDPA", "Blossom-fast-maen"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--models: unknown Blossom-fast-maen; allowed:" in done.stderr and "Blossom-fast-mean" in done.stderr


# ---------------------------------------------------------------------------- protocol defaults, device


def test_pairwise_models_get_negative_sampling_back(tmp_path):
    bpr = BlossomConfig("BPR", "ml-100k")
    assert bpr["train_neg_sample_args"]["distribution"] == "uniform" and bpr["train_neg_sample_args"]["sample_num"] == 1
    pairwise_blossom = BlossomConfig("BlossomSASRec", "ml-100k", config_dict={"loss_type": "BPR"})
    assert pairwise_blossom["train_neg_sample_args"]["distribution"] == "uniform"
    assert BlossomConfig("SASRec", "ml-100k")["train_neg_sample_args"]["distribution"] == "none"  # CE: protocol
    with pytest.raises(InputError, match="BPR trains on pairs .* train_neg_sample_args is None in your config"):
        BlossomConfig("BPR", "ml-100k", config_dict={"train_neg_sample_args": None})


def test_bpr_trains_under_the_shared_protocol(workdir, tiny_config):
    result = recbole_blossom.run("BPR", "ml-100k", config_dict=tiny_config(embedding_size=16))
    assert set(result["test_result"]) == {"recall@10", "mrr@10", "ndcg@10"}
    assert all(math.isfinite(v) for v in result["test_result"].values())


def test_data_path_is_stored_absolute(workdir):
    (workdir / "data" / "toy").mkdir(parents=True)
    config = BlossomConfig("SASRec", "toy", config_dict={"data_path": "data"})
    assert config["data_path"] == str(workdir / "data" / "toy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only machine")
def test_device_settings_read_as_used_without_cuda():
    config = BlossomConfig("SASRec", "ml-100k")
    assert config["use_gpu"] is False and config["gpu_id"] == "" and config["device"].type == "cpu"


# ------------------------------------------------------------------------------------------- datasets

GOOD_INTER = [
    "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    *[f"{u}\t{i}\t{(u + i) % 5 + 1}\t{1000 + 10 * u + i}" for u in range(1, 9) for i in range(1, 7)],
]


def toy_config(root, inter=GOOD_INTER, item=None, **overrides):
    """A config for dataset 'toy' whose atomic files are written under ``root``."""
    folder = root / "toy"
    folder.mkdir(exist_ok=True)
    if inter is not None:
        (folder / "toy.inter").write_text("\n".join(inter) + "\n", encoding="utf-8")
    if item is not None:
        (folder / "toy.item").write_text("\n".join(item) + "\n", encoding="utf-8")
    config_dict = {**tiny(root), "data_path": str(root), "load_col": None, "user_inter_num_interval": None, **overrides}
    return BlossomConfig("SASRec", "toy", config_dict=config_dict)


def test_valid_toy_dataset_passes_and_recbole_loads_it(tmp_path, workdir):
    items = ["1\ta b\t2.5", "2\t\t", "3\tc\t1e3", "4\td\t-1", "5\ta\t0", "6\tb c\t.5"]
    config = toy_config(tmp_path, item=["item_id:token\tgenre:token_seq\tprice:float", *items])
    check_dataset(config)
    dataset = create_dataset(config)
    assert dataset.inter_num == len(GOOD_INTER) - 1
    assert dataset.item_feat["price"][dataset.token2id("item_id", "3")] == 1e3


def test_bundled_ml100k_passes_with_every_column(tmp_path):
    config = BlossomConfig("SASRec", "ml-100k", config_dict={"load_col": None, "checkpoint_dir": str(tmp_path)})
    check_dataset(config)  # .inter, .user and .item of RecBole's ml-100k are well formed


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"dataset 'toy' not found: looked in {tmp_path / 'toy'}"
                                                   r" \(the folder does not exist\)"):
        check_dataset(BlossomConfig("SASRec", "toy", config_dict={"data_path": str(tmp_path)}))
    (tmp_path / "toy").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"it lacks toy\.inter"):
        check_dataset(BlossomConfig("SASRec", "toy", config_dict={"data_path": str(tmp_path)}))


def replaced(line_no, text, lines=GOOD_INTER):
    return [text if i == line_no - 1 else line for i, line in enumerate(lines)]


@pytest.mark.parametrize("inter, overrides, pattern", [
    (replaced(1, "user_id\titem_id:token\trating:float\ttimestamp:float"), {},
     r"toy\.inter: line 1, column 1 is 'user_id', not a 'name:type' pair.*"
     r"types: token, float, token_seq, float_seq"),
    (replaced(1, "user_id:token\titem_id:token\trating:int\ttimestamp:float"), {},
     r"toy\.inter: line 1, column 3 \(rating\) has type 'int'; "
     r"allowed types: token, float, token_seq, float_seq"),
    (replaced(1, "user_id:token,item_id:token,rating:float,timestamp:float"), {},
     r"toy\.inter: line 1, column 1 is 'user_id:token,item_id:token.*field_separator '\\t'"),
    ([line.replace("item_id", "movie_id") for line in GOOD_INTER], {},
     r"toy\.inter: the header has no column 'item_id' \(ITEM_ID_FIELD\); columns: movie_id, rating, timestamp, "
     r"user_id"),
    ([line.rsplit("\t", 1)[0] for line in GOOD_INTER], {},
     r"toy\.inter: the header has no column 'timestamp' \(TIME_FIELD \(eval_args order is TO"),
    (GOOD_INTER, {"USER_ID_FIELD": "session"}, r"no column 'session' \(USER_ID_FIELD\)"),
    (GOOD_INTER, {"load_col": {"inter": ["user_id", "item_id"]}},
     r"column 'timestamp' \(TIME_FIELD.*load_col/unload_col leaves it out"),
    (GOOD_INTER[:1], {}, r"toy\.inter: the header is followed by no interactions"),
    (replaced(4, "1\t3\t5"), {}, r"toy\.inter: line 4 has 3 columns, but the header has 4 "
                                 r"\(user_id, item_id, rating, timestamp\)"),
    (replaced(6, "1\t5\t5\t1000\textra"), {}, r"toy\.inter: line 6 has 5 columns, but the header has 4"),
    (replaced(9, "2\t2\tfive\t1022"), {},
     r"toy\.inter: line 9, column 3 \(rating\) holds 'five', which is not a number; float columns hold"),
    (replaced(1, "user_id:token\titem_id:token\trating:float\ttimestamp:float\tuser_id:token",
              [line + "\t1" for line in GOOD_INTER]), {},
     r"toy\.inter: line 1 names column\(s\) user_id more than once"),
])
def test_malformed_inter_file_names_file_line_and_column(tmp_path, inter, overrides, pattern):
    config = toy_config(tmp_path, inter=inter, **overrides)
    with pytest.raises(DatasetFormatError, match=pattern) as err:
        check_dataset(config)
    assert str(tmp_path / "toy" / "toy.inter") in str(err.value)


def test_protocol_columns_are_loaded_by_default(tmp_path, monkeypatch):
    """RecBole's default load_col keeps user and item only; the protocol orders by time."""
    monkeypatch.chdir(tmp_path)
    toy_config(tmp_path)
    config = BlossomConfig("SASRec", "toy", config_dict={**tiny(tmp_path), "data_path": str(tmp_path),
                                                        "user_inter_num_interval": None})
    assert config["load_col"]["inter"] == ["user_id", "item_id", "timestamp"]
    check_dataset(config)
    assert "timestamp" in create_dataset(config).field2type
    session = [line.replace("user_id", "session") for line in GOOD_INTER]
    toy_config(tmp_path, inter=session)
    config = BlossomConfig("SASRec", "toy", config_dict={"data_path": str(tmp_path), "USER_ID_FIELD": "session"})
    assert config["load_col"]["inter"] == ["user_id", "item_id", "session", "timestamp"]


def test_load_col_without_the_time_column_says_what_to_add(tmp_path):
    config = toy_config(tmp_path, load_col={"inter": ["user_id", "item_id"]})
    with pytest.raises(DatasetFormatError, match=r"add it to load_col \(e\.g\. load_col: \{inter: \[user_id, item_id, "
                                                 r"timestamp\]\}\) or remove load_col"):
        check_dataset(config)


def test_bad_value_past_the_sampled_rows_names_file_and_line(workdir):
    rows = [f"{u}\t{i}\t{u * 100 + i}" for u in range(1, 5001) for i in range(1, 21)]  # 100,000 rows
    rows.append("7\t3\tlate-bad")  # line 100,002: beyond the 100,000 rows the pre-check reads
    folder = workdir / "big"
    folder.mkdir()
    (folder / "big.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    with pytest.raises(DatasetFormatError, match=r"big\.inter: line 100002, column 3 \(timestamp\) holds 'late-bad'"):
        recbole_blossom.run("SASRec", "big", config_dict={**tiny(workdir), "data_path": str(workdir),
                                                          "user_inter_num_interval": None})


def test_time_column_is_optional_when_not_ordering_by_time(tmp_path):
    inter = [line.rsplit("\t", 1)[0] for line in GOOD_INTER]
    config = toy_config(tmp_path, inter=inter, eval_args={"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO",
                                                        "group_by": "user", "mode": "full"})
    check_atomic_files(config)  # no TIME_FIELD needed for a random order


def test_malformed_item_and_float_seq_files(tmp_path):
    pattern = r"toy\.item: line 3, column 2 \(vec\) holds 'x', which is not a number.*seq_separator ' '"
    with pytest.raises(DatasetFormatError, match=pattern):
        check_dataset(toy_config(tmp_path, item=["item_id:token\tvec:float_seq", "1\t0.5 1", "2\t0.5 x"]))
    # a column that load_col leaves out is not checked (RecBole does not read it)
    config = toy_config(tmp_path, item=["item_id:token\tvec:float_seq", "1\t0.5 1", "2\t0.5 x"],
                        load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]})
    check_dataset(config)


def test_missing_additional_feature_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"toy\.ent does not exist; additional_feat_suffix lists 'ent'"):
        check_dataset(toy_config(tmp_path, additional_feat_suffix=["ent"]))


def test_malformed_dataset_fails_before_any_work(tmp_path, monkeypatch):
    toy_config(tmp_path, inter=replaced(5, "3\t2\tbad\t1"))
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DatasetFormatError, match="line 5"):
        recbole_blossom.run("SASRec", "toy",
                            config_dict={**tiny(tmp_path), "data_path": str(tmp_path), "load_col": None})
    assert sorted(os.listdir(tmp_path)) == before  # no log/ and no saved/: nothing started


def test_rows_beyond_the_sample_are_not_read(tmp_path):
    config = toy_config(tmp_path, inter=[*GOOD_INTER, "9\t9\tnot-a-number\t1"])
    check_atomic_files(config, max_rows=len(GOOD_INTER) - 1)  # the bad last row is outside the sample
    with pytest.raises(DatasetFormatError, match=f"line {len(GOOD_INTER) + 1}"):
        check_atomic_files(config, max_rows=len(GOOD_INTER))


# ------------------------------------------------------------------------------------- reproducibility

FEWER = {"user_inter_num_interval": "[20,22)"}  # whole runs: about 100 users of ml-100k


def test_same_seed_gives_the_same_run(tmp_path, workdir):
    first, second = (recbole_blossom.run("BlossomSASRec", "ml-100k", config_dict=tiny(tmp_path / name, seed=7, **FEWER))
                     for name in ("a", "b"))
    assert first["best_valid_result"] == second["best_valid_result"]
    assert first["test_result"] == second["test_result"]
    weights = [load_checked(r["saved_model_file"])["state_dict"] for r in (first, second)]
    for key in weights[0]:
        if weights[0][key].is_cuda:  # the fast path's backward adds dk, dv with float32 atomics, in varying order
            torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-6, msg=key)
        else:
            assert torch.equal(weights[0][key], weights[1][key]), key


# ------------------------------------------------------------------------------------------------ AMP


def test_mixed_precision_trains_without_nan(tmp_path, workdir):
    config = BlossomConfig("BlossomSASRec", "ml-100k", config_dict=tiny(tmp_path, enable_amp=True))
    _, train_data, valid_data, _ = prepare(config)
    model = build_model(config, train_data)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    seen = []
    attention = model.trm_encoder.layer[0].multi_head_attention
    attention.dense.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = trainer._train_epoch(train_data, 0)
    amp_dtype = torch.float16 if config["device"].type == "cuda" else torch.bfloat16  # torch.autocast's defaults
    assert amp_dtype in seen  # RecBole's enable_amp autocasts
    assert math.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained
    result = trainer.evaluate(valid_data, load_best_model=False)
    assert all(math.isfinite(v) for v in result.values())


# ---------------------------------------------------------------------------------- several processes


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) path; GPUs take RecBole's NCCL path")
def test_two_process_cpu_training_with_gloo(tmp_path, workdir):
    result = recbole_blossom.run("BlossomSASRec", "ml-100k", config_dict=tiny(tmp_path, **FEWER), nproc=2,
                                 port=free_port())
    assert result["model"] == "BlossomSASRec"
    assert set(result["test_result"]) == {"recall@10", "mrr@10", "ndcg@10"}
    assert all(math.isfinite(v) for v in result["best_valid_result"].values())
    checkpoint = load_checked(result["saved_model_file"])
    assert checkpoint["config"]["world_size"] == 2 and checkpoint["config"]["single_spec"] is False


@pytest.mark.parametrize("nproc, world_size, group_offset, pattern", [
    (0, -1, 0, "nproc must be an integer >= 1, got 0"),
    (2, 1, 0, r"world_size \(1\) must be -1 \(= nproc\) or at least group_offset \+ nproc \(0 \+ 2\)"),
    (2, 4, 3, r"world_size \(4\) .* ranks 3..4"),
    (2, 4, -1, "group_offset must be an integer >= 0, got -1"),
])
def test_bad_process_layout_fails_before_spawning(tmp_path, workdir, nproc, world_size, group_offset, pattern):
    with pytest.raises(ValueError, match=pattern):
        recbole_blossom.run("BlossomSASRec", "ml-100k", config_dict=tiny(tmp_path), nproc=nproc,
                            world_size=world_size, group_offset=group_offset)
    assert os.listdir(tmp_path) == []


def test_more_processes_than_listed_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pattern = r"nproc=2 needs one GPU per process, but gpu_id lists 1 \('0'\).*--gpu_id=0,1"
    with pytest.raises(ValueError, match=pattern):
        check_processes({"gpu_id": "0", "use_gpu": True}, 2, -1, 0)
    check_processes({"gpu_id": "0,1", "use_gpu": True}, 2, -1, 0)
    check_processes({"gpu_id": "0", "use_gpu": False}, 2, -1, 0)  # CPU processes (gloo) need no GPU
