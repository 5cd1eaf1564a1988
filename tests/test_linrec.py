"""LinRec (published and causal) and BlossomLinRec: attention against naive quadratic references, invariances,
training."""

import math

import pytest
import torch
import torch.nn.functional as F
from recbole.utils import init_seed
from memory_probe import LargestTensor
from tiny_runs import TINY

import recbole_blossom
from recbole_blossom import (
    BlossomConfig,
    BlossomHParams,
    BlossomLinRec,
    BlossomRuntime,
    BlossomSASRec,
    LinRec,
    get_model_class,
)
from recbole_blossom.linear_attention import (
    BlossomLinRecAttention,
    LinRecAttention,
    causal_linrec_attention,
    linrec_attention,
)
from recbole_blossom.quick_start import prepare
from recbole_blossom.stis import stis_key_index

# tiny_runs' config (small Blossom blocks, so LTIS selects among several blocks) with two layers and
# sequences long enough for the padding tests.
SMALL = {**TINY, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "MAX_ITEM_LIST_LENGTH": 40,
         "user_inter_num_interval": "[20,30]", "eval_batch_size": 256, "seed": 7}


def features(x):
    """The published feature map, written out: elu, then divide by the L2 norm over the features."""
    phi = F.elu(x)
    return phi / phi.pow(2).sum(-1, keepdim=True).sqrt()


def naive_linrec(q, k, v, lengths, causal=False):
    """LinRec with the L x L attention matrix built explicitly, one sequence and head at a time."""
    B, H, L, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        n = L if causal else int(lengths[b])  # bidirectional: real keys only; causal: the rule hides padding
        for h in range(H):
            attention = features(q[b, h]) @ features(k[b, h, :n]).T / math.sqrt(D)  # (L, n)
            if causal:
                attention = attention * torch.ones(L, n).tril()
            out[b, h] = attention @ v[b, h, :n]
    return out


def naive_blossom_linrec(layer, x, lengths):
    """BlossomLinRec's layer written from its description: explicit key sets, explicit sums, no softmax."""
    hp = layer.hp
    B, L, _ = x.shape
    H, Hkv, D, bs = hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.slc_block_size
    q_raw = layer.query(x).view(B, L, H, D).transpose(1, 2)
    k_raw = layer.key(x).view(B, L, Hkv, D).transpose(1, 2)
    v = layer.value(x).view(B, L, Hkv, D).transpose(1, 2)
    q, k = layer.rotary(features(q_raw), features(k_raw))
    selects_all = math.ceil(L / bs) - 1 <= hp.n_slc_blocks
    blocks = None if selects_all else layer.ltis_slots(q_raw, k_raw)  # Blossom's own block choice
    index, valid = stis_key_index(L, hp.stis_window, hp.stis_sink)
    gate = torch.sigmoid(layer.gate.proj(x))  # (B, L, 2H)
    context = torch.zeros(B, L, H, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for t in range(int(lengths[b])):
                if selects_all:
                    ltis_keys = range(t + 1)
                else:
                    ltis_keys = [s for j in blocks[b, kv, t].tolist() if j >= 0
                                 for s in range(j * bs, (j + 1) * bs) if s <= t]
                stis_keys = sorted({int(s) for s, ok in zip(index[t], valid[t]) if ok})
                branches = [sum((q[b, h, t] @ k[b, kv, s]) / math.sqrt(D) * v[b, kv, s] for s in keys)
                            for keys in (ltis_keys, stis_keys)]
                context[b, t, h] = gate[b, t, h] * branches[0] + gate[b, t, H + h] * branches[1]
    return layer.LayerNorm(layer.dense(context.flatten(2)) + x)


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
    got = linrec_attention(q, k, v, lengths)
    assert torch.allclose(got, naive_linrec(q, k, v, lengths), atol=1e-10)
    # without the mask the padded keys would count: the mask is what keeps them out
    assert not torch.allclose(linrec_attention(q, k, v)[1], got[1], atol=1e-3)
    # ELU, not ELU + 1: negative features exist, so some attention weights are negative
    assert (features(q) @ features(k).transpose(-1, -2)).min() < 0


@pytest.mark.parametrize("L, chunk", [(12, 64), (13, 4), (16, 4), (1, 3), (30, 7)])
def test_causal_attention_matches_naive_quadratic_formula(L, chunk):
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(2, 3, L, 4, generator=g, dtype=torch.float64) for _ in range(3))
    got = causal_linrec_attention(q, k, v, chunk_size=chunk)
    assert torch.allclose(got, naive_linrec(q, k, v, None, causal=True), atol=1e-10)


