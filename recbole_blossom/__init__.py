"""recbole-blossom: BlossomRec sparse attention for RecBole sequential recommenders.

Importing the package applies the compatibility shims that RecBole 1.2.1 needs on today's stack
(see :mod:`recbole_blossom.compat`).
"""

from recbole_blossom import compat

compat.apply()

from recbole_blossom.attention import BlossomAttention  # noqa: E402
from recbole_blossom.hparams import BlossomHParams, BlossomRuntime  # noqa: E402
from recbole_blossom.checkpoint import CheckpointError  # noqa: E402
from recbole_blossom.checks import DatasetFormatError  # noqa: E402
from recbole_blossom.config import BlossomConfig, available_models, get_model_class  # noqa: E402
from recbole_blossom.model import MODELS, BlossomLinRec, BlossomSASRec, LinRec, SASRecSDPA  # noqa: E402
from recbole_blossom.quick_start import (  # noqa: E402
    DatasetNotFoundError,
    load_data_and_model,
    objective_function,
    run,
    run_recbole,
)

__version__ = "0.1.0"
__all__ = [
    "BlossomAttention", "BlossomHParams", "BlossomRuntime", "BlossomConfig", "BlossomSASRec", "MODELS", "DatasetNotFoundError",
    "BlossomLinRec", "LinRec", "SASRecSDPA", "CheckpointError", "DatasetFormatError",
    "available_models", "get_model_class", "load_data_and_model", "objective_function", "run", "run_recbole",
]
