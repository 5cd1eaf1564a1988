"""``eval_cuda_graph``: ``full_sort_predict`` replayed from CUDA graphs gives the eager scores (GPU, every plugin
model, padded batches, LTIS selecting, fp32 and bf16 autocast, weights changed after recording, RecBole's
evaluation); the key's checks and the cache's life on any machine."""

import copy
import gc
import math

import pytest
import torch
from recbole.data.interaction import Interaction
from tiny_runs import inside, model_without_data, tiny

import recbole_blossom
from recbole_blossom import BlossomConfig, BlossomLinRec, BlossomSASRec, LinRec, SASRecSDPA
from recbole_blossom.hparams import LONG_HISTORY
from recbole_blossom.model import eval_graph
from recbole_blossom.model.eval_graph import GraphedForward

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
L, N_ITEMS, BATCH = 120, 300, 6
# reference block sizes: at L = 120 a late query has 7 past selection blocks and keeps 4, so LTIS selects
SIZES = {"hidden_size": 64, "inner_size": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "MAX_ITEM_LIST_LENGTH": L, "initializer_range": 0.2}
MODELS = [(SASRecSDPA, {}), (BlossomSASRec, {}), (BlossomSASRec, LONG_HISTORY), (LinRec, {}), (BlossomLinRec, {})]
IDS = ["SASRecSDPA", "BlossomSASRec", "BlossomSASRec-long", "LinRec", "BlossomLinRec"]


def build(model_class, **overrides):
    return model_without_data(model_class, N_ITEMS, {**SIZES, **overrides})


