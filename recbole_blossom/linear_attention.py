"""LinRec's attention (Liu et al., SIGIR 2023) as its authors' public code computes it, and BlossomLinRec's.

Per head, with ``phi = elu`` and each query and each key L2-normalised over the feature dimension,

    LinRec(Q, K, V) = phi_n(Q) @ (phi_n(K)^T @ V) / sqrt(d),        phi_n(x) = phi(x) / ||phi(x)||_2

computed keys-times-values first, so no ``L x L`` tensor exists. Three forms live here:

* :func:`linrec_attention`: the published, bidirectional form (every query sees every real item). Unlike the
  public code, padded keys are zeroed before ``K^T V``, so padding never reaches the output.
* :func:`causal_linrec_attention`: query ``t`` sees keys ``<= t`` (prefix sums of ``k_s^T v_s``, in chunks);
  LinRec with ``linrec_causal: True``, which can train on every position.
* :class:`BlossomLinRecAttention`: the same weight ``phi_n(q_t) . phi_n(k_s) / sqrt(d)`` (no softmax) summed
  over Blossom's sparse key sets: LTIS (the selected blocks plus the query's own block, causal) and STIS
  (recent window, power-of-two offsets, sink), gated per head, with RoPE and grouped kv heads.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_blossom.attention import BlossomAttention
from recbole_blossom.hparams import BlossomRuntime
from recbole_blossom.ops import zero_padding_rows
from recbole_blossom.ops.naive import slot_keys, slot_mask


def check_heads(hidden_size, n_heads):
    """Raise ``ValueError`` naming the keys unless ``n_heads`` is a positive integer dividing ``hidden_size``."""
    for key, value in (("hidden_size", hidden_size), ("n_heads", n_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if hidden_size % n_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by n_heads ({n_heads})")


def normalized_features(x, eps=1e-6):
    """LinRec's feature map as published: ``elu(x)``, then L2-normalised over the last (feature) dimension."""
    return F.normalize(F.elu(x), p=2.0, dim=-1, eps=eps)


def real_positions(lengths, length, device):
    """``(B, L)`` bool, True at positions ``< lengths`` (items are left-aligned)."""
    return torch.arange(length, device=device)[None, :] < lengths[:, None]


def linrec_attention(q, k, v, lengths=None, key_dropout=None, eps=1e-6):
    """Published LinRec attention, bidirectional. ``q, k, v``: ``(B, H, L, D)``; lengths: ``(B,)`` or None.

    Padded keys (positions ``>= lengths``) are zeroed before ``K^T V``. Returns ``(B, H, L, D)``.
    """
    q, k = normalized_features(q, eps), normalized_features(k, eps)
    if lengths is not None:
        k = k * real_positions(lengths, k.shape[2], k.device)[:, None, :, None].to(k.dtype)
    if key_dropout is not None:
        k = key_dropout(k)
    kv = k.transpose(-1, -2) @ v  # (B, H, D, D): the only sequence reduction
    return (q @ kv) / math.sqrt(q.shape[-1])


