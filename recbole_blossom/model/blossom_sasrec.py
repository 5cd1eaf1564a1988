"""BlossomSASRec: RecBole's SASRec with BlossomRec attention."""

from recbole.model.sequential_recommender import SASRec

from recbole_blossom.attention import BlossomAttention
from recbole_blossom.hparams import BlossomHParams, BlossomRuntime


class BlossomSASRec(SASRec):
    r"""SASRec whose self-attention is BlossomRec's (LTIS + STIS + gate, RoPE, grouped kv heads).

    Everything else is SASRec's: item embedding, feed-forward layers, loss and prediction. Positions come
    from RoPE inside the attention, so the absolute position embedding is dropped, and since the attention
    is causal over left-aligned items no ``L x L`` mask is built: the encoder gets the sequence lengths.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.blossom = BlossomHParams.from_config(config)
        self.blossom_runtime = BlossomRuntime.from_config(config)
        del self.position_embedding
        for layer in self.trm_encoder.layer:
            layer.multi_head_attention = BlossomAttention(self.blossom, self.blossom_runtime)
            layer.multi_head_attention.apply(self._init_weights)
            layer.multi_head_attention.reset_parameters(self.initializer_range)

    def forward(self, item_seq, item_seq_len):
        input_emb = self.dropout(self.LayerNorm(self.item_embedding(item_seq)))
        trm_output = self.trm_encoder(input_emb, item_seq_len, output_all_encoded_layers=False)
        return self.gather_indexes(trm_output[-1], item_seq_len - 1)  # [B H]
