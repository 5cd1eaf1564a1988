"""LinRec and BlossomLinRec: attention against a naive quadratic reference, invariances, training."""

import pytest
import torch
from recbole.utils import init_seed
from tiny_runs import TINY
from torch.utils._python_dispatch import TorchDispatchMode

import recbole_blossom
from recbole_blossom import BlossomAttention, BlossomConfig, BlossomHParams, BlossomLinRec, LinRec, get_model_class
from recbole_blossom.model.linrec import LinRecAttention, linrec_attention
from recbole_blossom.quick_start import prepare

# tiny_runs' config (small Blossom blocks, so LTIS selects among several blocks) with two layers and
# sequences long enough for the padding tests.
SMALL = {**TINY, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "MAX_ITEM_LIST_LENGTH": 40,
         "user_inter_num_interval": "[20,30]", "eval_batch_size": 256, "seed": 7}


def naive_linrec(q, k, v, lengths):
    """The paper's formula with the attention matrix built explicitly, one sequence and head at a time."""
    B, H, L, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(lengths[b])
        for h in range(H):
            phi_q = torch.nn.functional.elu(q[b, h]) + 1  # (L, D)
            phi_k = torch.nn.functional.elu(k[b, h, :n]) + 1  # (n, D): real items only
            rows = phi_q / phi_q.pow(2).sum(1, keepdim=True).sqrt()
            cols = phi_k / phi_k.pow(2).sum(0, keepdim=True).sqrt()
            attention = rows @ cols.T  # (L, n)
            out[b, h] = attention @ v[b, h, :n]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    config = BlossomConfig(model="LinRec", dataset="ml-100k",
                           config_dict={**SMALL, "checkpoint_dir": str(tmp_path_factory.mktemp("saved"))})
    return config, *prepare(config)[1:]  # the quick start's data preparation: train, valid, test


def build(model_class, data, **overrides):
    config, train_data, *_ = data
    config = BlossomConfig(model=model_class.__name__, dataset="ml-100k",
                           config_dict={**SMALL, "checkpoint_dir": config["checkpoint_dir"], **overrides})
    init_seed(config["seed"], config["reproducibility"])
    return model_class(config, train_data._dataset)


