"""Plugin models, by name."""

from recbole_blossom.model.base import AttentionSASRec, target_list_field
from recbole_blossom.model.blossom_linrec import BlossomLinRec
from recbole_blossom.model.blossom_sasrec import BlossomSASRec
from recbole_blossom.model.linrec import LinRec
from recbole_blossom.model.sasrec_sdpa import SASRecSDPA

MODELS = {cls.__name__: cls for cls in (BlossomSASRec, LinRec, BlossomLinRec, SASRecSDPA)}

__all__ = ["AttentionSASRec", "BlossomLinRec", "BlossomSASRec", "LinRec", "MODELS", "SASRecSDPA",
           "target_list_field"]
