"""SASRecSDPA: RecBole's SASRec computed with PyTorch's fused attention."""

import torch.nn.functional as F
from recbole.model.layers import MultiHeadAttention

from recbole_blossom.model.base import AttentionSASRec


class SDPAAttention(MultiHeadAttention):
    """RecBole's ``MultiHeadAttention`` (same parameters) computed by causal ``F.scaled_dot_product_attention``.

    ``forward(input_tensor (B, L, hidden), item_seq_len (B,)) -> (B, L, hidden)``. Items are left-aligned, so
    every padded key comes after every real query and the causal rule alone hides padding from real
    positions: no mask is built. Padded query rows see real and padded keys (finite, never used).
    """

    def forward(self, input_tensor, item_seq_len=None):
        B, L, _ = input_tensor.shape
        q, k, v = (proj(input_tensor).view(B, L, self.num_attention_heads, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        p = self.attn_dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        hidden_states = self.out_dropout(self.dense(context.transpose(1, 2).reshape(B, L, -1)))
        return self.LayerNorm(hidden_states + input_tensor)


class SASRecSDPA(AttentionSASRec):
    r"""The same function as RecBole's SASRec (same parameters, same outputs), with fused causal attention.

    RecBole's SASRec builds an ``L x L`` mask per batch and a materialised softmax; this model gives the same
    outputs at every real position from ``scaled_dot_product_attention(is_causal=True)``. A ``SASRec``
    checkpoint's state dict loads into it unchanged. Causal: it can train on every position.
    """

    supports_every_position = True

    def build_attention(self, config):
        return SDPAAttention(self.n_heads, self.hidden_size, self.hidden_dropout_prob, self.attn_dropout_prob,
                             self.layer_norm_eps)
