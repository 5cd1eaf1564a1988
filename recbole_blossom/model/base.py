"""The one way the plugin puts an attention into a RecBole transformer, the every-position loss, and the encoder
through CUDA graphs on the GPU, in inference (``eval_cuda_graph``, :mod:`recbole_blossom.model.eval_graph`) and in
training (``train_cuda_graph``, :mod:`recbole_blossom.model.train_graph`).

A plugin model is RecBole's ``SASRec`` (item embedding, feed-forward layers, CE/BPR loss, prediction) with
two choices: the attention layer (:meth:`AttentionSASRec.build_attention`) and whether the learned absolute
position embedding is used (``use_position_embedding``). Every attention layer has one interface,
``layer(hidden_states (B, L, hidden), item_seq_len (B,)) -> (B, L, hidden)`` over left-aligned items
(RecBole's layout, padding at the end), so no model builds RecBole's ``L x L`` mask.

``seq_train_mode: every_position`` (issue 11): a training batch holds one row per window of a user's history
and the next item at every real position (:func:`target_list_field`); the loss is the CE over all items at
every real position, scored ``loss_chunk_size`` positions at a time so that the ``positions x n_items``
logits stay bounded in the forward and the backward pass.
"""

import torch
import torch.nn.functional as F
from recbole.model.sequential_recommender import SASRec
from torch.utils.checkpoint import checkpoint

from recbole_blossom.model.eval_graph import GraphedForward
from recbole_blossom.model.train_graph import GraphedTraining

SEQ_TRAIN_MODES = ("per_prefix", "every_position")


def target_list_field(config):
    """Name of the every-position targets ``(B, L)`` in a training batch: ``target_item_id_list`` by default."""
    return "target_" + config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]


def setting(config, key, default):
    """``config[key]``, or ``default`` when it is missing or None (RecBole ``Config`` or a plain dict)."""
    value = config[key] if key in config else None
    return default if value is None else value


