"""Compatibility shims that let RecBole 1.2.1 run on today's stack.

Applied once, when ``recbole_blossom`` is imported. Each shim fixes one breakage and is covered by a
test in ``tests/test_compat.py``:

* ``numpy_aliases``: RecBole's ``Config.compatibility_settings`` reads ``np.float_``, ``np.complex_``
  and ``np.unicode_``, which numpy 2 removed.
* ``pandas_seq_fillna``: under pandas 3 (copy-on-write) RecBole's chained
  ``df[field].fillna(..., inplace=True)`` does nothing, so missing sequence fields crash the loader and
  missing token / float features stay NaN. Sequence columns are filled when the atomic file is read, and
  ``Dataset._fill_nan`` is replaced by an assignment-based version. Also under pandas 3, ``Series.agg(len)``
  reduces the whole column instead of measuring each sequence, which breaks every ``token_seq`` /
  ``float_seq`` feature; the RecBole dataset methods that call it get pandas 2's element-wise meaning.
* ``writable_tensors``: under pandas 3 a column's ``.values`` is a read-only view; RecBole's dataset turns it
  into a tensor that shares the read-only memory (torch warns, on every run, that writing to it is undefined
  behaviour). RecBole's dataset module gets ``LongTensor`` / ``FloatTensor`` that copy read-only arrays.
* ``amp_without_deprecation``: RecBole's trainer builds ``torch.cuda.amp.GradScaler`` / ``autocast``, which
  torch deprecated (a ``FutureWarning`` on every run); it gets ``torch.amp``'s, for CUDA, as before.
* ``concurrent_ensure_dir``: the processes of a multi-process run race to create the same folders with
  RecBole's check-then-create ``ensure_dir``; the loser died with ``FileExistsError``.
* ``no_global_anomaly_mode``: importing RecBole's sequential models (``sine.py``) switches on autograd
  anomaly detection for the whole process, which makes every backward pass check for NaN (about 2x
  slower training). The user's own setting is restored.
* ``hyper_tuning_numpy2``: RecBole's ``HyperTuning`` default algorithm (exhaustive search) seeds a legacy
  ``np.random.RandomState``, from which hyperopt >= 0.2.7 cannot draw (``rng.integers``), and its plot
  reads ``np.str`` (gone since numpy 1.24). Its module sees a numpy whose ``random.RandomState`` makes a
  ``Generator`` and whose ``str`` is ``str``; everything else is numpy itself.

Ray is not needed: the plugin never imports ``recbole.quick_start`` (which imports ray) and provides
``run``, ``objective_function`` and ``load_data_and_model`` itself.
"""

import functools
import inspect
import os
import sys
import types

import numpy as np
import pandas as pd
import recbole.data.dataset.dataset as dataset_module
import recbole.trainer.hyper_tuning as hyper_tuning_module
import recbole.trainer.trainer as trainer_module
import recbole.utils.utils as utils_module
import torch
from recbole.data.dataset import KnowledgeBasedDataset
from recbole.utils import FeatureType

_APPLIED = False

_NUMPY_ALIASES = {
    "float_": np.float64,
    "complex_": np.complex128,
    "unicode_": np.str_,
    "bool8": np.bool_,
}


def numpy_aliases():
    """Restore the numpy 1 aliases RecBole 1.2.1 reads (removed in numpy 2)."""
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


def _read_csv_filling_seq(*args, **kwargs):
    """``pd.read_csv`` that fills empty ``*:token_seq`` / ``*:float_seq`` cells with ``""``."""
    df = pd.read_csv(*args, **kwargs)
    for column in df.columns:
        if str(column).endswith((":token_seq", ":float_seq")) and df[column].isna().any():
            df[column] = df[column].fillna("")
    return df


def _fill_nan(self):
    """RecBole's ``Dataset._fill_nan`` written with assignments, so it works under copy-on-write."""
    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x
                )