def padded_batch(n_items, lengths, L=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    seq = torch.randint(1, n_items, (len(lengths), L), generator=g)
    seq[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    return seq, lengths


def test_attention_matches_naive_quadratic_formula():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 12, 4, generator=g, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([12, 5, 1])
    mask = torch.arange(12)[None, :] < lengths[:, None]
    got = linrec_attention(q, k, v, mask)
    assert torch.allclose(got, naive_linrec(q, k, v, lengths), atol=1e-10)
    # without the mask the padded keys would count: the mask is what keeps them out
    assert not torch.allclose(linrec_attention(q, k, v)[1], got[1], atol=1e-3)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_attention_layer_never_builds_an_L_by_L_tensor():
    L, hidden = 256, 8
    layer = LinRecAttention(n_heads=2, hidden_size=hidden, hidden_dropout_prob=0.0, attn_dropout_prob=0.0,
                            layer_norm_eps=1e-12)
    x = torch.randn(1, L, hidden, requires_grad=True)
    mask = torch.ones(1, L, dtype=torch.bool)
    with _LargestTensor() as probe:
        layer(x, mask).sum().backward()
    assert probe.largest <= 4 * L * hidden < L * L, probe.largest


def test_models_are_registered_with_reference_defaults():
    assert get_model_class("LinRec") is LinRec and get_model_class("BlossomLinRec") is BlossomLinRec
    assert {"LinRec", "BlossomLinRec"} <= set(recbole_blossom.available_models())
    for name in ("LinRec", "BlossomLinRec"):
        config = BlossomConfig(model=name, dataset="ml-100k")
        expected = {"hidden_size": 128, "inner_size": 256, "n_layers": 2, "n_heads": 8, "hidden_dropout_prob": 0.2,
                    "attn_dropout_prob": 0.2, "loss_type": "CE", "train_batch_size": 2048, "stopping_step": 15}
        assert {k: config[k] for k in expected} == expected, name
    # the Blossom keys of BlossomLinRec's yaml stay those of BlossomSASRec's
    blossom, sasrec = (BlossomConfig(model=m, dataset="ml-100k") for m in ("BlossomLinRec", "BlossomSASRec"))
    keys = BlossomHParams.__dataclass_fields__
    assert {k: blossom[k] for k in keys} == {k: sasrec[k] for k in keys} and blossom["n_kv_heads"] == 2


def test_structure(data):
    linrec, blossom = build(LinRec, data), build(BlossomLinRec, data)
    assert all(type(layer.multi_head_attention) is LinRecAttention for layer in linrec.trm_encoder.layer)
    assert all(type(layer.multi_head_attention) is BlossomAttention for layer in blossom.trm_encoder.layer)
    assert hasattr(blossom, "position_embedding")  # LinRec's model keeps its absolute positions


def test_bad_head_count_is_a_clear_error(data):
    with pytest.raises(ValueError, match=r"hidden_size \(16\) must be divisible by n_heads \(3\)"):
        build(LinRec, data, n_heads=3)


@pytest.mark.parametrize("model_class", [LinRec, BlossomLinRec])
def test_padding_and_batch_invariance(data, model_class):
    model = build(model_class, data).eval()
    seq, lengths = padded_batch(model.n_items, [25, 17, 3], L=25)
    with torch.no_grad():
        out = model(seq, lengths)
        longer = model(torch.cat((seq, torch.zeros(3, 15, dtype=torch.long)), 1), lengths)  # up to the max 40
        garbage = seq.clone()
        garbage[seq == 0] = 5  # items behind the length: ignored by the causal Blossom attention
        alone = torch.stack([model(seq[b:b + 1, :n], lengths[b:b + 1])[0] for b, n in enumerate(lengths.tolist())])
    assert torch.allclose(out, longer, atol=1e-5)
    assert torch.allclose(out, alone, atol=1e-5)
    if model_class is BlossomLinRec:  # causal: items after the length are never read
        with torch.no_grad():
            assert torch.allclose(out, model(garbage, lengths), atol=1e-5)


def test_linrec_is_bidirectional_over_the_history(data):
    model = build(LinRec, data).eval()
    seq, lengths = padded_batch(model.n_items, [30])
    with torch.no_grad():
        before = model(seq, lengths)
        seq[0, 0] = 1 if seq[0, 0] != 1 else 2  # change the first item: the last item's output sees it
        after = model(seq, lengths)
    assert not torch.allclose(before, after, atol=1e-6)


def test_gradients_reach_every_parameter_and_skip_padding(data):
    model = build(LinRec, data).eval()  # eval: no dropout, so the gradient test is exact
    seq, lengths = padded_batch(model.n_items, [40, 9])
    emb = model.item_embedding(seq).detach().requires_grad_(True)
    positions = model.position_embedding(torch.arange(40)[None])
    hidden = model.LayerNorm(emb + positions)
    out = model.trm_encoder(hidden, model.attention_input(seq, lengths), output_all_encoded_layers=False)[-1]
    weights = torch.randn(2, model.hidden_size)  # a plain sum of LayerNorm outputs would be constant
    (model.gather_indexes(out, lengths - 1) * weights).sum().backward()
    assert emb.grad[1, :9].abs().sum() > 0 and emb.grad[1, 9:].abs().sum() == 0  # padding gets no gradient

    model.zero_grad()
    batch = next(iter(data[1]))
    model.train()
    model.calculate_loss(batch).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize("model_class", [LinRec, BlossomLinRec])
def test_training_steps_lower_the_loss(data, model_class):
    model = build(model_class, data)
    batch = next(iter(data[1]))[torch.arange(64)]  # 64 sequences: enough to see the loss fall
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss():
        model.eval()
        with torch.no_grad():
            return model.calculate_loss(batch).item()

    before = loss()
    model.train()
    for _ in range(10):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    after = loss()
    assert after < before - 0.1, (before, after)


def test_run_save_and_reload_linrec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = recbole_blossom.run("LinRec", "ml-100k", config_dict={**TINY, "checkpoint_dir": str(tmp_path)})
    assert set(result["test_result"]) == {"recall@10", "mrr@10", "ndcg@10"}
    config, model, _, _, _, test_data = recbole_blossom.load_data_and_model(result["saved_model_file"])
    assert type(model) is LinRec
    model.eval()
    scores = model.full_sort_predict(next(iter(test_data))[0].to(config["device"]))
    assert scores.shape[1] == model.n_items and torch.isfinite(scores).all()
