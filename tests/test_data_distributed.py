"""The windows pipeline under RecBole's multi-process (DistributedSampler) path: same results as RecBole's."""

import pytest
import torch

import recbole_blossom
from tests.test_data import prepare
from tests.test_every_position_data import expected_batching
from tests.test_reliability import FEWER, free_port
from tests.tiny_runs import inside, tiny


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) path; GPUs take RecBole's NCCL path")
def test_two_process_training_gives_identical_metrics_with_either_pipeline(tmp_path):
    """RecBole's DistributedSampler path: each process draws its share of the rows, the same with both pipelines."""
    results = {}
    with inside(tmp_path):
        for pipeline in ("recbole", "windows"):
            results[pipeline] = recbole_blossom.run(
                "BlossomSASRec", "ml-100k",
                config_dict=tiny(tmp_path, seq_pipeline=pipeline, seq_train_mode="per_prefix", **FEWER), nproc=2,
                port=free_port())
    assert results["windows"]["test_result"] == results["recbole"]["test_result"]
    assert results["windows"]["best_valid_result"] == results["recbole"]["best_valid_result"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) path; GPUs take RecBole's NCCL path")
def test_two_process_every_position_training_counts_targets(tmp_path):
    """Each process builds the every-position train loader with train_batch_size in targets (RecBole then
    splits the rows of a batch between the processes, as it splits a per-prefix batch)."""
    config = tiny(tmp_path, seq_train_mode="every_position", train_batch_size=64, **FEWER)
    with inside(tmp_path):
        result = recbole_blossom.run("BlossomSASRec", "ml-100k", config_dict=config, nproc=2, port=free_port())
    assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())
    _, _, (per_prefix, _, _) = prepare("ml-100k", tmp_path, "windows", **{**config, "seq_train_mode": "per_prefix"})
    targets_per_user = list(per_prefix._dataset.user_counter.values())  # a per-prefix row is one target
    rows, targets, per_batch = expected_batching(64, targets_per_user, config["MAX_ITEM_LIST_LENGTH"])
    log = "".join(path.read_text() for path in (tmp_path / "log").rglob("*.log"))
    assert (f"every_position: train_batch_size 64 targets -> {per_batch} windows per batch "
            f"(mean {targets / rows:.1f} targets a window)") in log
