"""seq_train_mode: every_position, loss side: equal to RecBole's per-prefix losses, chunking, refusals."""

import pytest
import torch
from memory_probe import LargestTensor
from recbole.data.interaction import Interaction
from tiny_runs import TINY, inside, model_without_data

import recbole_blossom
from recbole_blossom import BlossomConfig, BlossomLinRec, BlossomSASRec, LinRec, SASRecSDPA
from recbole_blossom.data import check_data_config
from recbole_blossom.model import target_list_field
from recbole_blossom.model.base import chunked_cross_entropy
from recbole_blossom.quick_start import build_model, prepare

L = 24  # with these block sizes LTIS selects 2 of up to 11 past blocks: selection is active
SIZES = {"hidden_size": 16, "inner_size": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "cmp_block_len": 4,
         "cmp_stride": 2, "slc_block_size": 2, "n_slc_blocks": 2, "stis_window": 3, "MAX_ITEM_LIST_LENGTH": L,
         "seq_train_mode": "every_position",
         "initializer_range": 0.2}  # larger than RecBole's 0.02, so that every output depends on the other items
CAUSAL = [(BlossomSASRec, {}), (SASRecSDPA, {}), (BlossomLinRec, {}), (LinRec, {"linrec_causal": True})]
N_ITEMS = 40


def build(model_class, **overrides):
    return model_without_data(model_class, N_ITEMS, {**SIZES, **overrides})


def histories(seed=0):
    """Training histories of 5 users, 2 to L + 1 items each, so that each fits one window of L inputs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, N_ITEMS, (n,), generator=g).tolist() for n in (L + 1, 2, 9, 17, L)]


def every_position_batch(users):
    """The contract's batch: inputs items[:-1], targets items[1:], left-aligned, 0 = padding."""
    seq, target = torch.zeros(len(users), L, dtype=torch.long), torch.zeros(len(users), L, dtype=torch.long)
    for b, items in enumerate(users):
        seq[b, :len(items) - 1] = torch.tensor(items[:-1])
        target[b, :len(items) - 1] = torch.tensor(items[1:])
    lengths = torch.tensor([len(items) - 1 for items in users])
    return Interaction({"item_id_list": seq, "item_length": lengths, "target_item_id_list": target})


def per_prefix_batch(users):
    """RecBole's batch: one row per prefix, the next item as the target."""
    rows = [(items[:t], items[t]) for items in users for t in range(1, len(items))]
    seq = torch.zeros(len(rows), L, dtype=torch.long)
    for r, (prefix, _) in enumerate(rows):
        seq[r, :len(prefix)] = torch.tensor(prefix)
    return Interaction({"item_id_list": seq, "item_length": torch.tensor([len(p) for p, _ in rows]),
                        "item_id": torch.tensor([t for _, t in rows])})


def test_target_field_name_follows_the_config():
    assert target_list_field({"ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list"}) == "target_item_id_list"
    assert target_list_field({"ITEM_ID_FIELD": "song", "LIST_SUFFIX": "_seq"}) == "target_song_seq"


@pytest.mark.parametrize("model_class, overrides", CAUSAL)
def test_loss_and_gradients_equal_the_per_prefix_ones(model_class, overrides):
    model = build(model_class, **overrides).eval()  # dropout off
    assert model.causal
    users = histories()
    grads = []
    losses = []
    for data in (every_position_batch(users), per_prefix_batch(users)):
        model.zero_grad()
        loss = model.calculate_loss(data)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(per_prefix_batch(users)) == sum(len(items) - 1 for items in users)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("model_class, overrides", CAUSAL[:2])
def test_chunking_changes_neither_loss_nor_gradients(model_class, overrides):
    data = every_position_batch(histories(seed=1))
    results = []
    for chunk in (1, 7, 1024):
        model = build(model_class, loss_chunk_size=chunk, **overrides).eval()
        loss = model.calculate_loss(data)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    for loss, grads in results[:2]:
        assert loss == pytest.approx(results[-1][0], rel=1e-6)
        assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(grads, results[-1][1]))


def test_padded_positions_and_later_items_do_not_count():
    model = build(BlossomSASRec).eval()
    data = every_position_batch(histories())
    before = model.calculate_loss(data).item()
    seq, target, real = data["item_id_list"], data["target_item_id_list"], data["item_id_list"] != 0
    seq[~real], target[~real] = 7, 9  # garbage behind the lengths
    assert model.calculate_loss(data).item() == pytest.approx(before, rel=1e-6)