def causal_linrec_attention(q, k, v, key_dropout=None, eps=1e-6, chunk_size=64):
    """LinRec attention where query ``t`` sees keys ``s <= t``. ``q, k, v``: ``(B, H, L, D)`` -> ``(B, H, L, D)``.

    Chunks of ``chunk_size`` positions: within a chunk the ``C x C`` weights are masked causally; earlier
    chunks enter through the running sum of ``k_s^T v_s`` (``D x D`` per chunk). Memory ``O(L (C + D^2 / C))``.
    Items are left-aligned, so padded keys come after every real query and need no mask.
    """
    q, k = normalized_features(q, eps), normalized_features(k, eps)
    if key_dropout is not None:
        k = key_dropout(k)
    B, H, L, D = q.shape
    n = -(-L // chunk_size)
    pad = n * chunk_size - L
    qc, kc, vc = (F.pad(x, (0, 0, 0, pad)).view(B, H, n, chunk_size, x.shape[-1]) for x in (q, k, v))
    kv = kc.transpose(-1, -2) @ vc  # (B, H, n, D, Dv)
    before = kv.cumsum(dim=2) - kv  # sum over the chunks strictly before each chunk
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    within = ((qc @ kc.transpose(-1, -2)) * causal) @ vc
    out = (qc @ before + within).view(B, H, n * chunk_size, -1)[:, :, :L]
    return out / math.sqrt(D)


class LinRecAttention(nn.Module):
    """LinRec's attention layer: ``forward(input_tensor (B, L, hidden), item_seq_len (B,)) -> (B, L, hidden)``.

    ``LayerNorm(dropout(dense(context)) + input_tensor)``, like RecBole's ``MultiHeadAttention``, whose
    parameter names it keeps. ``causal=False`` is the published (bidirectional) form, ``True`` the causal one.
    ``attn_dropout_prob`` drops entries of the normalised keys, the factor of the attention matrix that exists
    here (the matrix itself never does).
    """

    def __init__(self, n_heads, hidden_size, hidden_dropout_prob, attn_dropout_prob, layer_norm_eps, causal=False,
                 eps=1e-6):
        super().__init__()
        check_heads(hidden_size, n_heads)
        self.n_heads, self.head_dim, self.causal, self.eps = n_heads, hidden_size // n_heads, causal, eps
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = nn.Dropout(attn_dropout_prob)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.out_dropout = nn.Dropout(hidden_dropout_prob)

    def heads(self, x):
        """``(B, L, H * D)`` -> ``(B, H, L, D)``."""
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, input_tensor, item_seq_len=None):
        q, k, v = (self.heads(proj(input_tensor)) for proj in (self.query, self.key, self.value))
        if self.causal:
            context = causal_linrec_attention(q, k, v, self.attn_dropout, self.eps)
        else:
            context = linrec_attention(q, k, v, item_seq_len, self.attn_dropout, self.eps)
        hidden_states = self.out_dropout(self.dense(context.transpose(1, 2).flatten(2)))
        return self.LayerNorm(hidden_states + input_tensor)

    def extra_repr(self):
        return f"n_heads={self.n_heads}, causal={self.causal}"


