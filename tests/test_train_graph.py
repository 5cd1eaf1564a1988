"""``train_cuda_graph``: training steps replayed from CUDA graphs give the eager steps' losses and gradients (GPU,
every plugin model, padded batches, LTIS selecting, fp32 and bf16 autocast, dropout on with the same random
numbers, parameters updated between steps, RecBole's trainer with and without graphs, fp16 AMP); the key's checks,
the cache's life and the guard against two forwards per backward on any machine."""

import copy
import gc
import math

import pytest
import torch
from recbole.data.interaction import Interaction
from tiny_runs import inside, tiny

import recbole_blossom
from recbole_blossom import BlossomConfig, BlossomSASRec, SASRecSDPA
from recbole_blossom.model import train_graph
from recbole_blossom.model.train_graph import GraphedTraining

from test_eval_graph import BATCH, IDS, L, MODELS, N_ITEMS, build, gpu
from test_eval_graph import batch as histories


def batch(seed, rows=BATCH, device="cpu"):
    """:func:`test_eval_graph.batch` histories and a next item each."""
    data = histories(seed, rows)
    data.update(Interaction({"item_id": torch.randint(1, N_ITEMS, (rows,),
                                                      generator=torch.Generator().manual_seed(seed + 1))}))
    return data.to(device)


def loss_and_grads(model, data, autocast, seed):
    """One step's loss and the gradient of every parameter, the CUDA generator seeded first (dropout draws)."""
    torch.cuda.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = model.calculate_loss(data)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def sgd(model, grads, lr=0.05):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in grads:
                p.sub_(lr * grads[n])  # in place, as an optimizer does: the graphs must see the new values


# --- any machine ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BlossomSASRec", "SASRecSDPA", "LinRec", "BlossomLinRec"])
def test_train_cuda_graph_defaults_true_and_is_checked(name):
    assert BlossomConfig(model=name, dataset="ml-100k")["train_cuda_graph"] is True
    with pytest.raises(ValueError, match="train_cuda_graph must be True or False, got 1"):
        build(recbole_blossom.model.MODELS[name], train_cuda_graph=1)


def test_on_the_cpu_training_is_eager():
    model = build(BlossomSASRec).train()
    data = batch(0)
    torch.manual_seed(0)
    loss = model.calculate_loss(data)
    model.train_cuda_graph = False
    torch.manual_seed(0)
    expected = model.calculate_loss(data)
    assert torch.equal(loss, expected)
    assert not model._train_graphs.seen and not model._train_graphs.graphs


def test_train_graph_max_tokens_default_and_checks():
    assert BlossomConfig(model="BlossomSASRec", dataset="ml-100k")["train_graph_max_tokens"] == 262144
    for bad in (-1, 2.5, True, "many"):
        with pytest.raises(ValueError, match="train_graph_max_tokens must be a non-negative integer"):
            build(BlossomSASRec, train_graph_max_tokens=bad)


@pytest.mark.parametrize("cap, graphed", [(BATCH * L, True), (BATCH * L - 1, False), (0, False)])
def test_only_batches_up_to_the_token_cap_go_through_the_graphs(monkeypatch, cap, graphed):
    """A batch of more than ``train_graph_max_tokens`` tokens trains eagerly (a graph's pool holds more memory than
    an eager step, and a large batch keeps the GPU busier than the host): the cache is asked only up to the cap."""
    model = build(BlossomSASRec, train_graph_max_tokens=cap).train()
    calls = []
    monkeypatch.setattr(GraphedTraining, "usable", staticmethod(lambda *inputs: True))
    monkeypatch.setattr(model, "_train_graphs", lambda module, fn, params, *inputs: calls.append(1) or fn(*inputs))
    model.calculate_loss(batch(0))
    assert bool(calls) == graphed


def test_usable_needs_cuda_tensors_and_autograd():
    assert not GraphedTraining.usable(torch.zeros(2))
    with torch.no_grad():
        assert not GraphedTraining.usable(torch.zeros(2))


def test_a_copied_model_gets_its_own_training_graphs():
    model = build(SASRecSDPA)
    model._train_graphs.seen.add("a key")
    twin = copy.deepcopy(model)
    assert twin._train_graphs is not model._train_graphs and not twin._train_graphs.seen