def _elementwise_len_agg(method):
    """Run ``method`` with ``Series.agg(len)`` meaning per-element lengths (pandas 2 behaviour)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        original = pd.Series.agg

        def agg(self, func=None, *a, **k):
            return self.map(len) if func is len else original(self, func, *a, **k)

        pd.Series.agg = agg
        try:
            return method(*args, **kwargs)
        finally:
            pd.Series.agg = original

    return wrapper


def pandas_seq_fillna():
    """Make RecBole's NaN handling effective under pandas copy-on-write (pandas 3)."""
    proxy = types.ModuleType("pandas_seq_fillna_proxy")
    proxy.__dict__.update({k: getattr(pd, k) for k in dir(pd) if not k.startswith("__")})
    proxy.read_csv = _read_csv_filling_seq
    dataset_module.pd = proxy
    dataset_module.Dataset._fill_nan = _fill_nan
    for cls in (dataset_module.Dataset, KnowledgeBasedDataset):
        for name, method in list(vars(cls).items()):
            if callable(method) and "agg(len)" in inspect.getsource(method):
                setattr(cls, name, _elementwise_len_agg(method))


def no_global_anomaly_mode():
    """Import RecBole's models without leaving autograd anomaly detection switched on.

    If RecBole's models were imported before the plugin, the switch RecBole made cannot be told apart from
    the user's and anomaly detection is switched off.
    """
    before = False if "recbole.model.sequential_recommender.sine" in sys.modules else torch.is_anomaly_enabled()
    # Imported here, not at the top: the user's setting must be read before sine.py changes it.
    import recbole.model.sequential_recommender  # noqa: F401  (sine.py calls set_detect_anomaly(True))

    torch.autograd.set_detect_anomaly(before)


class _NumpyForHyperTuning(types.ModuleType):
    """numpy as ``recbole.trainer.hyper_tuning`` sees it (see ``hyper_tuning_numpy2``)."""

    def __init__(self):
        super().__init__("numpy")
        self.random = types.ModuleType("numpy.random")
        self.random.__dict__.update(np.random.__dict__)
        self.random.RandomState = np.random.default_rng  # the Generator hyperopt draws from
        self.str = str

    def __getattr__(self, name):
        return getattr(np, name)


def hyper_tuning_numpy2():
    """Let RecBole's ``HyperTuning`` (exhaustive search, ``plot_hyper``) run on numpy 2 and hyperopt 0.3."""
    hyper_tuning_module.np = _NumpyForHyperTuning()


def _ensure_dir(dir_path):
    """RecBole's ``ensure_dir`` without its check-then-create race (``makedirs(exist_ok=True)``)."""
    os.makedirs(dir_path, exist_ok=True)


def concurrent_ensure_dir():
    """Several processes of one run (``--nproc``) create the same checkpoint and log folders at once;
    RecBole's ``ensure_dir`` checks, then creates, so the slower process dies with ``FileExistsError``.
    Every RecBole module that imported it gets the race-free version."""
    original = utils_module.ensure_dir
    for name, module in list(sys.modules.items()):
        if name.startswith("recbole.") and getattr(module, "ensure_dir", None) is original:
            module.ensure_dir = _ensure_dir


def _writable(value):
    return np.array(value) if isinstance(value, np.ndarray) and not value.flags.writeable else value


class _TorchCopyingReadOnly(types.ModuleType):
    """``torch`` as RecBole's dataset module sees it: ``LongTensor`` / ``FloatTensor`` copy read-only arrays."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def LongTensor(*args):  # noqa: N802  (torch's name)
        return torch.LongTensor(*map(_writable, args))

    @staticmethod
    def FloatTensor(*args):  # noqa: N802  (torch's name)
        return torch.FloatTensor(*map(_writable, args))


def writable_tensors():
    """Tensors of RecBole's dataset own their memory (pandas 3 hands out read-only arrays)."""
    dataset_module.torch = _TorchCopyingReadOnly("torch")


class _CudaAmp(types.ModuleType):
    """``torch.cuda.amp`` as RecBole's trainer sees it: ``GradScaler`` / ``autocast`` from ``torch.amp``."""

    GradScaler = staticmethod(functools.partial(torch.amp.GradScaler, "cuda"))
    autocast = staticmethod(functools.partial(torch.amp.autocast, "cuda"))

    def __getattr__(self, name):
        return getattr(torch.cuda.amp, name)


def amp_without_deprecation():
    """RecBole's trainer uses the non-deprecated ``torch.amp`` API (same behaviour, no FutureWarning)."""
    trainer_module.amp = _CudaAmp("torch.cuda.amp")


def apply():
    """Apply every shim once (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    numpy_aliases()
    no_global_anomaly_mode()
    pandas_seq_fillna()
    writable_tensors()
    amp_without_deprecation()
    concurrent_ensure_dir()
    hyper_tuning_numpy2()
    _APPLIED = True
