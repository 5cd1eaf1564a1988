"""BlossomLinRec: LinRec's normalised linear attention inside BlossomRec's sparse patterns."""

from recbole_blossom.hparams import BlossomHParams, BlossomRuntime
from recbole_blossom.linear_attention import BlossomLinRecAttention, check_blossom_linrec
from recbole_blossom.model.base import AttentionSASRec


class BlossomLinRec(AttentionSASRec):
    r"""LinRec's model (SASRec layout, learned absolute position embedding) with BlossomLinRec attention.

    Each query sums LinRec's weights ``elu_n(q) . elu_n(k) / sqrt(d)`` (no softmax) over Blossom's sparse key
    sets, LTIS (selected blocks + own block) and STIS, gated per head, with RoPE and grouped kv heads: see
    :class:`recbole_blossom.linear_attention.BlossomLinRecAttention` and ``docs/models.md``. Causal, so it can
    train on every position.
    """

    supports_every_position = True

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        check_blossom_linrec(BlossomHParams.from_config(config), BlossomRuntime.from_config(config))

    def build_attention(self, config):
        return BlossomLinRecAttention(BlossomHParams.from_config(config), BlossomRuntime.from_config(config))