def test_a_step_that_cannot_be_recorded_is_an_error_naming_the_key(monkeypatch):
    def fail(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(GraphedTraining, "_record", fail)
    graphs, w = GraphedTraining(), torch.ones(3, requires_grad=True)
    module = torch.nn.Module()
    assert torch.equal(graphs(module, lambda x: x * w, (w,), torch.full((3,), 2.0)), torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match="train_cuda_graph: False") as err:
        graphs(module, lambda x: x * w, (w,), torch.full((3,), 2.0))
    assert "stream is capturing" in str(err.value) and not graphs.graphs


class _Replayable:
    """Stands for a recorded graph on the CPU: replaying it runs ``fn``."""

    def __init__(self, fn):
        self.replay = fn


def test_a_second_forward_before_the_backward_is_an_error():
    """The backward graph holds the activations of the last forward replay only: the backward of an earlier
    forward must refuse, naming the key, instead of returning another forward's gradients."""
    w = torch.ones(2, requires_grad=True)
    entry = train_graph._Entry()
    entry.output, entry.grad_output = torch.zeros(2), torch.zeros(2)
    entry.flat = torch.zeros(2)
    entry.grads = [(0, 2, torch.Size([2]))]
    entry.forward = _Replayable(lambda: entry.output.add_(1.0))
    entry.backward = _Replayable(lambda: entry.flat.copy_(entry.grad_output * 3.0))
    first = train_graph._Replay.apply(entry, w)
    second = train_graph._Replay.apply(entry, w)
    assert first.tolist() == [1.0, 1.0] and second.tolist() == [2.0, 2.0]  # a copy each: not overwritten
    second.sum().backward()
    assert w.grad.tolist() == [3.0, 3.0]
    with pytest.raises(RuntimeError, match="train_cuda_graph: False"):
        first.sum().backward()


# --- GPU ------------------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_class, extra", MODELS, ids=IDS)
def test_replayed_steps_equal_eager_steps(model_class, extra, autocast):
    """Two copies of a model (dropout on), one training through graphs, one eagerly, the same batches, CUDA generator
    state and parameters at each step, the parameters changed in place between steps: every step's loss and
    gradients agree, the first step eager, the second recording, the rest replaying; and the masks change from
    step to step (a recorded host seed would replay one mask: the losses of a repeated batch would repeat)."""
    graphed = build(model_class, **extra).cuda().train()
    eager = build(model_class, **extra, train_cuda_graph=False).cuda().train()
    batches = [batch(s, device="cuda") for s in (0, 1, 2, 2, 3)]
    # relative error of each gradient, with a floor: a gradient that is zero in exact arithmetic (a key bias: softmax
    # ignores a shift common to all of a query's scores) is rounding noise in both runs, and in bf16 the graph's
    # rounding may differ a little (it records without autocast's cache of cast weights)
    tol, floor_share = (1e-4, 1e-3) if autocast is None else (2e-2, 5e-2)
    losses = []
    for step, data in enumerate(batches):
        with torch.no_grad():  # the same parameters at each step (rounding would otherwise drift them apart)
            for mine, theirs in zip(graphed.parameters(), eager.parameters()):
                mine.copy_(theirs)
        loss, grads = loss_and_grads(graphed, data, autocast, seed=100 + step)
        expected_loss, expected = loss_and_grads(eager, data, autocast, seed=100 + step)
        torch.testing.assert_close(loss, expected_loss, rtol=tol, atol=tol)
        assert grads.keys() == expected.keys()
        total = torch.stack([g.norm() for g in expected.values()]).norm()
        for name in grads:
            error = (grads[name] - expected[name]).norm() / torch.maximum(expected[name].norm(), floor_share * total)
            assert error < tol, f"step {step} {name}: relative error {error:.2e}"
        sgd(eager, expected)  # copied in place into the graphed model next step: its graphs must read the new values
        losses.append(loss)
    assert len(graphed._train_graphs.graphs) == 1 and not eager._train_graphs.seen
    assert not torch.equal(losses[2], losses[3]), "a repeated batch drew the same dropout masks"


@gpu
def test_gradients_accumulate_over_replays_and_a_smaller_batch_runs_eager():
    """Two backward passes without zeroing add up (autograd owns the gradients, not the graph's buffer), and a
    batch of another shape (an epoch's last) runs eagerly with the right gradients."""
    model = build(BlossomSASRec, hidden_dropout_prob=0.0, attn_dropout_prob=0.0).cuda().train()
    data, last = batch(4, device="cuda"), batch(5, rows=BATCH - 2, device="cuda")
    for _ in range(2):
        model.calculate_loss(data).backward()
    model.zero_grad(set_to_none=True)
    model.calculate_loss(data).backward()
    # the compression MLP gets no gradient (it only picks blocks)
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.calculate_loss(data).backward()
    for n in once:
        torch.testing.assert_close(model.get_parameter(n).grad, 2 * once[n], rtol=1e-5, atol=1e-6)
    assert len(model._train_graphs.graphs) == 1
    model.zero_grad(set_to_none=True)
    model.calculate_loss(last).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.train_cuda_graph = False
    model.zero_grad(set_to_none=True)
    model.calculate_loss(last).backward()
    assert got.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n in got:
        torch.testing.assert_close(got[n], model.get_parameter(n).grad, rtol=1e-5, atol=1e-6)
    assert len(model._train_graphs.graphs) == 1 and len(model._train_graphs.seen) == 2


@gpu
def test_recording_while_the_last_steps_loss_is_alive():
    """RecBole's trainer holds the last step's loss (and so its autograd graph, down to the parameters' gradient
    nodes, made on the default stream) while the next step records: the recording must not sync with them."""
    model = build(BlossomSASRec).cuda().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = batch(9, device="cuda")
    loss = None
    for _ in range(4):
        opt.zero_grad()
        loss = model.calculate_loss(data)
        loss.backward()
        opt.step()
    assert len(model._train_graphs.graphs) == 1 and math.isfinite(loss.item())


@gpu
def test_a_second_forward_before_the_backward_is_refused_on_the_gpu():
    model = build(SASRecSDPA).cuda().train()
    data = batch(6, device="cuda")
    for _ in range(2):
        model.calculate_loss(data).backward()
    first, second = model.calculate_loss(data), model.calculate_loss(data)
    second.backward()
    with pytest.raises(RuntimeError, match="train_cuda_graph: False"):
        first.backward()


@gpu
def test_moves_loads_and_mode_switches_drop_the_training_graphs():
    model = build(BlossomSASRec).cuda().train()
    data = batch(7, device="cuda")
    for leave in (lambda: model.eval(), lambda: model.train(), lambda: model.cpu(),
                  lambda: model.load_state_dict(model.state_dict())):
        model.cuda().train()
        for _ in range(2):
            model.calculate_loss(data).backward()
        assert model._train_graphs.graphs and model._train_graphs.pool_bytes()[0] > 0
        leave()
        assert not model._train_graphs.graphs and model._train_graphs.pool is None


@gpu
def test_epochs_of_recording_hold_no_more_memory():
    """Each epoch (``train()``) records afresh and evaluation (``eval()``) drops the graphs: the allocated memory
    after an epoch is the same from the second epoch on."""
    model = build(BlossomSASRec).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = batch(8, device="cuda")
    after = []
    for _ in range(4):
        model.train()
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model.calculate_loss(data).backward()
            opt.step()
        assert model._train_graphs.graphs
        model.eval()
        opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[1] == after[2] == after[3], after


@gpu
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "fp16-amp"])
def test_recbole_training_with_and_without_graphs(tmp_path, monkeypatch, amp):
    """RecBole's trainer on the GPU (fast path, LTIS selecting at L = 50 with small blocks, dropout on): graphs
    were recorded, and the run gives the metrics of the run without graphs (the same random numbers: the
    replays draw what the eager steps draw); with ``enable_amp`` (fp16 and a gradient scaler) the loss and the
    metrics are finite."""
    recorded = []
    record = train_graph.GraphedTraining._record
    monkeypatch.setattr(train_graph.GraphedTraining, "_record",
                        lambda self, *a: recorded.append(1) or record(self, *a))
    results = {}
    for flag in (True, False):
        config = tiny(tmp_path / str(flag), blossom_impl="fast", MAX_ITEM_LIST_LENGTH=50, epochs=2,
                      train_cuda_graph=flag, enable_amp=amp, enable_scaler=amp, seed=7)
        with inside(tmp_path):
            results[flag] = recbole_blossom.run("BlossomSASRec", "ml-100k", config_dict=config, saved=False)
        if flag:
            assert recorded, "no training graph was recorded"
    for part in ("best_valid_result", "test_result"):
        on, off = results[True][part], results[False][part]
        assert on.keys() == off.keys() and all(math.isfinite(v) for v in on.values())
        assert all(math.isclose(on[k], off[k], abs_tol=2e-3) for k in on), (on, off)
