"""BlossomLinRec: LinRec with its attention layers replaced by BlossomRec's attention."""

from recbole_blossom.attention import BlossomAttention
from recbole_blossom.hparams import BlossomHParams, BlossomRuntime
from recbole_blossom.model.linrec import LinRec


class BlossomLinRec(LinRec):
    r"""LinRec's model (SASRec layout, learned absolute position embedding) with Blossom attention layers.

    The BlossomRec paper reports BlossomRec integrated into LinRec without a construction that can be
    rebuilt from its text, so this is the issue's fallback: LinRec's model whose linear attention layers are
    replaced by Blossom attention (LTIS + STIS + gate, RoPE, grouped kv heads). Unlike ``BlossomSASRec`` it
    keeps LinRec's absolute position embedding next to RoPE; see ``docs/models.md``. The attention is causal
    over left-aligned items, so the encoder gets the sequence lengths and no ``L x L`` mask is built.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.blossom = BlossomHParams.from_config(config)
        self.blossom_runtime = BlossomRuntime.from_config(config)
        for layer in self.trm_encoder.layer:
            attention = BlossomAttention(self.blossom, self.blossom_runtime)
            attention.apply(self._init_weights)
            attention.reset_parameters(self.initializer_range)
            layer.multi_head_attention = attention

    def attention_input(self, item_seq, item_seq_len):
        return item_seq_len
