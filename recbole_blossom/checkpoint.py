"""Safe loading of RecBole checkpoints on torch >= 2.6.

A RecBole checkpoint is a ``torch.save`` of a dict that holds tensors, the optimizer state, a numpy scalar
(``best_valid_score``) and RecBole's ``Config``, which in turn pickles the model class, ``yaml.FullLoader``,
RecBole's enums and a ``torch.device``. torch >= 2.6 loads with ``weights_only=True``, which refuses every
type that is not allow-listed. :func:`load` keeps ``weights_only=True`` and allows exactly:

* the fixed types of :func:`static_safe_globals` (RecBole's ``Config``, the plugin's ``BlossomConfig``,
  ``yaml.FullLoader``, RecBole's enums, what numpy scalars need), and
* model classes named in the checkpoint, but only when the name resolves to a plugin model or to a subclass
  of RecBole's ``AbstractRecommender`` defined in ``recbole.model.*`` (:func:`resolve_model_class`).

Any other global in the file is refused before unpickling starts (:class:`CheckpointError` names the file
and the type). Unreadable files and checkpoints of another model get a :class:`CheckpointError` too.

RecBole's trainer saves with ``pickle_protocol=4``, whose opcodes torch's ``weights_only`` unpickler does not
read. The plugin's trainer shim saves with protocol 2 instead; checkpoints written by stock RecBole are
re-encoded to protocol 2 in memory by :func:`protocol2_pickle` (an opcode-for-opcode translation, no
unpickling), then loaded by torch's ``weights_only`` unpickler like any other.

:func:`install` routes RecBole's trainer through this module: its ``torch.load`` is :func:`load_checked`
(``Trainer.resume_checkpoint`` and ``Trainer.evaluate`` refuse a checkpoint of another model), its
``torch.save`` is :func:`save`.
"""

import contextlib
import contextvars
import enum
import functools
import importlib
import io
import os
import pickle
import pickletools
import struct
import types
import zipfile
import zlib

import numpy as np
import recbole.trainer.trainer as trainer_module
import torch
import yaml
from recbole.config import Config
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.utils import enum_type
from torch._weights_only_unpickler import _get_allowed_globals

