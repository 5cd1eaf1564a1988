"""BlossomSASRec as a RecBole model: config, invariances, training, checkpoints, quick-start API."""

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.data.interaction import Interaction
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed

import recbole_blossom
from recbole_blossom import BlossomConfig, BlossomSASRec
from recbole_blossom.hparams import LONG_HISTORY

TINY = {
    "user_inter_num_interval": "[20,30]",  # about 200 users of ml-100k: seconds per epoch on 2 cores
    "hidden_size": 16,
    "inner_size": 32,
    "n_heads": 4,
    "n_kv_heads": 2,
    "MAX_ITEM_LIST_LENGTH": 40,
    "train_batch_size": 256,
    "eval_batch_size": 256,
    "epochs": 1,
    "show_progress": False,
    "seed": 2020,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    config = BlossomConfig(model="BlossomSASRec", dataset="ml-100k",
                           config_dict={**TINY, "checkpoint_dir": str(tmp_path_factory.mktemp("saved"))})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    return config, dataset, *data_preparation(config, dataset)


def make_model(config, train_data, **overrides):
    for key, value in overrides.items():
        config[key] = value
    init_seed(config["seed"], config["reproducibility"])
    return BlossomSASRec(config, train_data._dataset)


def test_config_defaults_are_the_reference_settings():
    config = BlossomConfig(model="BlossomSASRec", dataset="ml-100k")
    expected = {"hidden_size": 128, "inner_size": 256, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2,
                "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "learning_rate": 1e-3,
                "train_batch_size": 2048, "loss_type": "CE", "stopping_step": 15, "cmp_block_len": 32,
                "cmp_stride": 16, "slc_block_size": 16, "n_slc_blocks": 4, "stis_window": 8,
                "valid_metric": "NDCG@10"}
    assert {k: config[k] for k in expected} == expected
    assert config["train_neg_sample_args"]["distribution"] == "none"  # CE over all items, no sampling
    assert config["eval_args"]["order"] == "TO" and config["eval_args"]["split"] == {"LS": "valid_and_test"}


def test_user_config_overrides_plugin_defaults(tmp_path):
    user_file = tmp_path / "mine.yaml"
    user_file.write_text("n_slc_blocks: 2\nhidden_size: 64\n")
    config = BlossomConfig(model="BlossomSASRec", dataset="ml-100k", config_file_list=[str(user_file)],
                           config_dict={"hidden_size": 32})
    assert config["n_slc_blocks"] == 2 and config["hidden_size"] == 32 and config["cmp_stride"] == 16


def test_builtin_models_resolve_with_their_own_defaults():
    config = BlossomConfig(model="SASRec", dataset="ml-100k")
    assert config["model"] == "SASRec" and config["n_heads"] == 2  # RecBole's SASRec.yaml
    assert config["train_batch_size"] == 2048  # the plugin's shared protocol


def test_model_is_sasrec_with_blossom_attention(data):
    config, _, train_data, _, _ = data
    model = make_model(config, train_data)
    assert isinstance(model, SASRec)
    assert not hasattr(model, "position_embedding")
    assert all(isinstance(layer.multi_head_attention, recbole_blossom.BlossomAttention)
               for layer in model.trm_encoder.layer)


def test_absolute_positions_can_be_added(data):
    """``use_position_embedding: True`` adds SASRec's learned positions to the items before the layers: zero
    position vectors give the paper's model (same other weights), others change the output and keep it causal."""
    config, _, train_data, _, _ = data
    plain = make_model(config, train_data).eval()
    try:
        model = make_model(config, train_data, use_position_embedding=True).eval()
    finally:
        config["use_position_embedding"] = False  # the module's shared config
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["position_embedding.weight"] and unexpected == []
    seq = torch.randint(1, model.n_items, (2, 40), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([40, 25])
    with torch.no_grad():
        model.position_embedding.weight.zero_()
        assert torch.allclose(model(seq, lengths), plain(seq, lengths), atol=1e-6)
        model.position_embedding.weight.normal_(0, 1)
        out = model(seq, lengths)
        assert (out - plain(seq, lengths)).abs().max() > 1e-2
        seq[:, 25:] = torch.randint(1, model.n_items, (2, 15))
        assert torch.allclose(model(seq, lengths)[1], out[1], atol=1e-6)


def test_invalid_hyperparameter_fails_at_construction(data):
    config, _, train_data, _, _ = data
    with pytest.raises(ValueError, match="n_kv_heads"):
        make_model(config, train_data, n_kv_heads=3)
    config["n_kv_heads"] = 2


def padded_batch(model, lengths, g):
    """``(3, 40)`` random items, zero from each row's length on; the model's output for them; each row alone."""
    seq = torch.randint(1, model.n_items, (len(lengths), 40), generator=g)
    seq[torch.arange(40)[None, :] >= lengths[:, None]] = 0
    with torch.no_grad():
        alone = torch.stack([model(seq[b:b + 1, :n], lengths[b:b + 1])[0] for b, n in enumerate(lengths.tolist())])
        return seq, model(seq, lengths), alone


def test_padding_and_batch_invariance_of_the_encoding(data):
    config, _, train_data, _, _ = data
    model = make_model(config, train_data).eval()
    lengths = torch.tensor([40, 17, 3])
    seq, out, alone = padded_batch(model, lengths, torch.Generator().manual_seed(0))
    with torch.no_grad():
        longer = model(torch.cat((seq, torch.zeros(3, 30, dtype=torch.long)), dim=1), lengths)  # larger max length
    assert torch.allclose(out, longer, atol=1e-5)
    assert torch.allclose(out, alone, atol=1e-5)


def test_prediction_at_t_ignores_later_items(data):
    config, _, train_data, _, _ = data
    model = make_model(config, train_data).eval()
    seq = torch.randint(1, model.n_items, (1, 40))
    with torch.no_grad():
        a = model(seq, torch.tensor([25]))
        seq[0, 25:] = torch.randint(1, model.n_items, (15,))
        b = model(seq, torch.tensor([25]))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("settings", [
    dict(ltis_compression="mlp"), dict(ltis_compression="mean"),
    LONG_HISTORY,  # the README's long-history settings
    dict(ltis_compression="mean", ltis_score_pool="head")])  # blocks picked per query head
def test_invariances_where_ltis_selects(data, settings):
    """Small LTIS blocks (selection from L = 13 on: 2 of up to 9 past blocks at L = 40), either compression and the
    variants: padding, batch and later items change nothing; ``mean`` has no compression parameters."""
    config, _, train_data, _, _ = data
    compression = settings["ltis_compression"]
    small = dict(cmp_block_len=8, cmp_stride=4, slc_block_size=4, n_slc_blocks=2, **settings)
    saved = {key: config[key] for key in small}
    try:
        model = make_model(config, train_data, **small).eval()
    finally:
        for key, value in saved.items():
            config[key] = value
    ltis = model.trm_encoder.layer[0].multi_head_attention.ltis
    assert not ltis.selects_all(40) and ltis.compression == compression
    assert any(".compressor." in n for n, _ in model.named_parameters()) == (compression == "mlp")
    g = torch.Generator().manual_seed(1)
    seq, out, alone = padded_batch(model, torch.tensor([40, 23, 5]), g)
    with torch.no_grad():
        changed = seq.clone()
        changed[0, 30:] = torch.randint(1, model.n_items, (10,), generator=g)
        early = model(changed[:1], torch.tensor([30]))
        early_ref = model(seq[:1, :30], torch.tensor([30]))
    assert torch.allclose(out, alone, atol=1e-5)
    assert torch.allclose(early, early_ref, atol=1e-5)


def test_training_steps_lower_the_loss(data):
    config, _, train_data, _, _ = data
    model = make_model(config, train_data)
    batch = next(iter(train_data))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.eval()
    with torch.no_grad():
        before = model.calculate_loss(batch).item()
    model.train()
    for _ in range(15):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model.calculate_loss(batch).item()
    assert after < before - 0.1, (before, after)
    frozen = [p for n, p in model.named_parameters() if ".ltis." in n]
    assert frozen and all(p.grad is None for p in frozen)


def test_fit_save_and_load_give_identical_predictions(data):
    config, _, train_data, valid_data, test_data = data
    device = config["device"]  # the GPU where there is one
    model = make_model(config, train_data).to(device)
    trainer = Trainer(config, model)
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    result = trainer.evaluate(test_data, load_best_model=True)  # goes through the safe torch.load
    assert 0.0 <= result["ndcg@10"] <= 1.0
    batch = next(iter(test_data))[0].to(device)
    model.eval()
    with torch.no_grad():
        expected = model.full_sort_predict(batch)
    _, loaded, *_, loaded_test = recbole_blossom.load_data_and_model(trainer.saved_model_file)
    loaded.eval()
    with torch.no_grad():
        got = loaded.full_sort_predict(next(iter(loaded_test))[0].to(device))
    assert type(loaded) is BlossomSASRec
    assert torch.equal(expected, got)


def test_run_api_returns_recbole_result(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = recbole_blossom.run("BlossomSASRec", "ml-100k", config_dict={**TINY, "n_layers": 1}, saved=False)
    assert set(result) >= {"best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}
    assert set(result["test_result"]) == {"recall@10", "mrr@10", "ndcg@10"}


def test_objective_function_for_hyper_tuning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "fixed.yaml"
    cfg.write_text("model: BlossomSASRec\ndataset: ml-100k\n")
    out = recbole_blossom.objective_function(config_dict={**TINY, "n_layers": 1}, config_file_list=[str(cfg)],
                                             saved=False)
    assert out["model"] == "BlossomSASRec" and "ndcg@10" in out["test_result"]


@pytest.mark.parametrize("model, key, value, message", [
    ("BlossomSASRec", "n_kv_heads", 3, "n_kv_heads"),
    ("BlossomSASRec", "seq_train_mode", "every-position", "seq_train_mode must be one of"),
    ("BlossomLinRec", "blossom_impl", "fast", "blossom_impl: fast is not available for BlossomLinRec"),
    ("LinRec", "n_heads", 3, r"hidden_size \(128\) must be divisible by n_heads \(3\)"),
    ("LinRec", "seq_train_mode", "every_position", "linrec_causal: True"),
    ("SASRecSDPA", "loss_chunk_size", -1, "loss_chunk_size must be a positive integer"),
    ("BlossomSASRec", "use_position_embedding", "yes", "use_position_embedding must be True or False"),
])
def test_model_keys_are_checked_from_the_config_alone(model, key, value, message):
    """``check_config`` needs no data, so bad model keys can be refused before anything is loaded."""
    model_class = recbole_blossom.MODELS[model]
    model_class.check_config(BlossomConfig(model=model, dataset="ml-100k"))  # the defaults pass
    with pytest.raises(ValueError, match=message):
        model_class.check_config(BlossomConfig(model=model, dataset="ml-100k", config_dict={key: value}))


def test_predict_encodes_each_distinct_history_once(data, monkeypatch):
    """The 100-negative protocol's batches: each history repeated with other items, rows interleaved."""
    config, _, train_data, _, _ = data
    model = make_model(config, train_data).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([40, 17, 3, 17])
    seq = torch.randint(1, model.n_items, (4, 40), generator=g)
    seq[torch.arange(40)[None, :] >= lengths[:, None]] = 0
    seq[3, 17:] = 0
    seq[3, :17] = seq[1, :17].flip(0)  # same length as row 1, other items: a distinct history
    users = torch.tensor([0, 1, 2, 3, 2, 0, 1, 0])  # 8 rows of 4 distinct histories
    items = torch.randint(1, model.n_items, (8,), generator=g)
    batch = Interaction({model.ITEM_SEQ: seq[users], model.ITEM_SEQ_LEN: lengths[users], model.ITEM_ID: items})
    encoded = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda s, n: encoded.append(len(s)) or forward(s, n))
    with torch.no_grad():
        scores = model.predict(batch)
        expected = SASRec.predict(model, batch)  # RecBole's: one forward over all 8 rows
    assert encoded == [4, 8]
    assert torch.allclose(scores, expected, atol=1e-5)
    # against an independent reference: each row's own last hidden state times its item's embedding
    with torch.no_grad():
        own = torch.stack([forward(seq[u:u + 1], lengths[u:u + 1])[0] @ model.item_embedding.weight[i]
                           for u, i in zip(users.tolist(), items.tolist())])
    assert torch.allclose(scores, own, atol=1e-5)
