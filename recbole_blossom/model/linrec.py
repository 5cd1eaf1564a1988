"""LinRec: RecBole's SASRec with LinRec's L2-normalised linear attention.

Written from the paper's description (Liu et al., "LinRec: Linear Attention Mechanism for Long-term
Sequential Recommender Systems", SIGIR 2023): the softmax of dot-product attention is replaced by

    LinRec(Q, K, V) = rho_row(phi(Q)) @ (rho_col(phi(K))^T @ V)

where ``phi(x) = elu(x) + 1`` is the ELU-based feature map, ``rho_row`` L2-normalises each row of ``Q``
(each query over the feature dimension) and ``rho_col`` L2-normalises each column of ``K`` (each feature
over the sequence). Computing ``K^T V`` first costs ``O(L d^2)`` time and ``O(d^2)`` memory per head, so
no ``L x L`` tensor ever exists. Choices this implementation makes are documented in ``docs/models.md``.
"""

import torch
import torch.nn.functional as F
from recbole.model.sequential_recommender import SASRec
from torch import nn


def feature_map(x):
    """LinRec's ELU-based feature map, ``elu(x) + 1`` (positive, so attention weights are non-negative)."""
    return F.elu(x) + 1.0


def check_heads(hidden_size, n_heads):
    """Raise ``ValueError`` naming the keys unless ``n_heads`` is a positive integer dividing ``hidden_size``."""
    for key, value in (("hidden_size", hidden_size), ("n_heads", n_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if hidden_size % n_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by n_heads ({n_heads})")


def linrec_attention(q, k, v, padding_mask=None, key_dropout=None, eps=1e-6):
    """LinRec attention, keys-times-values first.

    ``q``, ``k``, ``v``: ``(B, H, L, D)``; ``padding_mask``: ``(B, L)`` bool, True at real items. Padded
    keys are zeroed before the column norms and before ``K^T V``, so padding never reaches the sums.
    Returns ``(B, H, L, D)``.
    """
    q = F.normalize(feature_map(q), p=2.0, dim=-1, eps=eps)  # rho_row: each query has unit norm
    k = feature_map(k)
    if padding_mask is not None:
        k = k * padding_mask[:, None, :, None].to(k.dtype)
    k = F.normalize(k, p=2.0, dim=-2, eps=eps)  # rho_col: each key feature has unit norm over the items
    if key_dropout is not None:
        k = key_dropout(k)
    kv = k.transpose(-1, -2) @ v  # (B, H, D, D): the only sequence reduction
    return q @ kv


class LinRecAttention(nn.Module):
    """LinRec's attention layer with RecBole's ``MultiHeadAttention`` interface.

    ``forward(input_tensor, padding_mask)``: ``(B, L, hidden)`` and ``(B, L)`` bool (True at items) ->
    ``LayerNorm(dropout(dense(context)) + input_tensor)``. ``attn_dropout_prob`` drops entries of the
    normalised keys, the factor of the attention matrix that exists here (the matrix itself never does).
    """

    def __init__(self, n_heads, hidden_size, hidden_dropout_prob, attn_dropout_prob, layer_norm_eps, eps=1e-6):
        super().__init__()
        check_heads(hidden_size, n_heads)
        self.n_heads, self.head_dim, self.eps = n_heads, hidden_size // n_heads, eps
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

    def forward(self, input_tensor, padding_mask=None):
        q, k, v = (self.heads(proj(input_tensor)) for proj in (self.query, self.key, self.value))
        context = linrec_attention(q, k, v, padding_mask, self.attn_dropout, self.eps)
        hidden_states = self.out_dropout(self.dense(context.transpose(1, 2).flatten(2)))
        return self.LayerNorm(hidden_states + input_tensor)


class LinRec(SASRec):
    r"""SASRec whose self-attention is LinRec's linear attention.

    Item and position embeddings, feed-forward layers, CE/BPR loss and prediction are SASRec's. The encoder
    gets the ``(B, L)`` padding mask instead of SASRec's ``L x L`` mask; the attention is bidirectional over
    the user's items (the paper's form), which leaks nothing: the target item is never in ``item_seq`` and
    only the last item's output is scored.
    """

    def __init__(self, config, dataset):
        check_heads(config["hidden_size"], config["n_heads"])
        super().__init__(config, dataset)
        for layer in self.trm_encoder.layer:
            layer.multi_head_attention = LinRecAttention(
                self.n_heads, self.hidden_size, self.hidden_dropout_prob, self.attn_dropout_prob,
                self.layer_norm_eps,
            )
            layer.multi_head_attention.apply(self._init_weights)

    def attention_input(self, item_seq, item_seq_len):
        """What each attention layer gets besides the hidden states: here the ``(B, L)`` padding mask."""
        return item_seq != 0

    def forward(self, item_seq, item_seq_len):
        positions = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0)
        input_emb = self.item_embedding(item_seq) + self.position_embedding(positions)
        input_emb = self.dropout(self.LayerNorm(input_emb))
        trm_output = self.trm_encoder(input_emb, self.attention_input(item_seq, item_seq_len),
                                      output_all_encoded_layers=False)
        return self.gather_indexes(trm_output[-1], item_seq_len - 1)  # [B H]