from recbole_blossom.checks import InputError
from recbole_blossom.config import BlossomConfig


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded safely: unreadable, holding a disallowed type, or of another model."""


# ---------------------------------------------------------------------------------------------- allow-list


def static_safe_globals():
    """The fixed types a RecBole checkpoint pickles besides tensors and builtins.

    Model classes are allowed per checkpoint, by :func:`resolve_model_class`.
    """
    enums = [
        obj
        for obj in vars(enum_type).values()
        if isinstance(obj, type) and issubclass(obj, enum.Enum) and obj.__module__ == enum_type.__name__
    ]
    numpy_scalars = [np._core.multiarray.scalar, np.dtype, *{type(np.dtype(t)) for t in (np.float64, np.float32,
                                                                                            np.int64, np.int32)}]
    return [Config, BlossomConfig, yaml.FullLoader, torch.device, *enums, *numpy_scalars]


def _global_name(obj):
    return f"{obj.__module__}.{getattr(obj, '__qualname__', obj.__name__)}"


def resolve_model_class(name):
    """The model class a checkpoint's ``module.Name`` refers to, or None when it is not an allowed model.

    Allowed: subclasses of RecBole's ``AbstractRecommender`` defined in ``recbole_blossom.model.*`` (the
    plugin's models) or ``recbole.model.*``. Only modules of those two packages are imported to resolve a name.
    """
    module_name, _, attr = name.rpartition(".")
    if not module_name.startswith(("recbole.model.", "recbole_blossom.model.")) or not attr.isidentifier():
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, type) and issubclass(obj, AbstractRecommender) and obj.__module__ == module_name:
        return obj
    return None


# ------------------------------------------------------------------------ protocol 4 -> protocol 2 re-encoding

# Opcodes torch's weights_only unpickler reads and that carry over unchanged.
_PASS_THROUGH = {
    "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE", "TUPLE1", "TUPLE2",
    "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "BININT",
    "BININT1", "BININT2", "BINFLOAT", "BINPERSID", "LONG1", "GLOBAL", "STOP", "SHORT_BINSTRING",
}
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_BYTES = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}


def _unicode(value):
    data = value.encode("utf-8", "surrogatepass")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def protocol2_pickle(data):
    """Re-encode a pickle of protocol 3-5 with the protocol-2 opcodes torch's ``weights_only`` loader reads.

    No object is built: strings are inlined instead of memoized, ``STACK_GLOBAL`` becomes ``GLOBAL``, ``FRAME``
    is dropped, ``MEMOIZE`` becomes ``LONG_BINPUT`` and bytes become ``_codecs.encode(str, 'latin1')`` (how
    protocol 2 writes bytes). Raises ``pickle.UnpicklingError`` on an opcode it cannot translate.
    """
    out, pending = [], []  # pending: strings pushed but not written yet (they may feed STACK_GLOBAL)
    memo, next_index, last_was_string = {}, 0, False

    def flush():
        out.extend(_unicode(s) for s in pending)
        pending.clear()

    ops = list(pickletools.genops(data))
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]
    for (op, arg, pos), end in zip(ops, ends):
        name, string_pushed = op.name, False
        if name == "PROTO":
            out.append(pickle.PROTO + b"\x02")
        elif name == "FRAME":
            pass
        elif name in _STRINGS:
            pending.append(arg)
            string_pushed = True
        elif name in ("MEMOIZE", "BINPUT", "LONG_BINPUT"):
            index = len(memo) if name == "MEMOIZE" else arg
            if last_was_string:
                memo[index] = ("str", pending[-1])
            else:
                flush()
                memo[index] = ("obj", next_index)
                out.append(pickle.LONG_BINPUT + struct.pack("<I", next_index))
                next_index += 1
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise pickle.UnpicklingError(f"memo key {arg} used before it was stored (offset {pos})")
            kind, value = memo[arg]
            if kind == "str":
                pending.append(value)
                string_pushed = True
            else:
                flush()
                out.append(pickle.LONG_BINGET + struct.pack("<I", value))
        elif name == "STACK_GLOBAL":
            if len(pending) < 2:
                raise pickle.UnpicklingError(f"STACK_GLOBAL without module and name strings (offset {pos})")
            module, qualname = pending[-2:]
            del pending[-2:]
            flush()
            if "\n" in module or "\n" in qualname:
                raise pickle.UnpicklingError(f"invalid global name {module!r}.{qualname!r} (offset {pos})")
            out.append(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("utf-8"))
        elif name in _BYTES:
            flush()
            out.append(pickle.GLOBAL + b"_codecs\nencode\n" + _unicode(arg.decode("latin1")) + _unicode("latin1")
                       + pickle.TUPLE2 + pickle.REDUCE)
        elif name in _PASS_THROUGH:
            flush()
            out.append(data[pos:end])
        else:
            raise pickle.UnpicklingError(f"pickle opcode {name} (offset {pos}) is not allowed in a checkpoint")
        last_was_string = string_pushed
    return b"".join(out)


def _read_pickle(path):
    """``(zip entries, name of the data.pkl entry)`` of a checkpoint file, or CheckpointError."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {info.filename: archive.read(info) for info in archive.infolist()}
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
        raise CheckpointError(
            f"checkpoint {path} is not readable ({err}); it is truncated, corrupt or not a torch.save file"
        ) from None
    pkl = [n for n in entries if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise CheckpointError(f"checkpoint {path} is not a torch.save file (it holds no data.pkl)")
    return entries, pkl[0]


def _globals_in(pkl):
    """Global names (``module.name``) a protocol-2 pickle refers to."""
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}


def _allowed_globals(path, names):
    """Static allow-list plus the model classes named in the checkpoint; CheckpointError for anything else."""
    static = static_safe_globals()
    allowed = {_global_name(obj): obj for obj in static}
    builtin = set(_get_allowed_globals())
    extra = []
    for name in sorted(names):
        if name in allowed or name in builtin or name.startswith("torch."):
            continue  # torch's own types are checked by torch's weights_only unpickler
        model_class = resolve_model_class(name)
        if model_class is None:
            raise CheckpointError(
                f"refusing to load checkpoint {path}: it holds '{name}', which is not a type a RecBole checkpoint "
                f"contains. Allowed: tensors, builtins, {', '.join(sorted(allowed))}, and model classes "
                f"(plugin models or RecBole models in recbole.model)"
            )
        extra.append(model_class)
    return static + extra


