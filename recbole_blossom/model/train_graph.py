"""CUDA graphs of a model's training forward and backward (``train_cuda_graph``): the host launches nothing per
layer in a training step.

A training step of these models is bound by the host at the reference sizes: BlossomSASRec's step took the
same 9-12 ms on an H100 from L = 50 to 32,768 while its GPU work took 7-10 ms, and the host's speed moves by
1-3 ms from round to round (``benchmarks/NOTES.md``). With the encoder's forward and backward recorded once and
replayed, the host issues two replays, the loss and the optimizer step.

:class:`GraphedTraining` runs ``fn(*inputs) -> output`` (the encoder: item sequence and lengths to hidden states)
as one autograd node. The first call with a new *key* (shapes, dtypes, device, autocast state, the parameters
that need gradients) runs ``fn`` eagerly; the second records two graphs, the forward with autograd and the
backward of its output to the parameters (sharing one memory pool), and replays the forward; later calls copy
their inputs into the graph's and replay. The node's backward copies the incoming gradient in, replays the
backward graph and hands autograd a fresh copy of the parameters' gradients (which it adds to ``.grad`` as for
any node). What makes the replays correct:

* random numbers: PyTorch's dropout and the attention kernels' seeds (device tensors, see
  ``recbole_blossom.ops.parallel``) are drawn inside the graph from the CUDA generator, which a replay reads and
  advances as the eager step would: every step draws new masks, the masks the eager step would have drawn;
* the graphs read the parameters where they are, so the optimizer's in-place updates are seen; the model drops
  the graphs when its parameters move or may be replaced (``.to()``, ``load_state_dict``) and on ``train()`` /
  ``eval()`` (evaluation gets the memory; the next epoch records again);
* the backward graph uses the activations of the last forward replay: a second forward through the same graph
  before the first one's backward is an error (eager code would keep both), as is a failed recording; both
  errors name ``train_cuda_graph: False``.

The pool holds the activations of one step between steps (eager training frees them after the backward and
reuses the memory for the loss): ``pool_bytes`` says how much it holds, for memory tables. Not used in a
distributed run (not tested there) nor while another graph is being recorded.
"""

import contextlib

import torch
import torch.distributed as dist

from recbole_blossom.model.eval_graph import GraphCache, side_stream


@contextlib.contextmanager
def _parameters_replaced(module, params, aliases):
    """Every submodule of ``module`` reads ``aliases[i]`` where it held ``params[i]`` (shared parameters too)."""
    by_id = {id(p): a for p, a in zip(params, aliases)}
    swapped = [(m, name, p) for m in module.modules() for name, p in m._parameters.items() if id(p) in by_id]
    try:
        for m, name, p in swapped:
            m._parameters[name] = by_id[id(p)]
        yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


class _Entry:
    """One recorded step: static inputs, the two graphs, the forward's output, the gradient buffers."""

    __slots__ = ("inputs", "forward", "backward", "output", "grad_output", "grads", "flat", "replays")

    def __init__(self):
        self.replays = 0  # forward replays so far: a backward checks that its forward was the last one


class _Replay(torch.autograd.Function):
    """Forward: replay the recorded forward; backward: replay the recorded backward. Inputs are the parameters
    (so autograd routes their gradients); the entry rides along as a non-tensor argument."""

    @staticmethod
    def forward(ctx, entry, *params):
        entry.forward.replay()
        entry.replays += 1
        ctx.entry, ctx.replay = entry, entry.replays
        return entry.output.clone()  # the next replay overwrites the graph's own output

    @staticmethod
    def backward(ctx, grad_output):
        entry = ctx.entry
        if entry.replays != ctx.replay:
            raise RuntimeError("a training CUDA graph ran its forward again before the backward of an earlier "
                               "forward (two forward passes per backward); set train_cuda_graph: False for "
                               "such a loss")
        entry.grad_output.copy_(grad_output)
        entry.backward.replay()
        if entry.flat is None:  # parameters of several dtypes: a copy each
            return (None, *(None if g is None else g.clone() for g in entry.grads))
        # one copy of all gradients (the graph's buffer is overwritten by the next replay); autograd keeps views
        flat = entry.flat.clone()
        return (None, *(None if g is None else flat[g[0]:g[1]].view(g[2]) for g in entry.grads))


class GraphedTraining(GraphCache):
    """``fn(*inputs)`` with autograd to ``params`` (those of ``module`` that need gradients) through CUDA graphs per
    key, from the second call of a key on (``module`` and ``fn`` are given with each call, always the same: holding
    them would tie the cache to the model)."""

    what, key_name = "the training step", "train_cuda_graph"

    @staticmethod
    def usable(*inputs):
        """Whether graphs may replace the call: CUDA tensors, autograd on, not inside another capture, no process
        group."""
        return (all(t.is_cuda for t in inputs) and torch.is_grad_enabled()
                and not torch.cuda.is_current_stream_capturing()
                and not (dist.is_available() and dist.is_initialized()))

    def __call__(self, module, fn, params, *inputs):
        key = self.input_key(inputs, tuple(map(id, params)))
        entry = self.entry(key, lambda: self._record(module, fn, params, inputs, key[1], key[2]))
        if entry is None:
            return fn(*inputs)
        for static, x in zip(entry.inputs, inputs):
            static.copy_(x)
        return _Replay.apply(entry, *params)

    def _record(self, module, fn, params, inputs, autocast, dtype):
        device = inputs[0].device
        entry = _Entry()
        entry.inputs = tuple(x.clone() for x in inputs)
        # autocast's cache of cast weights would hand the graph copies made outside it: record without the cache
        region = torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False)
        # the recording differentiates to aliases of the parameters (same storage, so the optimizer's updates are
        # read): a parameter's own gradient node lives as long as any graph that reaches it (RecBole's trainer
        # keeps the last step's loss), remembers the stream it was made on, and a backward syncs with that stream,
        # which a recording on another stream may not do; hooks on the parameters would also fire inside it
        aliases = tuple(p.detach().requires_grad_(True) for p in params)
        side = side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        rng = torch.cuda.get_rng_state(device)
        with _parameters_replaced(module, params, aliases):
            with torch.cuda.stream(side):
                with region:  # a warm-up of both passes on a side stream, as recording needs (nothing accumulates)
                    out = fn(*entry.inputs)
                torch.autograd.grad(out, aliases, torch.zeros_like(out), allow_unused=True)
                del out
            torch.cuda.current_stream(device).wait_stream(side)
            # the warm-up's draws are undone: the replay then draws what the eager step would have drawn, so a run
            # with graphs sees the random numbers of one without
            torch.cuda.set_rng_state(rng, device)
            entry.forward, entry.backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.device(device):
                with torch.cuda.graph(entry.forward, pool=self.pool), region:
                    entry.output = fn(*entry.inputs)
                self.pool = entry.forward.pool()  # every graph of this model shares one pool
                entry.grad_output = torch.empty_like(entry.output)
                with torch.cuda.graph(entry.backward, pool=self.pool):
                    grads = torch.autograd.grad(entry.output, aliases, entry.grad_output, allow_unused=True)
                    used = [g for g in grads if g is not None]
                    one_dtype = len({g.dtype for g in used}) == 1
                    entry.flat = torch.cat([g.reshape(-1) for g in used]) if one_dtype else None
        entry.output = entry.output.detach()
        if entry.flat is None:
            entry.grads = grads
            return entry
        entry.grads, start = [], 0
        for g in grads:  # (start, end, shape) of each gradient in the flat buffer
            entry.grads.append(None if g is None else (start, start + g.numel(), g.shape))
            start += 0 if g is None else g.numel()
        return entry