def chunked_cross_entropy(hidden, weight, targets, chunk_size):
    """Mean over rows of ``cross_entropy(hidden @ weight.T, targets)``, ``chunk_size`` rows at a time.

    hidden: ``(N, H)``; weight: ``(n_items, H)``; targets: ``(N,)``. Each chunk's logits are recomputed in the
    backward pass (activation checkpointing) instead of being kept, so at most ``chunk_size x n_items``
    logits exist at once in either pass.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    keep_graph = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        part = (hidden[start:start + chunk_size], weight, targets[start:start + chunk_size])
        total = total + (checkpoint(_cross_entropy_sum, *part, use_reentrant=False) if keep_graph
                         else _cross_entropy_sum(*part))
    return total / hidden.shape[0]


def _cross_entropy_sum(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.transpose(0, 1), targets, reduction="sum").float()


class AttentionSASRec(SASRec):
    r"""RecBole's SASRec whose attention layers come from :meth:`build_attention`.

    Subclasses set ``use_position_embedding`` (their default; the config key of that name overrides it) and
    ``supports_every_position`` (the attention is causal, so the output at position ``t`` depends only on items
    ``<= t``) and define :meth:`build_attention`; nothing else.
    After RecBole's ``_init_weights``, a layer with ``reset_parameters(initializer_range)`` initialises what
    RecBole does not know about (e.g. Blossom's gate biases).
    """

    use_position_embedding = True
    supports_every_position = False

    def __init__(self, config, dataset):
        self.check_config(config)
        super().__init__(config, dataset)
        self.TARGET_SEQ = target_list_field(config)
        self.causal = self.every_position_supported(config)
        self.loss_chunk_size = setting(config, "loss_chunk_size", 1024)
        self.use_position_embedding = self.position_embedding_setting(config)
        self.eval_cuda_graph = self.cuda_graph_setting(config, "eval_cuda_graph")
        self.train_cuda_graph = self.cuda_graph_setting(config, "train_cuda_graph")
        self.train_graph_max_tokens = self.train_graph_max_tokens_setting(config)
        self._eval_graphs, self._train_graphs = GraphedForward(), GraphedTraining()
        if not self.use_position_embedding:
            del self.position_embedding
        for layer in self.trm_encoder.layer:
            attention = self.build_attention(config)
            attention.apply(self._init_weights)
            if hasattr(attention, "reset_parameters"):
                attention.reset_parameters(self.initializer_range)
            layer.multi_head_attention = attention

    def build_attention(self, config):
        """One attention layer: ``forward(hidden_states (B, L, hidden), item_seq_len (B,)) -> (B, L, hidden)``."""
        raise NotImplementedError(f"{type(self).__name__} must define build_attention(config)")

    @classmethod
    def check_config(cls, config):
        """Raise ``ValueError`` naming the key for a bad model key; reads only the config, so it can run before
        any data is loaded. Subclasses add their attention's keys."""
        cls.check_seq_train_mode(config)
        chunk = setting(config, "loss_chunk_size", 1024)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
            raise ValueError(f"loss_chunk_size must be a positive integer, got {chunk!r}")
        cls.position_embedding_setting(config)
        cls.cuda_graph_setting(config, "eval_cuda_graph")
        cls.cuda_graph_setting(config, "train_cuda_graph")
        cls.train_graph_max_tokens_setting(config)

    @classmethod
    def position_embedding_setting(cls, config):
        """``use_position_embedding`` from the config (the class's choice when missing or None): whether SASRec's
        learned absolute position embedding is added to the item embedding."""
        use = setting(config, "use_position_embedding", cls.use_position_embedding)
        if not isinstance(use, bool):
            raise ValueError(f"use_position_embedding must be True or False, got {use!r}")
        return use

    @staticmethod
    def cuda_graph_setting(config, key):
        """``eval_cuda_graph`` / ``train_cuda_graph`` (default True): whether, on the GPU, ``full_sort_predict`` in
        eval mode (:mod:`recbole_blossom.model.eval_graph`) / the encoder in a training step
        (:mod:`recbole_blossom.model.train_graph`) runs through CUDA graphs."""
        use = setting(config, key, True)
        if not isinstance(use, bool):
            raise ValueError(f"{key} must be True or False, got {use!r}")
        return use

    @staticmethod
    def train_graph_max_tokens_setting(config):
        """``train_graph_max_tokens`` (default 262,144): the largest training batch (rows x ``L`` tokens) that
        ``train_cuda_graph`` records. A graph takes the host's time out of a step, which matters only while the
        GPU's work is as short as the host's (~10 ms at 65,536 tokens on an H100 at the reference sizes), and its
        memory pool holds more than an eager step (the longest L at batch 64 fell from 91,648 to 56,832 in bf16):
        larger batches train eagerly."""
        cap = setting(config, "train_graph_max_tokens", 262144)
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ValueError(f"train_graph_max_tokens must be a non-negative integer, got {cap!r}")
        return cap

    @classmethod
    def every_position_supported(cls, config):
        """Whether this model, so configured, is causal (can train on every position in one pass)."""
        return cls.supports_every_position

    @classmethod
    def check_seq_train_mode(cls, config):
        """Raise ``ValueError`` naming the keys when ``seq_train_mode`` is unknown or this model cannot do it."""
        mode = setting(config, "seq_train_mode", "per_prefix")
        if mode not in SEQ_TRAIN_MODES:
            raise ValueError(f"seq_train_mode must be one of {', '.join(SEQ_TRAIN_MODES)}, got {mode!r}")
        if mode == "every_position":
            cls._check_every_position(cls.every_position_supported(config), setting(config, "loss_type", "CE"))

    @classmethod
    def _check_every_position(cls, causal, loss_type):
        if not causal:
            raise ValueError(cls.every_position_refusal())
        if loss_type != "CE":
            raise ValueError(f"seq_train_mode: every_position trains with loss_type: CE (over all items); "
                             f"loss_type {loss_type!r} is not implemented for it. Use loss_type: CE or "
                             f"seq_train_mode: per_prefix")

    @classmethod
    def every_position_refusal(cls):
        """Why this model refuses ``seq_train_mode: every_position`` (subclasses name the key that helps)."""
        return (f"seq_train_mode: every_position needs a causal model; {cls.__name__} is not causal. "
                f"Use seq_train_mode: per_prefix")

    def attention_input(self, item_seq, item_seq_len):
        """What every attention layer gets besides the hidden states: the ``(B,)`` lengths, as int32 once per
        forward (what the kernels read; converting in every branch of every layer cost a launch each)."""
        return item_seq_len.to(torch.int32)

    def sequence_output(self, item_seq, item_seq_len):
        """Encoder output at every position: ``(B, L)`` items and ``(B,)`` lengths -> ``(B, L, hidden)``; in
        training on the GPU through CUDA graphs where ``train_cuda_graph`` and ``train_graph_max_tokens`` allow it
        (the same function)."""
        if (self.train_cuda_graph and self.training and item_seq.numel() <= self.train_graph_max_tokens
                and GraphedTraining.usable(item_seq, item_seq_len)):
            params = tuple(p for p in self.parameters() if p.requires_grad)
            if params:
                return self._train_graphs(self, self.encoder_output, params, item_seq, item_seq_len)
        return self.encoder_output(item_seq, item_seq_len)

    def encoder_output(self, item_seq, item_seq_len):
        """:meth:`sequence_output`, eagerly."""
        input_emb = self.item_embedding(item_seq)
        if self.use_position_embedding:
            positions = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0)
            input_emb = input_emb + self.position_embedding(positions)
        input_emb = self.dropout(self.LayerNorm(input_emb))
        trm_output = self.trm_encoder(input_emb, self.attention_input(item_seq, item_seq_len),
                                      output_all_encoded_layers=False)
        return trm_output[-1]

    def forward(self, item_seq, item_seq_len):
        """Output at the last real position: ``(B, L)``, ``(B,)`` -> ``(B, hidden)``."""
        return self.gather_indexes(self.sequence_output(item_seq, item_seq_len), item_seq_len - 1)

    def encode(self, item_seq, item_seq_len):
        """:meth:`forward`, replayed from a CUDA graph where ``eval_cuda_graph`` allows it (eval mode, no autograd,
        CUDA tensors); the same values either way."""
        if self.eval_cuda_graph and not self.training and GraphedForward.usable(item_seq, item_seq_len):
            return self._eval_graphs(self.forward, item_seq, item_seq_len)
        return self.forward(item_seq, item_seq_len)

    def full_sort_predict(self, interaction):
        """SASRec's: scores of every item ``(B, n_items)`` from the output at the last real position."""
        seq_output = self.encode(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return torch.matmul(seq_output, self.item_embedding.weight.transpose(0, 1))

    # the graphs read the parameters where they are: drop them when the parameters move or may be replaced, and on
    # train() and eval() (``eval()`` is ``train(False)``): each evaluation and each epoch records afresh, and each
    # gets the memory of the other's graphs
    def train(self, mode=True):
        self.clear_cuda_graphs()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cuda_graphs()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self.clear_cuda_graphs()
        return super().load_state_dict(*args, **kwargs)

    def clear_cuda_graphs(self):
        """Drop the inference and training graphs and their memory."""
        for name in ("_eval_graphs", "_train_graphs"):
            graphs = getattr(self, name, None)  # None while __init__ runs
            if graphs is not None:
                graphs.clear()

    def predict(self, interaction):
        """SASRec's ``predict`` (a score per row for its ``ITEM_ID``), encoding each distinct history once: the
        sampled-negative protocol (``uni100``) asks for one user's history with 101 items as 101 identical rows."""
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        rows = torch.cat((item_seq, item_seq_len.view(-1, 1).to(item_seq.dtype)), dim=1)
        distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
        seq_output = self.forward(distinct[:, :-1], distinct[:, -1].to(item_seq_len.dtype))[inverse]
        return (seq_output * self.item_embedding(interaction[self.ITEM_ID])).sum(dim=1)

    def calculate_loss(self, interaction):
        """SASRec's loss; with the every-position targets in the batch, the mean CE over every real position."""
        if self.TARGET_SEQ not in interaction:
            return super().calculate_loss(interaction)
        self._check_every_position(self.causal, self.loss_type)
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        output = self.sequence_output(item_seq, item_seq_len)  # (B, L, hidden)
        real = torch.arange(item_seq.size(1), device=item_seq.device)[None, :] < item_seq_len[:, None]
        return chunked_cross_entropy(output[real], self.item_embedding.weight,
                                     interaction[self.TARGET_SEQ][real], self.loss_chunk_size)
