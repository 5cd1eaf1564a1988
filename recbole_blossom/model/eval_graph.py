"""CUDA graphs of a model's inference forward (``eval_cuda_graph``): the host launches nothing per layer.

In evaluation a batch of user histories is encoded without autograd, dropout or random numbers, and every full
batch has the same shape, so the encoder's kernels can be recorded once and replayed. On the GPU the encoder's
forward was bound by the host at the reference sizes (tens of launches a layer, ~2-4 ms a batch at any L on an
H100, ``benchmarks/NOTES.md``); a replay costs the GPU time alone.

:class:`GraphedForward` runs ``fn(*tensors) -> tensor``: the first call with a new *key* (shapes, dtypes,
device, autocast state) runs ``fn`` eagerly, which also fills the kernels' caches; the second records a graph
of it; later calls copy their inputs into the graph's and replay it, and return a copy of its output (the next
replay overwrites the graph's own). A shape seen once (an evaluation's last, smaller batch) is never recorded.
The graphs hold their memory until :meth:`GraphedForward.clear`, which the model calls on ``train()`` and
``eval()``, and when it moves or loads weights. The graph reads the parameters where they are, so values loaded in
place are seen by the next replay. A forward that waits on the host (``.item()``, a boolean mask) cannot be
recorded: the error says to set ``eval_cuda_graph: False``. :class:`GraphCache` (a key's first call eager, the
second recording, the shared pool, the error of a failed recording) is also the base of the training graphs
(:mod:`recbole_blossom.model.train_graph`).
"""

import torch

MAX_GRAPHS = 4  # keys recorded at once; beyond, all are dropped (shapes that keep changing: eager is as good)
MAX_SEEN = 256  # keys remembered as seen once; beyond, forgotten (a caller whose every batch has its own shape)
_SIDE_STREAMS = {}  # device -> the stream of the warm-ups before recording: one per device, because each new
# stream that runs a matrix product gets its own cuBLAS workspace (32 MiB on an H100) that lives as long as the process


def side_stream(device):
    """The stream of the warm-ups before recording on ``device`` (also the training graphs')."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class GraphCache:
    """Graphs per input key, each recorded at its key's second call, sharing one memory pool; what the inference
    and the training graphs have in common (subclasses define ``_record`` and what a call does)."""

    what = "a call"  # what is recorded, and the key that turns the graphs off (for the error of a failed recording)
    key_name = None

    def __init__(self):
        self.seen, self.graphs, self.pool = set(), {}, None

    def __deepcopy__(self, memo):  # a copied model records its own graphs (of its own parameters)
        return type(self)()

    def __getstate__(self):  # graphs are not picklable and belong to this process's parameters
        return {}

    def __setstate__(self, state):
        self.clear()

    def clear(self):
        """Drop every graph and its memory pool."""
        self.seen, self.graphs, self.pool = set(), {}, None

    @staticmethod
    def input_key(inputs, *extra):
        """The key of a call: each input's shape, dtype and device, autocast's state and dtype, then ``extra``."""
        return (tuple((t.shape, t.dtype, t.device) for t in inputs), torch.is_autocast_enabled("cuda"),
                torch.get_autocast_dtype("cuda"), *extra)

    def entry(self, key, record):
        """The recorded entry of ``key``; None at a key's first call (the caller runs eagerly); at its second,
        ``record()`` makes it."""
        entry = self.graphs.get(key)
        if entry is not None:
            return entry
        if key not in self.seen:
            if len(self.seen) >= MAX_SEEN:
                self.seen.clear()
            self.seen.add(key)
            return None
        if len(self.graphs) >= MAX_GRAPHS:
            self.clear()
        try:
            entry = self.graphs[key] = record()
        except RuntimeError as err:  # e.g. a forward that waits on the host, which a graph cannot hold
            raise RuntimeError(f"recording {self.what} in a CUDA graph failed ({err}); set {self.key_name}: False "
                               "to run without graphs") from err
        return entry

    def pool_bytes(self):
        """``(reserved, allocated)`` bytes of the graphs' memory pool: what the graphs hold between calls is
        ``reserved - allocated`` (their static tensors are allocated; their intermediates' space is reserved)."""
        if self.pool is None:
            return 0, 0
        segments = [s for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", ())) == self.pool]
        return sum(s["total_size"] for s in segments), sum(s["allocated_size"] for s in segments)


class GraphedForward(GraphCache):
    """``fn(*inputs)`` through a CUDA graph per input key, from the second call of a key on (``fn`` is given with
    each call, always the same function: the model's ``forward``; holding it would tie the cache to the model)."""

    what, key_name = "the evaluation forward", "eval_cuda_graph"

    @staticmethod
    def usable(*inputs):
        """Whether a graph may replace the call: CUDA tensors, no autograd, not inside another capture."""
        return (all(t.is_cuda for t in inputs) and not torch.is_grad_enabled()
                and not torch.cuda.is_current_stream_capturing())

    def __call__(self, fn, *inputs):
        key = self.input_key(inputs)
        entry = self.entry(key, lambda: self._record(fn, inputs, key[1], key[2]))
        if entry is None:
            return fn(*inputs)
        static_inputs, graph, output = entry
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        graph.replay()
        return output.clone()

    def _record(self, fn, inputs, autocast, dtype):
        device = inputs[0].device
        static_inputs = tuple(x.clone() for x in inputs)
        # autocast's cache of cast weights would hand the graph copies that are freed when the caller's autocast
        # region ends: record with the same autocast state and no cache
        region = torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False)
        side = side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), region:
            fn(*static_inputs)  # a warm-up on a side stream, as recording needs
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=self.pool), region:
            output = fn(*static_inputs)
        self.pool = graph.pool()  # every graph of this model shares one pool
        return static_inputs, graph, output
