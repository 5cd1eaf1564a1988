"""Blossom attention: the gated sum of LTIS and STIS, a drop-in for RecBole's ``MultiHeadAttention``."""

import torch
import torch.nn.functional as F
from torch import nn

from recbole_blossom.hparams import BlossomHParams, BlossomRuntime
from recbole_blossom.ltis import LTIS
from recbole_blossom.ops import branch_attention, gate_combine
from recbole_blossom.rotary import RotaryEmbedding
from recbole_blossom.stis import STIS


class BranchGate(nn.Module):
    """``sigmoid(Linear(x))``, one weight per head per branch, applied to the branches:
    ``forward(x (B, L, hidden), ltis, stis (B, H, L, D)) -> g_ltis * ltis + g_stis * stis`` as ``(B, L, H * D)``
    (:func:`recbole_blossom.ops.gate_combine`, one kernel each way on the GPU)."""

    def __init__(self, hidden_size, n_heads, bias_ltis=-2.0, bias_stis=2.0, impl="auto"):
        super().__init__()
        self.n_heads, self.bias_ltis, self.bias_stis, self.impl = n_heads, bias_ltis, bias_stis, impl
        self.proj = nn.Linear(hidden_size, 2 * n_heads)

    def reset_parameters(self):
        with torch.no_grad():
            self.proj.bias[: self.n_heads].fill_(self.bias_ltis)
            self.proj.bias[self.n_heads:].fill_(self.bias_stis)

    def forward(self, x, ltis, stis):
        return self.combine(self.proj(x), ltis, stis)

    def combine(self, logits, ltis, stis):
        """The gated sum from the projection's output ``logits (B, L, 2H)`` (computed elsewhere, e.g. in one
        matrix product with q, k and v)."""
        return gate_combine(logits, ltis, stis, impl=self.impl)


class BlossomAttention(nn.Module):
    """BlossomRec attention layer with RecBole's ``MultiHeadAttention`` interface.

    ``forward(input_tensor, item_seq_len)``: ``(B, L, hidden)`` and ``(B,)`` -> ``(B, L, hidden)``, i.e.
    ``LayerNorm(dropout(W_o [g1 * LTIS + g2 * STIS]) + input_tensor)``. Items are left-aligned (RecBole's
    layout); attention is causal, so no ``L x L`` mask is needed.
    """

    def __init__(self, hp: BlossomHParams, runtime: BlossomRuntime = None):
        super().__init__()
        runtime = BlossomRuntime() if runtime is None else runtime
        self.hp, self.runtime = hp, runtime
        H, Hkv, D = hp.n_heads, hp.n_kv_heads, hp.head_dim
        self.query = nn.Linear(hp.hidden_size, H * D)
        self.key = nn.Linear(hp.hidden_size, Hkv * D)
        self.value = nn.Linear(hp.hidden_size, Hkv * D)
        self.rotary = RotaryEmbedding(D, hp.rope_base, impl=runtime.blossom_impl, enabled=hp.use_rope)
        pool = "logits" if hp.ltis_score_pool == "head" else hp.ltis_score_pool  # head: one query head a kv head
        self.ltis = LTIS(D, hp.attention_kv_heads, block_len=hp.cmp_block_len, stride=hp.cmp_stride,
                         select_size=hp.slc_block_size, n_select=hp.n_slc_blocks, dropout_p=hp.attn_dropout_prob,
                         chunk_size=runtime.ltis_chunk_size, impl=runtime.blossom_impl,
                         trainable_compression=hp.ltis_trainable_compression, score_pool=pool,
                         compression=hp.ltis_compression)
        self.stis = STIS(window=hp.stis_window, sink=hp.stis_sink, dropout_p=hp.attn_dropout_prob,
                         impl=runtime.blossom_impl)
        self.gate = BranchGate(hp.hidden_size, H, hp.gate_bias_ltis, hp.gate_bias_stis, impl=runtime.blossom_impl)
        self.dense = nn.Linear(H * D, hp.hidden_size)
        self.LayerNorm = nn.LayerNorm(hp.hidden_size, eps=hp.layer_norm_eps)
        self.out_dropout = nn.Dropout(hp.hidden_dropout_prob)

    def reset_parameters(self, initializer_range=0.02):
        """Initialise what RecBole's ``_init_weights`` does not know about (gate biases, LTIS extras)."""
        self.gate.reset_parameters()
        self.ltis.reset_parameters(initializer_range)

    def heads(self, x):
        """``(B, L, H * D)`` -> ``(B, H, L, D)``."""
        B, L, _ = x.shape
        return x.view(B, L, -1, self.hp.head_dim).transpose(1, 2)

    def project(self, x):
        """``q (B, H, L, D)``, ``k, v (B, Hkv, L, D)`` and the gate logits ``(B, L, 2H)``: the four projections of
        the layer's input as one matrix product (fewer launches forward and backward, and one gradient of ``x``
        instead of four to sum; the parameters stay the ``nn.Linear`` modules of the state dict)."""
        layers = (self.query, self.key, self.value, self.gate.proj)
        out = F.linear(x, torch.cat([m.weight for m in layers]), torch.cat([m.bias for m in layers]))
        q, k, v, logits = out.split([m.out_features for m in layers], dim=-1)
        return self.heads(q), self.heads(k), self.heads(v), logits

    def repeat_kv(self, *tensors):
        """``(B, Hkv, L, D)`` -> ``(B, H, L, D)``, each kv head repeated for its query heads, where each query head
        picks its own blocks (``ltis_score_pool: head``); otherwise the tensors unchanged. Both branches then read
        the same keys and values as before, through a kv head per query head (autograd sums the copies)."""
        if self.hp.attention_kv_heads == self.hp.n_kv_heads:
            return tensors
        return tuple(t.repeat_interleave(self.hp.n_heads // self.hp.n_kv_heads, dim=1) for t in tensors)

    def forward(self, input_tensor, item_seq_len=None):
        q, k, v, logits = self.project(input_tensor)
        q_rot, k_rot = self.rotary(q, k)
        k_rot, v = self.repeat_kv(k_rot, v)
        q_score, k_score = (q_rot, k_rot) if self.hp.ltis_score_rope else (q, self.repeat_kv(k)[0])
        if self.ltis.trainable_compression:  # LTIS adds its compressed branch: the branches one by one
            ltis = self.ltis(q_rot, k_rot, v, item_seq_len, q_score=q_score, k_score=k_score)
            context = self.gate.combine(logits, ltis, self.stis(q_rot, k_rot, v, item_seq_len))
        else:  # what LTIS.forward, STIS.forward and the gate compute, as one op (one autograd node on the GPU)
            idx = self.ltis.selected_blocks(q_score, k_score)  # None: LTIS is causal attention
            context = branch_attention(q_rot, k_rot, v, idx, self.ltis.select_size, self.stis.window, self.stis.sink,
                                       logits, item_seq_len, self.hp.attn_dropout_prob,
                                       self.training, impl=self.runtime.blossom_impl)  # (B, L, H * D)
        hidden_states = self.out_dropout(self.dense(context))
        return self.LayerNorm(hidden_states + input_tensor)