def batch(seed, rows=BATCH, device="cpu"):
    """Left-aligned histories of random lengths (one full), padded with 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (rows,), generator=g)
    lengths[0] = L
    seq = torch.randint(1, N_ITEMS, (rows, L), generator=g)
    seq[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    return Interaction({"item_id_list": seq, "item_length": lengths}).to(device)


def eager_scores(model, interaction):
    model.eval_cuda_graph = False
    try:
        return model.full_sort_predict(interaction)
    finally:
        model.eval_cuda_graph = True


# --- any machine ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BlossomSASRec", "SASRecSDPA", "LinRec", "BlossomLinRec"])
def test_eval_cuda_graph_defaults_true_and_is_checked(name):
    assert BlossomConfig(model=name, dataset="ml-100k")["eval_cuda_graph"] is True
    with pytest.raises(ValueError, match="eval_cuda_graph must be True or False, got 'yes'"):
        build(recbole_blossom.model.MODELS[name], eval_cuda_graph="yes")


def test_on_the_cpu_full_sort_predict_is_the_eager_forward():
    model = build(BlossomSASRec).eval()
    data = batch(0)
    with torch.no_grad():
        scores = model.full_sort_predict(data)
        expected = model.forward(data["item_id_list"], data["item_length"]) @ model.item_embedding.weight.t()
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    assert not model._eval_graphs.seen and not model._eval_graphs.graphs


def test_a_copied_model_gets_its_own_graph_cache():
    model = build(SASRecSDPA)
    model._eval_graphs.seen.add("a key")
    twin = copy.deepcopy(model)
    assert twin._eval_graphs is not model._eval_graphs and not twin._eval_graphs.seen


# --- GPU ------------------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_class, extra", MODELS, ids=IDS)
def test_replayed_scores_equal_eager_scores(model_class, extra, autocast):
    """First call eager, second records and replays, later ones replay: every call's scores equal the eager
    ones for its own batch, and a returned tensor is not overwritten by a later replay."""
    model = build(model_class, **extra).cuda().eval()
    batches = [batch(seed, device="cuda") for seed in (0, 1, 2, 0)]
    region = torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None)
    with torch.no_grad(), region:
        expected = [eager_scores(model, b) for b in batches]
        got = [model.full_sort_predict(b) for b in batches]
    assert len(model._eval_graphs.graphs) == 1  # recorded once, on the second call of the shape
    tol = dict(rtol=1e-5, atol=1e-5) if autocast is None else dict(rtol=2e-2, atol=2e-2)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tol)
    assert not torch.equal(got[0], got[1])  # different batches, different scores


@gpu
def test_weights_changed_after_recording_are_seen_and_moves_drop_the_graphs():
    model = build(BlossomSASRec).cuda().eval()
    data = batch(3, device="cuda")
    with torch.no_grad():
        model.full_sort_predict(data), model.full_sort_predict(data)
        assert len(model._eval_graphs.graphs) == 1
        for p in model.parameters():  # in place, as an optimizer step or load_state_dict does
            p.mul_(1.25)
        torch.testing.assert_close(model.full_sort_predict(data), eager_scores(model, data), rtol=1e-5, atol=1e-5)
        other = build(BlossomSASRec, initializer_range=0.05).state_dict()
        model.load_state_dict(other, assign=True)  # new parameter tensors: the graph must not read the old ones
        assert not model._eval_graphs.graphs
        model.cuda()
        model.full_sort_predict(data), model.full_sort_predict(data)
        torch.testing.assert_close(model.full_sort_predict(data), eager_scores(model, data), rtol=1e-5, atol=1e-5)
    for leave in (lambda: model.train(), lambda: model.cpu()):
        model.eval()
        with torch.no_grad():
            model.cuda().full_sort_predict(data), model.full_sort_predict(data)
        assert model._eval_graphs.graphs
        leave()
        assert not model._eval_graphs.graphs


@gpu
def test_graphs_only_in_eval_without_autograd_and_a_smaller_last_batch_runs_eager():
    model = build(SASRecSDPA).cuda()
    data, last = batch(4, device="cuda"), batch(5, rows=BATCH - 2, device="cuda")
    for _ in range(3):
        model.train()
        with torch.no_grad():
            model.full_sort_predict(data)  # training mode: eager
        model.eval()
        model.full_sort_predict(data)  # autograd on: eager
    assert not model._eval_graphs.seen
    with torch.no_grad():
        for _ in range(3):
            model.full_sort_predict(data)
        scores = model.full_sort_predict(last)  # seen once: eager
    assert len(model._eval_graphs.graphs) == 1 and len(model._eval_graphs.seen) == 2
    with torch.no_grad():
        torch.testing.assert_close(scores, eager_scores(model, last), rtol=1e-5, atol=1e-5)


@gpu
def test_recording_again_and_again_holds_no_more_memory():
    """A recording's memory goes with its graphs: models that record and are dropped, one after another, leave the
    allocated memory where the second left it (a new warm-up stream per recording kept a cuBLAS workspace each,
    32 MiB on an H100)."""
    after = []
    for seed in range(4):
        model = build(SASRecSDPA).cuda().eval()
        data = batch(seed, device="cuda")
        with torch.no_grad():
            for _ in range(3):
                model.full_sort_predict(data)
        assert model._eval_graphs.graphs
        del model, data
        gc.collect()
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[1] == after[2] == after[3], after


@gpu
def test_recbole_evaluation_with_and_without_graphs_gives_the_same_metrics(tmp_path, monkeypatch):
    """A RecBole run on the GPU (fast path, LTIS selecting at L = 50 with small blocks): the same metrics with
    ``eval_cuda_graph`` on and off, and graphs were recorded (full-sort batches of 16 users: a sequential model's
    evaluation batch counts users, so most batches have one shape)."""
    recorded = []
    record = eval_graph.GraphedForward._record
    monkeypatch.setattr(eval_graph.GraphedForward, "_record",
                        lambda self, *a: recorded.append(1) or record(self, *a))
    results = {}
    for flag in (True, False):
        config = tiny(tmp_path / str(flag), blossom_impl="fast", MAX_ITEM_LIST_LENGTH=50, epochs=1,
                      eval_batch_size=16, eval_cuda_graph=flag, seed=7)
        with inside(tmp_path):
            results[flag] = recbole_blossom.run("BlossomSASRec", "ml-100k", config_dict=config, saved=False)
        if flag:
            assert recorded, "no graph was recorded"
    for part in ("best_valid_result", "test_result"):
        on, off = results[True][part], results[False][part]
        assert on.keys() == off.keys() and all(math.isclose(on[k], off[k], abs_tol=1e-4) for k in on), (on, off)


def test_usable_needs_cuda_tensors():
    assert not GraphedForward.usable(torch.zeros(2))


def test_a_forward_that_cannot_be_recorded_is_an_error_naming_the_key(monkeypatch):
    """Recording fails (here: stubbed, as a forward that waits on the host fails on the GPU): the error says how to
    evaluate without graphs; the first call of a key runs eagerly and records nothing."""
    def fail(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(GraphedForward, "_record", fail)
    graphs, x = GraphedForward(), torch.ones(3)
    assert torch.equal(graphs(torch.neg, x), -x)
    with pytest.raises(RuntimeError, match="eval_cuda_graph: False") as err:
        graphs(torch.neg, x)
    assert "stream is capturing" in str(err.value) and not graphs.graphs
