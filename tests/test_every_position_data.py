"""seq_train_mode: every_position on the data side: one row per window of each user's training history."""

import logging
import math
import os

import pytest
import torch
from recbole.model.sequential_recommender import SASRec
from recbole.utils import init_seed

from recbole_blossom.data import target_list_field
from tests.test_data import assert_same, draw, prepare

HISTORIES = [2, 3, 4, 5, 9, 13, 20]  # interactions per user
L = 4


def write_unique(root, name="uniq"):
    """Every interaction has its own item ``u{user}_{t}`` (t = position in time), so an item names its position."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u, n in enumerate(HISTORIES):
        lines += [f"u{u}\tu{u}_{t}\t{100 * t + u}" for t in range(n)]
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return root


def training_targets(n):
    """Positions RecBole's leave-one-out keeps as training targets for a user with n interactions."""
    # n = 2: the only target is in training; n = 3: h1 trains, h2 tests; else the last two are valid and test.
    return list(range(1, 2)) if n <= 3 else list(range(1, n - 2))


def positions(dataset, items):
    """``[(user, t)]`` of remapped item ids (0 = padding is skipped)."""
    tokens = dataset.id2token(dataset.iid_field, items[items > 0].numpy())
    return [tuple(int(x) for x in tok[1:].split("_")) for tok in tokens]


@pytest.fixture(autouse=True)
def sasrec_every_position(monkeypatch):
    """These tests are about the rows only; the data side asks the model whether it can train on them."""
    monkeypatch.setattr(SASRec, "supports_every_position", True, raising=False)


def test_models_without_every_position_are_refused(tmp_path, monkeypatch):
    monkeypatch.delattr(SASRec, "supports_every_position")
    with pytest.raises(ValueError, match="every_position needs a model .* SASRec has not"):
        every_position(tmp_path, seq_train_mode="every_position")


def every_position(tmp_path, **overrides):
    root = write_unique(tmp_path)
    return prepare("uniq", tmp_path, "windows", data_path=root, load_col=None,
                   **{"MAX_ITEM_LIST_LENGTH": L, "train_batch_size": 5, **overrides})


def test_rows_windows_and_targets(tmp_path):
    config, dataset, (train, valid, test) = every_position(tmp_path, seq_train_mode="every_position")
    target_field = target_list_field(config)
    assert target_field == "target_item_id_list"
    expected_rows = sum(math.ceil(len(training_targets(n)) / L) for n in HISTORIES)
    assert expected_rows == 14 and len(train._dataset) == expected_rows

    seen_targets = []
    for batch in train:
        inputs, targets, lengths = batch["item_id_list"], batch[target_field], batch["item_length"]
        assert inputs.shape == targets.shape == (len(lengths), L) and inputs.dtype == targets.dtype == torch.long
        assert lengths.dtype == torch.long and (lengths >= 1).all() and (lengths <= L).all()
        for b in range(len(lengths)):
            k = int(lengths[b])
            assert (inputs[b, k:] == 0).all() and (targets[b, k:] == 0).all()  # left-aligned, zero padded
            assert (inputs[b, :k] > 0).all() and (targets[b, :k] > 0).all()
            ins, outs = positions(dataset, inputs[b]), positions(dataset, targets[b])
            user = ins[0][0]
            assert all(u == user for u, _ in ins + outs)
            # consecutive history: target t is the input after input t
            assert [t for _, t in ins] == list(range(ins[0][1], ins[0][1] + k))
            assert [t for _, t in outs] == [t + 1 for _, t in ins]
            times = batch["timestamp_list"][b]
            assert times[:k].tolist() == [100 * t + user for _, t in ins] and (times[k:] == 0).all()
            assert int(batch["item_id"][b]) == int(targets[b, k - 1])  # the row's own item: its last target
            seen_targets += outs
    expected = sorted((u, t) for u, n in enumerate(HISTORIES) for t in training_targets(n))
    assert sorted(seen_targets) == expected  # every training target exactly once

    eval_items = set()
    for loader in (valid, test):
        for _, _, _, positive in loader:
            eval_items |= set(positions(dataset, positive))
    assert eval_items and not eval_items & set(seen_targets)
    assert not eval_items & {p for batch in train for p in positions(dataset, batch["item_id_list"])}


def test_windows_cut_from_the_end(tmp_path):
    """A user with 17 training targets at L = 4: windows of 1, 4, 4, 4, 4 inputs, the short one first in time."""
    _, dataset, (train, _, _) = every_position(tmp_path, seq_train_mode="every_position", shuffle=False)
    rows = [(positions(dataset, b[target_list_field(train.config)][i]), int(b["item_length"][i]))
            for b in train for i in range(len(b))]
    user6 = [(outs[0][1], k) for outs, k in rows if outs[0][0] == 6]
    assert user6 == [(1, 1), (2, 4), (6, 4), (10, 4), (14, 4)]


def test_evaluation_loaders_equal_per_prefix_ones(tmp_path):
    init_seed(2020, True)
    _, _, per_prefix = every_position(tmp_path)
    init_seed(2020, True)
    _, _, every = every_position(tmp_path, seq_train_mode="every_position")
    for a, b in zip(draw(every, epochs=0), draw(per_prefix, epochs=0)):
        assert_same(a, b)


def test_rows_are_shuffled_every_epoch(tmp_path):
    _, dataset, (train, _, _) = every_position(tmp_path, seq_train_mode="every_position")
    epochs = [[tuple(positions(dataset, b["item_id"])) for b in train] for _ in range(2)]
    assert epochs[0] != epochs[1]
    assert sorted(sum(epochs[0], ())) == sorted(sum(epochs[1], ()))


