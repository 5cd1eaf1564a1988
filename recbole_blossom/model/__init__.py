"""Plugin models, by name."""

from recbole_blossom.model.blossom_linrec import BlossomLinRec
from recbole_blossom.model.blossom_sasrec import BlossomSASRec
from recbole_blossom.model.linrec import LinRec

MODELS = {cls.__name__: cls for cls in (BlossomSASRec, LinRec, BlossomLinRec)}
