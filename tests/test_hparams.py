"""The hyperparameter schema: yaml defaults equal the dataclass defaults, and the score options' meaning."""

import math
import os
from dataclasses import fields

import pytest
import torch
import yaml

from recbole_blossom.hparams import BlossomHParams, BlossomRuntime
from recbole_blossom.ltis import LTIS
from recbole_blossom.ops import naive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("model", ["BlossomSASRec", "BlossomLinRec"])
def test_yaml_defaults_are_the_schema_defaults(model):
    with open(os.path.join(ROOT, "properties", "model", f"{model}.yaml")) as f:
        values = yaml.safe_load(f)
    for cls in (BlossomHParams, BlossomRuntime):
        for field in fields(cls):
            assert field.name in values, (model, field.name)
            value = values[field.name]
            value = float(value) if field.name == "layer_norm_eps" else value  # PyYAML reads 1e-12 as text
            assert value == field.default, (model, field.name, value, field.default)


@pytest.mark.parametrize("key,value", [("ltis_score_pool", "mean"), ("ltis_score_rope", "yes"), ("use_rope", 0)])
def test_score_options_validated(key, value):
    with pytest.raises(ValueError, match=key):
        BlossomHParams(**{key: value}).validate()


def test_logits_pooling_is_one_softmax_over_the_mean_score():
    """``ltis_score_pool: logits`` ranks blocks by the softmax of the kv group's mean score (written out
    here), not by the mean of the heads' softmaxes."""
    torch.manual_seed(0)
    ltis = LTIS(16, 2, score_pool="logits")
    L = 200
    q, k = torch.randn(1, 8, L, 16), torch.randn(1, 2, L, 16)
    k_cmp = ltis.compressor(k)
    idx = ltis.select(q, k)
    mean_q = q.view(1, 2, 4, L, 16).mean(2)
    n_slc = -(-L // 16)
    ref = naive.selection_scores(mean_q, k_cmp, ltis.memory_key, torch.arange(L), 32, 16, 16, n_slc,
                                 1 / math.sqrt(16))
    # mean score of each head pair (q_g . k) equals (mean q) . k: check that identity directly
    s_heads = torch.einsum("bhgld,bhnd->bhgln", q.view(1, 2, 4, L, 16), k_cmp).mean(2)
    torch.testing.assert_close(s_heads, torch.einsum("bhld,bhnd->bhln", mean_q, k_cmp), rtol=1e-5, atol=1e-5)
    own = torch.arange(L) // 16
    ref = ref.masked_fill(~(torch.arange(n_slc)[None] < own[:, None]), float("-inf"))
    top = ref.topk(4, dim=-1).indices.sort(-1).values
    rows = own > 4
    assert torch.equal(idx[..., :-1].long().sort(-1).values[:, :, rows], top[:, :, rows])
