"""Plugin models, by name."""

from recbole_blossom.model.blossom_sasrec import BlossomSASRec

MODELS = {cls.__name__: cls for cls in (BlossomSASRec,)}
