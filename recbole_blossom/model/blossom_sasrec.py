"""BlossomSASRec: RecBole's SASRec with BlossomRec attention."""

from recbole_blossom.attention import BlossomAttention
from recbole_blossom.hparams import BlossomHParams, BlossomRuntime
from recbole_blossom.model.base import AttentionSASRec


class BlossomSASRec(AttentionSASRec):
    r"""SASRec whose self-attention is BlossomRec's (LTIS + STIS + gate, RoPE, grouped kv heads).

    Everything else is SASRec's: item embedding, feed-forward layers, loss and prediction. Positions come
    from RoPE inside the attention, so the absolute position embedding is dropped. The attention is causal,
    so the model can train on every position (``seq_train_mode: every_position``).
    """

    use_position_embedding = False
    supports_every_position = True

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        BlossomHParams.from_config(config)
        BlossomRuntime.from_config(config)

    def build_attention(self, config):
        return BlossomAttention(BlossomHParams.from_config(config), BlossomRuntime.from_config(config))
