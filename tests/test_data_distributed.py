"""The windows pipeline under RecBole's multi-process (DistributedSampler) path: same results as RecBole's."""

import pytest
import torch

import recbole_blossom
from tests.test_reliability import FEWER, free_port
from tests.tiny_runs import inside, tiny


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) path; GPUs take RecBole's NCCL path")
def test_two_process_training_gives_identical_metrics_with_either_pipeline(tmp_path):
    """RecBole's DistributedSampler path: each process draws its share of the rows, the same with both pipelines."""
    results = {}
    with inside(tmp_path):
        for pipeline in ("recbole", "windows"):
            results[pipeline] = recbole_blossom.run(
                "BlossomSASRec", "ml-100k", config_dict=tiny(tmp_path, seq_pipeline=pipeline, **FEWER), nproc=2,
                port=free_port())
    assert results["windows"]["test_result"] == results["recbole"]["test_result"]
    assert results["windows"]["best_valid_result"] == results["recbole"]["best_valid_result"]
