"""The windows sequence pipeline (recbole_blossom.data) against RecBole's own SequentialDataset, batch by batch."""

import os

import numpy as np
import pytest
import torch
from recbole.data.interaction import Interaction
from recbole.utils import init_seed

from recbole_blossom.config import BlossomConfig
from recbole_blossom.data import WindowSequentialDataset, create_dataset, data_preparation, gather_windows
from tests.tiny_runs import inside, tiny

ML100K_SMALL = {"user_inter_num_interval": "[20,25)"}  # longest history: 24
UNI100 = {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                        "mode": {"valid": "uni100", "test": "uni100"}}}
BPR = {"loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}}


def write_synthetic(root, name="synth", users=12, seed=0):
    """An atomic file with uneven histories (2..30), tied timestamps, and extra float/token/token_seq features."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float\trating:float\tctx:token\ttags:token_seq"]
    for u in range(users):
        n = 2 + (u * 7) % 29
        times = np.sort(rng.integers(0, 15, n))  # many ties: RecBole's stable sort order must be kept
        for t in range(n):
            tags = " ".join(f"t{x}" for x in rng.integers(0, 5, 1 + t % 3))
            lines.append(f"u{u}\ti{rng.integers(0, 40)}\t{times[t]}\t{rng.random():.3f}\tc{rng.integers(0, 3)}\t{tags}")
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return root


def prepare(dataset, directory, pipeline, **overrides):
    config = BlossomConfig("SASRec", dataset, config_dict={
        "seq_pipeline": pipeline, "checkpoint_dir": os.path.join(str(directory), "saved"),
        "train_batch_size": 64, "eval_batch_size": 256, "show_progress": False, **overrides})
    init_seed(config["seed"], config["reproducibility"])
    data = create_dataset(config)
    return config, data, data_preparation(config, data)


def draw(loaders, epochs=2):
    """Every batch of two training epochs, then the validation and test batches (RNG drawn in this order)."""
    train, valid, test = loaders
    batches = [batch for _ in range(epochs) for batch in train]
    return batches + list(valid) + list(test)


def assert_same(ours, theirs):
    if isinstance(theirs, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same(a, b)
    elif isinstance(theirs, Interaction):
        assert type(ours) is Interaction and ours.columns == theirs.columns
        for field in theirs.columns:
            assert ours[field].dtype == theirs[field].dtype, field
            assert torch.equal(ours[field], theirs[field]), field
    elif isinstance(theirs, torch.Tensor):
        assert torch.equal(ours, theirs)
    else:
        assert ours == theirs


def check_equal_batches(dataset, directory, **overrides):
    init_seed(2020, True)
    _, recbole_data, recbole_loaders = prepare(dataset, directory, "recbole", **overrides)
    theirs = draw(recbole_loaders)
    init_seed(2020, True)
    _, our_data, our_loaders = prepare(dataset, directory, "windows", **overrides)
    ours = draw(our_loaders)
    assert isinstance(our_data, WindowSequentialDataset) and not isinstance(recbole_data, WindowSequentialDataset)
    assert len(ours) == len(theirs) > 3
    for a, b in zip(ours, theirs):
        assert_same(a, b)
    return our_data, recbole_data, our_loaders


@pytest.mark.parametrize("length, extra", [(5, {}), (50, {**UNI100, **BPR})])
def test_ml100k_batches_equal_recboles(tmp_path, length, extra):
    ours, theirs, _ = check_equal_batches("ml-100k", tmp_path, MAX_ITEM_LIST_LENGTH=length, **ML100K_SMALL, **extra)
    assert (ours.inter_matrix().toarray() == theirs.inter_matrix().toarray()).all()


def split(how, mode="full"):
    return {"eval_args": {"split": how, "order": "TO", "group_by": "user", "mode": mode}}


@pytest.mark.parametrize("length, extra", [
    (1, {}), (3, UNI100), (20, {"numerical_features": ["rating"]}), (64, UNI100),
    (6, split({"LS": "valid_only"})), (6, split({"LS": "test_only"}, "uni100")), (9, split({"RS": [0.7, 0.2, 0.1]})),
])
def test_synthetic_batches_equal_recboles(tmp_path, length, extra):
    root = write_synthetic(tmp_path)
    ours, theirs, (train, _, _) = check_equal_batches(
        "synth", tmp_path, data_path=root, load_col=None, MAX_ITEM_LIST_LENGTH=length, **extra)
    assert {"timestamp_list", "rating_list", "ctx_list", "tags_list"} <= set(next(iter(train)).columns)
    assert (ours.inter_matrix().toarray() == theirs.inter_matrix().toarray()).all()


def test_saved_dataloaders_give_the_same_batches(tmp_path):
    small = {"MAX_ITEM_LIST_LENGTH": 7, **ML100K_SMALL}
    _, _, fresh = prepare("ml-100k", tmp_path, "windows", **small)
    init_seed(2020, True)
    before = draw(fresh, epochs=1)
    # Saving resets the saved loaders' generators (RecBole's save_split_dataloaders); the loaded copies get the
    # generator state they had when saved, i.e. the same as a fresh loader.
    _, _, saved = prepare("ml-100k", tmp_path, "windows", save_dataloaders=True, **small)
    assert any(name.endswith("dataloader.pth") for name in os.listdir(tmp_path / "saved"))
    with pytest.MonkeyPatch.context() as mp:  # the loaders come from the file: nothing is split again
        mp.setattr(WindowSequentialDataset, "build", lambda self: pytest.fail("split again instead of loaded"))
        _, _, loaded = prepare("ml-100k", tmp_path, "windows", save_dataloaders=True, **small)
    assert loaded[0] is not saved[0] and isinstance(loaded[0]._dataset, WindowSequentialDataset)
    init_seed(2020, True)
    for a, b in zip(draw(loaded, epochs=1), before):
        assert_same(a, b)


def test_saved_dataset_is_reused(tmp_path):
    small = {"MAX_ITEM_LIST_LENGTH": 7, **ML100K_SMALL}
    init_seed(2020, True)
    _, _, fresh = prepare("ml-100k", tmp_path, "windows", **small)
    before = draw(fresh, epochs=1)
    prepare("ml-100k", tmp_path, "windows", save_dataset=True, **small)
    assert os.path.isfile(tmp_path / "saved" / "ml-100k-WindowSequentialDataset.pth")
    with pytest.MonkeyPatch.context() as mp:  # read from the file, not loaded again from the atomic files
        mp.setattr(WindowSequentialDataset, "_from_scratch", lambda self: pytest.fail("loaded again"))
        init_seed(2020, True)
        _, loaded, loaders = prepare("ml-100k", tmp_path, "windows", save_dataset=True, **small)
        assert isinstance(loaded, WindowSequentialDataset)
        for a, b in zip(draw(loaders, epochs=1), before):
            assert_same(a, b)


def test_windows_memory_does_not_grow_with_length(tmp_path):
    """The dataset holds each interaction once: going from L = 5 to 5000 adds only the L zero rows of padding."""
    sizes, row_bytes = [], 0
    for length in (5, 5000):
        _, data, (train, _, _) = prepare("ml-100k", tmp_path, "windows", MAX_ITEM_LIST_LENGTH=length,
                                         **ML100K_SMALL)
        inter = train._dataset.inter_feat
        tensors = list(inter.base.values()) + list(inter.interaction.values())
        sizes.append(sum(t.numel() * t.element_size() for t in tensors))
        row_bytes = sum(t[0].numel() * t.element_size() for t in inter.base.values())
    assert sizes[1] - sizes[0] == (5000 - 5) * row_bytes


def test_gather_windows_against_a_loop():
    values = torch.arange(1, 21).reshape(10, 2)
    ends, lengths = torch.tensor([3, 9, 5, 1]), torch.tensor([3, 4, 0, 1])
    out = gather_windows(values, ends, lengths, 5, shift=1)
    expected = torch.zeros(4, 5, 2, dtype=values.dtype)
    for b in range(4):
        for t in range(int(lengths[b])):
            expected[b, t] = values[ends[b] - lengths[b] + 1 + t]
    assert torch.equal(out, expected)


def test_unknown_pipeline_or_mode_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="seq_pipeline is 'window'; allowed values: windows, recbole"):
        prepare("ml-100k", tmp_path, "window")
    with pytest.raises(ValueError, match="seq_train_mode is 'every'; allowed values: per_prefix, every_position"):
        prepare("ml-100k", tmp_path, "windows", seq_train_mode="every")
    with pytest.raises(ValueError, match="every_position needs seq_pipeline: windows"):
        prepare("ml-100k", tmp_path, "recbole", seq_train_mode="every_position")
    with pytest.raises(ValueError, match="train_neg_sample_args"):
        prepare("ml-100k", tmp_path, "windows", seq_train_mode="every_position", **BPR)


def test_training_with_either_pipeline_gives_identical_metrics(tmp_path):
    from recbole_blossom.quick_start import load_data_and_model, run_recbole

    results = {}
    with inside(tmp_path):
        for pipeline in ("recbole", "windows"):
            config = tiny(tmp_path, seq_pipeline=pipeline, seq_train_mode="per_prefix")  # RecBole's rows, both
            results[pipeline] = run_recbole("BlossomSASRec", "ml-100k", config_dict=config)
        assert results["windows"]["test_result"] == results["recbole"]["test_result"]
        assert results["windows"]["best_valid_result"] == results["recbole"]["best_valid_result"]
        config, _, dataset, train, _, test = load_data_and_model(results["windows"]["saved_model_file"])
    assert config["seq_pipeline"] == "windows" and isinstance(dataset, WindowSequentialDataset)
    assert len(test) > 0 and len(train._dataset) > len(test._dataset)

