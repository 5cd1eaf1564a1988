"""SASRecSDPA: the same function as RecBole's SASRec (copied weights), no mask, registered, usable by name."""

import importlib.util
import os

import pytest
import torch
from recbole.data.interaction import Interaction
from recbole.model.sequential_recommender import SASRec
from tiny_runs import TINY, inside

import recbole_blossom
from recbole_blossom import BlossomConfig, SASRecSDPA, get_model_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"hidden_size": 16, "inner_size": 32, "n_layers": 2, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 12,
         "hidden_dropout_prob": 0.3, "attn_dropout_prob": 0.3}


class Items:
    """What ``SequentialRecommender.__init__`` reads from a dataset: the number of items."""

    def __init__(self, n_items):
        self.n_items = n_items

    def num(self, field):
        return self.n_items


def pair(n_items=50):
    """RecBole's SASRec and SASRecSDPA with the same weights."""
    sasrec = SASRec(BlossomConfig(model="SASRec", dataset="ml-100k", config_dict=SIZES), Items(n_items))
    sdpa = SASRecSDPA(BlossomConfig(model="SASRecSDPA", dataset="ml-100k", config_dict=SIZES), Items(n_items))
    sdpa.load_state_dict(sasrec.state_dict())  # strict: the same parameters, by name and shape
    return sasrec.eval(), sdpa.eval()


def batch(n_items, lengths, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    seq = torch.randint(1, n_items, (len(lengths), L), generator=g)
    seq[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    return Interaction({"item_id_list": seq, "item_length": lengths,
                        "item_id": torch.randint(1, n_items, (len(lengths),), generator=g)})


def test_same_function_as_recbole_sasrec():
    sasrec, sdpa = pair()
    data = batch(50, [12, 7, 1, 3])
    with torch.no_grad():
        for method in ("calculate_loss", "predict", "full_sort_predict"):
            expected, got = getattr(sasrec, method)(data), getattr(sdpa, method)(data)
            assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6), method
    # gradients too (dropout off)
    for model in (sasrec, sdpa):
        model.calculate_loss(data).backward()
    expected = dict(sasrec.named_parameters())
    for name, p in sdpa.named_parameters():
        assert torch.allclose(p.grad, expected[name].grad, atol=1e-6), name


def test_without_positions_is_sasrec_with_zero_positions():
    """``use_position_embedding: False``: no position parameters, and the function of RecBole's SASRec whose
    position vectors are zero (causal attention alone tells positions apart)."""
    sasrec = SASRec(BlossomConfig(model="SASRec", dataset="ml-100k", config_dict=SIZES), Items(50)).eval()
    sdpa = SASRecSDPA(BlossomConfig(model="SASRecSDPA", dataset="ml-100k",
                                    config_dict={**SIZES, "use_position_embedding": False}), Items(50)).eval()
    assert not hasattr(sdpa, "position_embedding")
    missing, unexpected = sdpa.load_state_dict(sasrec.state_dict(), strict=False)
    assert missing == [] and unexpected == ["position_embedding.weight"]
    data = batch(50, [12, 7, 1, 3])
    with torch.no_grad():
        with_positions = sasrec.full_sort_predict(data)
        sasrec.position_embedding.weight.zero_()
        expected, got = sasrec.full_sort_predict(data), sdpa.full_sort_predict(data)
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, with_positions, atol=1e-3)


def test_no_mask_is_built_and_padded_rows_are_finite(monkeypatch):
    _, sdpa = pair()

    def no_mask(*args, **kwargs):
        raise AssertionError("SASRecSDPA built RecBole's L x L mask")

    monkeypatch.setattr(sdpa, "get_attention_mask", no_mask)
    data = batch(50, [1, 2, 12])
    with torch.no_grad():
        out = sdpa.sequence_output(data["item_id_list"], data["item_length"])
    assert torch.isfinite(out).all()  # padded query rows included
    sdpa.train()
    sdpa.calculate_loss(data).backward()
    assert all(torch.isfinite(p.grad).all() for p in sdpa.parameters() if p.grad is not None)


def test_registered_with_the_reference_settings():
    assert get_model_class("SASRecSDPA") is SASRecSDPA and "SASRecSDPA" in recbole_blossom.MODELS
    assert SASRecSDPA.supports_every_position
    config = BlossomConfig(model="SASRecSDPA", dataset="ml-100k")
    compare = load_compare()
    assert {k: config[k] for k in compare.REFERENCE["SASRec"]} == compare.REFERENCE["SASRec"]
    assert config["loss_chunk_size"] == 1024 and config["train_batch_size"] == 2048


def load_compare():
    spec = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, "benchmarks", "compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_runs_it_by_name_and_reloads(tmp_path):
    compare = load_compare()
    out = tmp_path / "out"
    argv = ["--models", "SASRecSDPA", "--datasets", "ml-100k", "--epochs", "1", "--out", str(out), "--no-plot",
            "--keep-checkpoints", *[f"--{k}={v}" for k, v in TINY.items() if k not in ("epochs", "show_progress")]]
    with inside(tmp_path):
        assert compare.main(argv) == 0
        saved = list((out / "saved").rglob("*.pth"))
        assert len(saved) == 1
        config, model, *_, test_data = recbole_blossom.load_data_and_model(str(saved[0]))
    assert type(model) is SASRecSDPA
    with torch.no_grad():
        scores = model.eval().full_sort_predict(next(iter(test_data))[0].to(model.device))
    assert scores.shape[1] == model.n_items and torch.isfinite(scores).all()
    assert "| ml-100k | SASRecSDPA |" in (out / "results.md").read_text()


@pytest.mark.parametrize("key, value, message", [("loss_chunk_size", 0, "loss_chunk_size must be a positive"),
                                                 ("seq_train_mode", "every-position", "seq_train_mode must be one of")])
def test_bad_values_are_clear_errors(key, value, message):
    """Refused while the config is built, before any data or model exists (InputError is a ValueError)."""
    with pytest.raises(ValueError, match=message):
        BlossomConfig(model="SASRecSDPA", dataset="ml-100k", config_dict={**SIZES, key: value})