def grouped(q, n_kv_heads):
    """``(B, H, L, D)`` -> ``(B, Hkv, G, L, D)``: the query heads that share each kv head."""
    B, H, L, D = q.shape
    return q.view(B, n_kv_heads, H // n_kv_heads, L, D)


def masked_linear_attention(q, k, v, allowed, scale, dropout_p=0.0, training=False):
    """Sum of ``(q_t . k_s) * scale * v_s`` over the keys ``allowed[t, s]``: the ``L x L`` form.

    q: ``(B, H, L, D)``; k, v: ``(B, Hkv, L, D)``; allowed: bool ``(L, L)`` or ``(B, Hkv, L, L)``.
    Returns ``(B, H, L, D)``.
    """
    if allowed.dim() == 4:
        allowed = allowed[:, :, None]  # shared by the query heads of a kv head
    qg = grouped(q, k.shape[1])
    weights = (qg @ k[:, :, None].transpose(-1, -2)) * scale * allowed.to(q.dtype)
    weights = F.dropout(weights, p=dropout_p, training=training)
    return (weights @ v[:, :, None]).flatten(1, 2)


def linear_slot_attention(q, k, v, idx, block, scale, dropout_p=0.0, training=False, dense_max_len=256):
    """Sum of ``(q_t . k_s) * scale * v_s`` over the keys that the slots of query ``t`` name, causally.

    q: ``(B, H, L, D)``; k, v: ``(B, Hkv, L, D)``; idx: int ``(B|1, Hkv|1, L, S)`` slot numbers or ``-1``;
    block: positions per slot. Up to ``dense_max_len`` the slots are applied as an ``L x L`` mask (fewer bytes
    there than gathering); above it the slot keys are gathered, memory ``O(L S block)``. Returns ``(B, H, L, D)``.
    """
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    idx = idx.expand(B, Hkv, L, idx.shape[-1])
    if L <= dense_max_len:
        return masked_linear_attention(q, k, v, slot_mask(idx, block, L), scale, dropout_p, training)
    index, valid = slot_keys(idx, block, L)  # (B, Hkv, L, M)
    b = torch.arange(B, device=k.device).view(B, 1, 1, 1)
    h = torch.arange(Hkv, device=k.device).view(1, Hkv, 1, 1)
    k_sel, v_sel = k[b, h, index], v[b, h, index]  # (B, Hkv, L, M, D)
    qg = grouped(q, Hkv).transpose(2, 3)  # (B, Hkv, L, G, D)
    weights = (qg @ k_sel.transpose(-1, -2)) * scale * valid[:, :, :, None].to(q.dtype)  # (B, Hkv, L, G, M)
    weights = F.dropout(weights, p=dropout_p, training=training)
    return (weights @ v_sel).transpose(2, 3).flatten(1, 2)


def check_blossom_linrec(hp, runtime):
    """Raise ``ValueError`` naming the key for a Blossom setting that BlossomLinRec does not have."""
    if runtime.blossom_impl == "fast":
        raise ValueError("blossom_impl: fast is not available for BlossomLinRec (it has only the PyTorch path); "
                         "use blossom_impl: auto or torch")
    if hp.ltis_trainable_compression:
        raise ValueError("ltis_trainable_compression: True is not available for BlossomLinRec; set it to False")
    if hp.ltis_score_pool == "head":
        raise ValueError("ltis_score_pool: head is not available for BlossomLinRec; use logits or probs")


class BlossomLinRecAttention(BlossomAttention):
    """LinRec's weights inside Blossom's sparse patterns: ``BlossomAttention``'s layer with another weight rule.

    ``forward(input_tensor (B, L, hidden), item_seq_len (B,)) -> (B, L, hidden)``:
    ``LayerNorm(dropout(W_o [g_ltis * LTIS + g_stis * STIS]) + input_tensor)`` where both branches sum
    ``phi_n(q_t) . phi_n(k_s) / sqrt(d) * v_s`` over their key sets (no softmax), with ``phi_n`` LinRec's
    normalised ELU features and RoPE applied after it (a rotation keeps the unit norms). LTIS keys: the blocks
    ``BlossomAttention``'s LTIS selects (``LTIS.select``: its frozen compression, scoring options and
    selection rule) plus the query's own block, causally; STIS keys: ``recbole_blossom.stis.stis_slots``.
    Padded query rows are zero. The parameters are ``BlossomAttention``'s.

    PyTorch only (no fused kernels): ``blossom_impl`` must be ``auto`` or ``torch``. Up to ``dense_max_len``
    the key sets are applied as ``L x L`` masks, above it gathered (memory linear in ``L``).
    """

    dense_max_len = 256

    def __init__(self, hp, runtime=None):
        runtime = BlossomRuntime() if runtime is None else runtime
        check_blossom_linrec(hp, runtime)
        super().__init__(hp, runtime)

    def ltis_slots(self, q_raw, k_raw):
        """``(B, Hkv, L, n_slc_blocks + 1)`` selected blocks, chosen exactly as ``BlossomAttention`` chooses them
        (rotated projections when ``ltis_score_rope``, the default)."""
        q_score, k_score = self.rotary(q_raw, k_raw) if self.hp.ltis_score_rope else (q_raw, k_raw)
        return self.ltis.select(q_score, k_score)

    def forward(self, input_tensor, item_seq_len=None):
        hp = self.hp
        q_raw = self.heads(self.query(input_tensor))
        k_raw = self.heads(self.key(input_tensor))
        v = self.heads(self.value(input_tensor))
        q, k = self.rotary(normalized_features(q_raw), normalized_features(k_raw))
        L, scale, p = q.shape[2], 1.0 / math.sqrt(hp.head_dim), hp.attn_dropout_prob
        if self.ltis.selects_all(L):  # every query keeps all of its past blocks: LTIS is causal over every key
            causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
            ltis = masked_linear_attention(q, k, v, causal, scale, p, self.training)
        else:
            ltis = linear_slot_attention(q, k, v, self.ltis_slots(q_raw, k_raw), hp.slc_block_size, scale, p,
                                         self.training, self.dense_max_len)
        stis = linear_slot_attention(q, k, v, self.stis.slots(L, q.device), 1, scale, p, self.training,
                                     self.dense_max_len)
        ltis, stis = (zero_padding_rows(x, item_seq_len) for x in (ltis, stis))  # padded query rows: 0
        hidden_states = self.out_dropout(self.dense(self.gate(input_tensor, ltis, stis)))
        return self.LayerNorm(hidden_states + input_tensor)