def load(path, map_location=None):
    """Load a RecBole checkpoint with ``weights_only=True`` and the allow-list described above."""
    path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if isinstance(path, str) and not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    entries, pkl_name = _read_pickle(path)
    source = path
    try:
        pkl = entries[pkl_name]
        if len(pkl) > 1 and pkl[0] == pickle.PROTO[0] and pkl[1] > 2:
            pkl = entries[pkl_name] = protocol2_pickle(pkl)
            source = io.BytesIO()
            with zipfile.ZipFile(source, "w", zipfile.ZIP_STORED) as archive:
                for name, content in entries.items():
                    archive.writestr(name, content)
            source.seek(0)
        names = _globals_in(pkl)
    except (pickle.UnpicklingError, ValueError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} is not readable: {err}") from None
    del entries
    safe = _allowed_globals(path, names)
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"refusing to load checkpoint {path}: {str(err).splitlines()[-1]}") from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} is not readable: {err}") from None


# ------------------------------------------------------------------------------------- model consistency

_EXPECTED_MODEL = contextvars.ContextVar("recbole_blossom_expected_model", default=None)


@contextlib.contextmanager
def expecting_model(model_name):
    """Within the block, checkpoints loaded through :func:`load_checked` must be of ``model_name``."""
    token = _EXPECTED_MODEL.set(model_name)
    try:
        yield
    finally:
        _EXPECTED_MODEL.reset(token)


def check_model(checkpoint, path, expected):
    """CheckpointError when the checkpoint's config names another model than ``expected``."""
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    found = config["model"] if config is not None else None
    if expected is not None and found is not None and str(found).lower() != str(expected).lower():
        raise CheckpointError(
            f"checkpoint {path} holds a {found} model, but it is being loaded into a {expected} model; "
            f"use a checkpoint of {expected}, or set model: {found} to continue that run"
        )


def load_checked(path, map_location=None):
    """:func:`load`, then :func:`check_model` against the model set by :func:`expecting_model`."""
    checkpoint = load(path, map_location=map_location)
    check_model(checkpoint, path, _EXPECTED_MODEL.get())
    return checkpoint


def save(obj, f, **kwargs):
    """``torch.save`` with pickle protocol 2, which ``weights_only`` loading reads (RecBole asks for 4)."""
    kwargs["pickle_protocol"] = 2
    torch.save(obj, f, **kwargs)


# ------------------------------------------------------------------------------------- RecBole's trainer


class _TorchWithSafeLoad(types.ModuleType):
    """The ``torch`` module as RecBole's trainer sees it: everything as is, ``load`` and ``save`` made safe.

    ``load`` is :func:`load_checked`; ``save`` is :func:`save` (pickle protocol 2; RecBole asks for 4, which
    ``weights_only`` loading cannot read).
    """

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, **kwargs):
        if kwargs.get("weights_only") is False:
            raise ValueError("recbole_blossom never loads checkpoints with weights_only=False")
        return load_checked(f, map_location=map_location)

    @staticmethod
    def save(obj, f, **kwargs):
        save(obj, f, **kwargs)


def _expecting_own_model(method):
    """Wrap a trainer method so that checkpoints it loads must be of the trainer's model."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with expecting_model(self.config["model"]):
            return method(self, *args, **kwargs)

    wrapper._recbole_blossom_checked = True
    return wrapper


def install():
    """Route RecBole's trainer checkpoint loading and saving through this module (idempotent).

    ``Trainer.resume_checkpoint`` and ``Trainer.evaluate`` refuse a checkpoint of another model (RecBole only
    warns, then fails inside ``load_state_dict``).
    """
    trainer_module.torch = _TorchWithSafeLoad("torch")
    for name in ("resume_checkpoint", "evaluate"):
        method = getattr(trainer_module.Trainer, name)
        if not getattr(method, "_recbole_blossom_checked", False):
            setattr(trainer_module.Trainer, name, _expecting_own_model(method))