def blossom_hp(**overrides):
    values = {"hidden_size": 16, "n_heads": 4, "n_kv_heads": 2, "cmp_block_len": 4, "cmp_stride": 2,
              "slc_block_size": 2, "n_slc_blocks": 2, "stis_window": 3, "hidden_dropout_prob": 0.0,
              "attn_dropout_prob": 0.0, **overrides}
    return BlossomHParams(**values)


@pytest.mark.parametrize("L, lengths, dense_max_len, compression", [
    (24, [24, 13, 1], 256, "mlp"), (24, [24, 13, 1], 8, "mlp"),  # LTIS selecting: as an L x L mask, and gathered
    (24, [24, 13, 1], 8, "mean"),  # the block-mean variant selects its own blocks
    (5, [5, 2], 256, "mlp")])  # LTIS = causal attention
def test_blossom_linrec_layer_matches_naive_reference(L, lengths, dense_max_len, compression):
    torch.manual_seed(0)
    layer = BlossomLinRecAttention(blossom_hp(ltis_compression=compression)).double()
    layer.dense_max_len = dense_max_len
    layer.reset_parameters()
    with torch.no_grad():
        layer.gate.proj.weight.normal_(std=0.5)  # gates that differ by position and head
    x = torch.randn(len(lengths), L, 16, dtype=torch.float64)
    lengths = torch.tensor(lengths)
    with torch.no_grad():
        got = layer(x, lengths)
        expected = naive_blossom_linrec(layer, x, lengths)
    real = torch.arange(L)[None, :] < lengths[:, None]
    assert torch.allclose(got[real], expected[real], atol=1e-10)
    if L == 24:  # the test exercises selection: the last query keeps 2 of its 11 past blocks
        slots = layer.ltis_slots(layer.heads(layer.query(x)), layer.heads(layer.key(x)))
        assert slots.shape[-1] == 3 and (slots[:, :, L - 1, :2] >= 0).all() and (slots[:, :, L - 1, :2] < 11).all()


def test_blossom_linrec_rejects_what_it_does_not_have():
    with pytest.raises(ValueError, match="blossom_impl: fast is not available for BlossomLinRec"):
        BlossomLinRecAttention(blossom_hp(), BlossomRuntime(blossom_impl="fast"))
    with pytest.raises(ValueError, match="ltis_trainable_compression"):
        BlossomLinRecAttention(blossom_hp(ltis_trainable_compression=True))
    with pytest.raises(ValueError, match="ltis_score_pool: head is not available for BlossomLinRec"):
        BlossomLinRecAttention(blossom_hp(ltis_score_pool="head"))


@pytest.mark.parametrize("kind", ["published", "causal", "blossom"])
def test_attention_memory_grows_linearly_with_length(kind):
    hidden = 8
    if kind == "blossom":  # LTIS selecting (2 of L/4 blocks), block scores in chunks of 32 queries
        layer = BlossomLinRecAttention(blossom_hp(hidden_size=hidden, n_heads=2, n_kv_heads=1, cmp_block_len=8,
                                                  cmp_stride=4, slc_block_size=4), BlossomRuntime(ltis_chunk_size=32))
        layer.dense_max_len = 128  # the gathered form, used above this length
    else:
        layer = LinRecAttention(n_heads=2, hidden_size=hidden, hidden_dropout_prob=0.0, attn_dropout_prob=0.0,
                                layer_norm_eps=1e-12, causal=kind == "causal")
    largest = {}
    for L in (256, 512):
        x = torch.randn(1, L, hidden, requires_grad=True)
        with LargestTensor() as probe:
            layer(x, torch.tensor([L])).sum().backward()
        largest[L] = probe.largest
    # 2 heads: dense attention would hold 2 L^2. (select_blocks' block-overlap matrix grows as
    # L^2 / (cmp_stride * slc_block_size), below the linear terms at these sizes.)
    assert largest[256] < 256 * 256 and largest[512] <= 2 * largest[256], largest