def test_chunked_loss_bounds_the_logits_in_both_passes():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(600, 8, generator=g, requires_grad=True)
    weight = torch.randn(300, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (600,), generator=g)
    with LargestTensor() as probe:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=50)
        loss.backward()
    assert probe.largest <= 50 * 300 < 600 * 300, probe.largest
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-7) and torch.allclose(grads[1], weight.grad, atol=1e-7)


def test_models_that_cannot_train_on_every_position_refuse_clearly():
    assert BlossomSASRec.supports_every_position and SASRecSDPA.supports_every_position
    assert BlossomLinRec.supports_every_position and not LinRec.supports_every_position
    with pytest.raises(ValueError, match="LinRec is bidirectional unless linrec_causal: True"):
        build(LinRec)
    with pytest.raises(ValueError, match="loss_type 'BPR' is not implemented for it"):
        build(BlossomSASRec, loss_type="BPR")
    # a bidirectional LinRec built for per_prefix refuses a batch with every-position targets
    model = build(LinRec, seq_train_mode="per_prefix")
    with pytest.raises(ValueError, match="linrec_causal: True"):
        model.calculate_loss(every_position_batch(histories()))


def test_epoch_loss_through_the_data_pipeline_equals_the_per_prefix_one(tmp_path):
    """Real batches of the plugin's windows pipeline, both modes, the same BlossomSASRec (LTIS selecting)."""
    base = {**SIZES, "MAX_ITEM_LIST_LENGTH": 30, "user_inter_num_interval": "[20,25)", "train_batch_size": 128,
            "checkpoint_dir": str(tmp_path), "show_progress": False}  # every training history fits one window
    results = {}
    for mode in ("every_position", "per_prefix"):
        config = BlossomConfig(model="BlossomSASRec", dataset="ml-100k", config_dict={**base, "seq_train_mode": mode})
        _, train, _, _ = prepare(config)
        model = build_model(config, train).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in train:
                n = int(batch["item_length"].sum()) if mode == "every_position" else len(batch)
                total += model.calculate_loss(batch.to(model.device)).item() * n
                count += n
        results[mode] = total / count, count
    assert results["every_position"][1] == results["per_prefix"][1]  # the same targets
    assert results["every_position"][0] == pytest.approx(results["per_prefix"][0], rel=1e-5)


@pytest.mark.parametrize("model_class, overrides", [(BlossomSASRec, {}), (LinRec, {"linrec_causal": True})])
def test_trains_evaluates_and_reloads(tmp_path, model_class, overrides):
    config = {**SIZES, **TINY, "n_heads": 4, "n_kv_heads": 2, "hidden_size": 16, "MAX_ITEM_LIST_LENGTH": 30,
              "checkpoint_dir": str(tmp_path / "saved"), **overrides}
    with inside(tmp_path):
        result = recbole_blossom.run(model_class.__name__, "ml-100k", config_dict=config)
        assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())
        _, model, *_, test_data = recbole_blossom.load_data_and_model(result["saved_model_file"])
    assert type(model) is model_class and model.causal
    with torch.no_grad():
        assert torch.isfinite(model.eval().full_sort_predict(next(iter(test_data))[0].to(model.device))).all()


def test_blossom_sasrec_trains_on_every_position_by_default():
    """Its yaml default (measured as accurate as per_prefix, docs/comparison.md); the shared protocol's is
    per_prefix, a user's value wins, and where every-position training cannot run the default is RecBole's rows."""
    def mode(model, **config):
        return BlossomConfig(model=model, dataset="ml-100k", config_dict=config)["seq_train_mode"]

    assert mode("BlossomSASRec") == "every_position"
    assert mode("SASRecSDPA") == mode("BlossomLinRec") == mode("SASRec") == "per_prefix"
    assert mode("BlossomSASRec", seq_train_mode="per_prefix") == "per_prefix"
    assert mode("BlossomSASRec", seq_pipeline="recbole") == "per_prefix"
    assert mode("BlossomSASRec", loss_type="BPR") == "per_prefix"  # which gets negative sampling back
    # a user's every_position where it cannot run is an error that names the way out
    with pytest.raises(ValueError, match="for RecBole's pipeline set seq_train_mode: per_prefix"):
        check_data_config(BlossomConfig(model="BlossomSASRec", dataset="ml-100k",
                                        config_dict={"seq_pipeline": "recbole", "seq_train_mode": "every_position"}))