def test_item_and_user_counters_count_every_target(tmp_path):
    """RecBole's popularity metrics read the training set's item_counter: the same as with per-prefix rows."""
    _, _, (per_prefix, _, _) = every_position(tmp_path)
    _, _, (every, _, _) = every_position(tmp_path, seq_train_mode="every_position")
    assert every._dataset.item_counter == per_prefix._dataset.item_counter
    assert every._dataset.user_counter == per_prefix._dataset.user_counter
    assert sum(every._dataset.item_counter.values()) == len(per_prefix._dataset) > len(every._dataset)


def test_saved_dataloaders_are_reused_only_for_the_same_mode(tmp_path):
    from recbole_blossom.data import WindowSequentialDataset

    _, _, (saved, _, _) = every_position(tmp_path, seq_train_mode="every_position", save_dataloaders=True)
    _, _, (per_prefix, _, _) = every_position(tmp_path, save_dataloaders=True)  # other mode: split again
    rows = sum(len(training_targets(n)) for n in HISTORIES)
    assert per_prefix._dataset.inter_feat.train_mode == "per_prefix" and len(per_prefix._dataset) == rows
    _, _, (saved, _, _) = every_position(tmp_path, seq_train_mode="every_position", save_dataloaders=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WindowSequentialDataset, "build", lambda self: pytest.fail("split again instead of loaded"))
        _, _, (loaded, _, _) = every_position(tmp_path, seq_train_mode="every_position", save_dataloaders=True)
    assert loaded._dataset.inter_feat.train_mode == "every_position" and len(loaded._dataset) == 14
    assert type(loaded) is type(saved) and loaded.step == saved.step == round(5 * 14 / 38)  # targets a batch


def expected_batching(train_batch_size, targets_per_user, max_len):
    """Rows, targets and rows per batch by the rule, from each user's number of training targets."""
    rows = sum(math.ceil(n / max_len) for n in targets_per_user)
    targets = sum(targets_per_user)
    return rows, targets, max(1, round(train_batch_size * rows / targets))


@pytest.mark.parametrize("max_len, train_batch_size", [(4, 5), (4, 12), (16, 12)])
def test_train_batch_size_counts_targets(tmp_path, caplog, max_len, train_batch_size):
    caplog.set_level(logging.INFO)
    config, _, (train, _, _) = every_position(tmp_path, seq_train_mode="every_position",
                                              MAX_ITEM_LIST_LENGTH=max_len, train_batch_size=train_batch_size)
    rows, targets, per_batch = expected_batching(
        train_batch_size, [len(training_targets(n)) for n in HISTORIES], max_len)
    assert (rows, targets) == ({4: 14, 16: 8}[max_len], 38)
    assert len(train._dataset) == rows and train._dataset.target_count() == targets
    assert train.step == per_batch > 1
    sizes = [len(batch) for batch in train]
    assert sizes == [per_batch] * (rows // per_batch) + ([rows % per_batch] if rows % per_batch else [])
    assert abs(len(sizes) - math.ceil(targets / train_batch_size)) <= 1
    assert config["train_batch_size"] == train_batch_size  # RecBole logs and saves the config: left as given
    mean = f"{targets / rows:.1f}"
    assert (f"every_position: train_batch_size {train_batch_size} targets -> {per_batch} windows per batch "
            f"(mean {mean} targets a window)") in caplog.messages


def test_a_batch_smaller_than_a_window_takes_one_row(tmp_path):
    _, _, (train, _, _) = every_position(tmp_path, seq_train_mode="every_position", train_batch_size=1)
    assert train.step == 1 and [len(batch) for batch in train] == [1] * 14


@pytest.mark.parametrize("max_len", [5, 50])  # 50: longer than every history, one window a user
def test_steps_per_epoch_match_per_prefix_training(tmp_path, max_len):
    """ml-100k users with 20-24 interactions: about as many steps an epoch as RecBole's per-prefix rows."""
    common = {"MAX_ITEM_LIST_LENGTH": max_len, "train_batch_size": 256, "user_inter_num_interval": "[20,25)"}
    _, _, (per_prefix, _, _) = prepare("ml-100k", tmp_path, "windows", **common)
    _, _, (every, _, _) = prepare("ml-100k", tmp_path, "windows", seq_train_mode="every_position", **common)
    targets_per_user = list(per_prefix._dataset.user_counter.values())  # a per-prefix row is one target
    rows, targets, per_batch = expected_batching(256, targets_per_user, max_len)
    assert len(every._dataset) == rows and every.step == per_batch
    assert len(every) == math.ceil(rows / per_batch) == sum(1 for _ in every)
    assert len(per_prefix) == math.ceil(targets / 256)
    assert abs(len(every) - len(per_prefix)) <= 1


def test_update_config_keeps_counting_targets(tmp_path):
    """RecBole calls update_config on loaded dataloaders: the rows per batch still follow the targets rule."""
    config, _, (train, _, _) = every_position(tmp_path, seq_train_mode="every_position", train_batch_size=5)
    before = train.step
    train.update_config(config)
    assert train.step == train._batch_size == before == expected_batching(5, [1, 1, 1, 2, 6, 10, 17], L)[2]
    config["train_batch_size"] = 12
    train.update_config(config)
    assert train.step == train._batch_size == expected_batching(12, [1, 1, 1, 2, 6, 10, 17], L)[2] != before