def test_models_are_registered_with_reference_defaults():
    assert get_model_class("LinRec") is LinRec and get_model_class("BlossomLinRec") is BlossomLinRec
    assert {"LinRec", "BlossomLinRec"} <= set(recbole_blossom.available_models())
    for name in ("LinRec", "BlossomLinRec"):
        config = BlossomConfig(model=name, dataset="ml-100k")
        assert config["loss_chunk_size"] == 1024 and config["linrec_causal"] is (False if name == "LinRec" else None)
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
    assert all(type(layer.multi_head_attention) is BlossomLinRecAttention for layer in blossom.trm_encoder.layer)
    assert hasattr(blossom, "position_embedding")  # LinRec's model keeps its absolute positions
    assert not any(layer.multi_head_attention.causal for layer in linrec.trm_encoder.layer)
    causal = build(LinRec, data, linrec_causal=True)
    assert all(layer.multi_head_attention.causal for layer in causal.trm_encoder.layer)
    # BlossomAttention's parameters, the compression frozen (it only picks blocks), as in BlossomSASRec
    sasrec = build(BlossomSASRec, data)
    shapes = {n: p.shape for n, p in sasrec.named_parameters() if "trm_encoder" in n}
    assert {n: p.shape for n, p in blossom.named_parameters() if "trm_encoder" in n} == shapes
    assert {n for n, p in blossom.named_parameters() if not p.requires_grad} == {
        n for n, p in sasrec.named_parameters() if not p.requires_grad} != set()


def test_bad_values_are_clear_errors(data):
    with pytest.raises(ValueError, match=r"hidden_size \(16\) must be divisible by n_heads \(3\)"):
        build(LinRec, data, n_heads=3)
    with pytest.raises(ValueError, match="linrec_causal must be true or false, got 'yes'"):
        build(LinRec, data, linrec_causal="yes")


@pytest.mark.parametrize("model_class, causal", [(LinRec, False), (LinRec, True), (BlossomLinRec, True)])
def test_padding_and_batch_invariance(data, model_class, causal):
    model = build(model_class, data, **({"linrec_causal": True} if causal and model_class is LinRec else {}))
    model = model.double().eval()
    if model_class is BlossomLinRec:
        # At initialisation the block scores are nearly uniform and often tie exactly in select_blocks' float32;
        # torch.max breaks such ties differently for different padded lengths. Spread the scores.
        with torch.no_grad():
            for layer in model.trm_encoder.layer:
                for p in layer.multi_head_attention.ltis.compressor.parameters():
                    p.normal_(std=1.0)
    seq, lengths = padded_batch(model.n_items, [25, 17, 3], L=25)
    with torch.no_grad():
        out = model(seq, lengths)
        longer = model(torch.cat((seq, torch.zeros(3, 15, dtype=torch.long)), 1), lengths)  # up to the max 40
        garbage = seq.clone()
        garbage[seq == 0] = 5  # items behind the length: ignored by causal attention
        alone = torch.stack([model(seq[b:b + 1, :n], lengths[b:b + 1])[0] for b, n in enumerate(lengths.tolist())])
    assert torch.allclose(out, longer, atol=1e-10)
    assert torch.allclose(out, alone, atol=1e-10)
    if causal:  # items after the length are never read
        with torch.no_grad():
            assert torch.allclose(out, model(garbage, lengths), atol=1e-10)


def test_linrec_is_bidirectional_unless_causal(data):
    for causal in (False, True):
        model = build(LinRec, data, linrec_causal=causal).eval()
        seq, lengths = padded_batch(model.n_items, [30])
        with torch.no_grad():
            first, last = model.sequence_output(seq, lengths)[0, [0, 29]]
            changed = seq.clone()
            changed[0, 29] = 1 if seq[0, 29] != 1 else 2  # the last item: only a bidirectional first output sees it
            first_after, last_after = model.sequence_output(changed, lengths)[0, [0, 29]]
        assert not torch.allclose(last, last_after, atol=1e-6)
        assert torch.allclose(first, first_after, atol=1e-6) is causal


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


@pytest.mark.parametrize("model_class", [LinRec, BlossomLinRec])
def test_run_save_and_reload(tmp_path, monkeypatch, model_class):
    monkeypatch.chdir(tmp_path)
    result = recbole_blossom.run(model_class.__name__, "ml-100k",
                                 config_dict={**TINY, "checkpoint_dir": str(tmp_path)})
    assert set(result["test_result"]) == {"recall@10", "mrr@10", "ndcg@10"}
    config, model, _, _, _, test_data = recbole_blossom.load_data_and_model(result["saved_model_file"])
    assert type(model) is model_class
    model.eval()
    scores = model.full_sort_predict(next(iter(test_data))[0].to(config["device"]))
    assert scores.shape[1] == model.n_items and torch.isfinite(scores).all()
