"""LinRec: RecBole's SASRec with LinRec's L2-normalised linear attention, as the authors' code computes it.

Liu et al., "LinRec: Linear Attention Mechanism for Long-term Sequential Recommender Systems", SIGIR 2023.
The attention functions are in :mod:`recbole_blossom.linear_attention`; choices in ``docs/models.md``.
"""

from recbole_blossom.linear_attention import LinRecAttention, check_heads
from recbole_blossom.model.base import AttentionSASRec, setting


def linrec_causal(config):
    """The ``linrec_causal`` key (default False); ValueError naming it unless it is true or false."""
    value = setting(config, "linrec_causal", False)
    if not isinstance(value, bool):
        raise ValueError(f"linrec_causal must be true or false, got {value!r}")
    return value


class LinRec(AttentionSASRec):
    r"""SASRec whose self-attention is LinRec's linear attention.

    Item and position embeddings, feed-forward layers, CE/BPR loss and prediction are SASRec's. The attention
    is bidirectional over the user's items (the published form; the target is never in ``item_seq`` and only
    the last item's output is scored, so nothing leaks), or causal with ``linrec_causal: True``, which is what
    ``seq_train_mode: every_position`` needs.
    """

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        check_heads(config["hidden_size"], config["n_heads"])
        linrec_causal(config)

    @classmethod
    def every_position_supported(cls, config):
        return linrec_causal(config)

    @classmethod
    def every_position_refusal(cls):
        return (f"seq_train_mode: every_position needs a causal model; {cls.__name__} is bidirectional unless "
                f"linrec_causal: True. Set linrec_causal: True or use seq_train_mode: per_prefix")

    def build_attention(self, config):
        return LinRecAttention(self.n_heads, self.hidden_size, self.hidden_dropout_prob, self.attn_dropout_prob,
                               self.layer_norm_eps, causal=linrec_causal(config))
