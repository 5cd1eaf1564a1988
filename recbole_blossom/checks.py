"""Checks that run before any work: config keys and values, the dataset's atomic files, the plugin models'
hyperparameters. Every failure here is bad input: :class:`InputError` (a ``ValueError``), or
:class:`DatasetNotFoundError` (a ``FileNotFoundError``); :data:`USER_ERRORS` holds both for entry points.

RecBole reads atomic files late (after the logger, the config dump and the model are set up) and its errors
about malformed files do not name the file (``not enough values to unpack``, ``could not convert string to
float``). :func:`check_atomic_files` reads each file's header and a bounded sample of its rows and raises
:class:`DatasetFormatError` naming the file, the line and column, and what is allowed.
"""

import difflib
import importlib.util
import os

import torch
from recbole.utils import FeatureType, ModelType

from recbole_blossom.model import MODELS


# Rows checked per atomic file; the header is always checked. Bounded so huge files cost little.
SAMPLE_ROWS = 100_000
ALLOWED_TYPES = tuple(t.value for t in FeatureType)


class InputError(ValueError):
    """Bad input (config key or value, arguments, data) found before any work; the message says what to do."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's atomic files are not on disk (RecBole would try to download them)."""


class DatasetFormatError(InputError):
    """An atomic file RecBole would load is malformed (its message names the file, line and column)."""


# What an entry point reports as one line ("error: ..."); anything else is a bug and keeps its traceback.
USER_ERRORS = (InputError, DatasetNotFoundError)


def atomic_files(config):
    """``{source: path}`` of the atomic files RecBole loads for this config (existing ones only for user/item)."""
    name, path = config["dataset"], os.path.abspath(config["data_path"])
    benchmark = config["benchmark_filename"]
    files = {}
    if benchmark:
        for part in benchmark:
            files[f"inter ({part})"] = os.path.join(path, f"{name}.{part}.inter")
    else:
        files["inter"] = os.path.join(path, f"{name}.inter")
    for source in ("user", "item"):
        candidate = os.path.join(path, f"{name}.{source}")
        if os.path.isfile(candidate):
            files[source] = candidate
    for suffix in config["additional_feat_suffix"] or []:
        files[suffix] = os.path.join(path, f"{name}.{suffix}")
    return files


def _loaded_columns(config, source):
    """The columns RecBole loads from a file of ``source``: None for all, a set otherwise."""
    load_col, unload_col = config["load_col"], config["unload_col"]
    source = source.split(" ")[0]
    if load_col is None or load_col.get(source) == "*":
        wanted = None
    else:
        wanted = set(load_col.get(source, []))
    if unload_col and source in unload_col:
        return ("unload", set(unload_col[source]))
    return ("load", wanted)


def _is_loaded(column, loaded):
    mode, columns = loaded
    if columns is None:
        return True
    return column not in columns if mode == "unload" else column in columns


def read_header(path, sep, encoding):
    """``[(name, type)]`` of an atomic file's first line; DatasetFormatError when it is malformed."""
    try:
        with open(path, encoding=encoding) as f:
            header = f.readline().rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{path}: line 1 is not valid {encoding} (encoding: {encoding}): {err}") from None
    if not header:
        raise DatasetFormatError(f"{path}: line 1 is empty; it must be the header 'name:type{sep!r}name:type...'")
    columns = []
    for index, cell in enumerate(header.split(sep), start=1):
        field, colon, ftype = cell.partition(":")
        if not colon or not field or ":" in ftype:
            raise DatasetFormatError(
                f"{path}: line 1, column {index} is {cell!r}, not a 'name:type' pair. The header must list "
                f"name:type for every column, separated by field_separator {sep!r}; types: {', '.join(ALLOWED_TYPES)}"
            )
        if ftype not in ALLOWED_TYPES:
            raise DatasetFormatError(
                f"{path}: line 1, column {index} ({field}) has type {ftype!r}; "
                f"allowed types: {', '.join(ALLOWED_TYPES)}"
            )
        columns.append((field, ftype))
    names = [field for field, _ in columns]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DatasetFormatError(f"{path}: line 1 names column(s) {', '.join(duplicated)} more than once")
    return columns


def _check_float(path, line_no, index, field, value, rule):
    try:
        float(value)
    except ValueError:
        raise DatasetFormatError(
            f"{path}: line {line_no}, column {index} ({field}) holds {value!r}, which is not a number; {rule}"
        ) from None


def check_rows(path, columns, loaded, sep, seq_sep, encoding, max_rows=SAMPLE_ROWS):
    """Check the first ``max_rows`` rows (all when None): the column count, and numbers in loaded float columns.

    Returns the number of non-empty rows checked.
    """
    checks = [(i, field, ftype) for i, (field, ftype) in enumerate(columns, start=1)
              if _is_loaded(field, loaded) and ftype in ("float", "float_seq")]
    rows = 0
    try:
        with open(path, encoding=encoding) as f:
            f.readline()
            for line_no, line in enumerate(f, start=2):
                if max_rows is not None and line_no > max_rows + 1:
                    break
                line = line.rstrip("\r\n")
                if not line:
                    continue
                rows += 1
                cells = line.split(sep)
                if len(cells) != len(columns):
                    raise DatasetFormatError(
                        f"{path}: line {line_no} has {len(cells)} columns, but the header has {len(columns)} "
                        f"({', '.join(field for field, _ in columns)}), separated by field_separator {sep!r}"
                    )
                for index, field, ftype in checks:
                    value = cells[index - 1].strip()
                    if not value:
                        continue
                    if ftype == "float":
                        _check_float(path, line_no, index, field, value, "float columns hold a number or nothing")
                    else:
                        rule = f"float_seq columns hold numbers separated by seq_separator {seq_sep!r}"
                        for item in filter(None, value.split(seq_sep)):
                            _check_float(path, line_no, index, field, item, rule)
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{path}: not valid {encoding} (config key encoding): {err}") from None
    return rows


def required_inter_fields(config):
    """``{config key: column}`` the interaction file must hold for this config."""
    required = {key: config[key] for key in ("USER_ID_FIELD", "ITEM_ID_FIELD") if config[key]}
    order = (config["eval_args"] or {}).get("order")
    if order == "TO" and config["TIME_FIELD"]:
        required["TIME_FIELD"] = config["TIME_FIELD"]
    return required


def check_atomic_files(config, max_rows=SAMPLE_ROWS):
    """Raise DatasetFormatError when an atomic file RecBole would load for ``config`` is malformed.

    Missing ``.inter`` files are reported by :func:`check_dataset` (DatasetNotFoundError).
    """
    sep, seq_sep = config["field_separator"], config["seq_separator"]
    encoding = config["encoding"] or "utf-8"
    for source, path in atomic_files(config).items():
        if not os.path.isfile(path):
            raise DatasetNotFoundError(
                f"{path} does not exist; additional_feat_suffix lists '{source}', so RecBole would load it")
        loaded = _loaded_columns(config, source)
        if loaded == ("load", set()):
            continue  # load_col leaves this file out
        columns = read_header(path, sep, encoding)
        names = {field for field, _ in columns}
        if source.startswith("inter"):
            for key, field in required_inter_fields(config).items():
                why = " (eval_args order is TO, which sorts by time)" if key == "TIME_FIELD" else ""
                if field not in names:
                    raise DatasetFormatError(
                        f"{path}: the header has no column '{field}' ({key}{why}); "
                        f"columns: {', '.join(sorted(names))}. Set {key} to one of them or add the column"
                    )
                if not _is_loaded(field, loaded):
                    raise DatasetFormatError(
                        f"{path}: column '{field}' ({key}{why}) is needed, but load_col/unload_col leaves it out; "
                        f"add it to load_col (e.g. load_col: {{inter: [{', '.join(required_inter_fields(config).values())}]}}"
                        f") or remove load_col to load the columns the protocol needs")
        rows = check_rows(path, columns, loaded, sep, seq_sep, encoding, max_rows)
        if rows == 0 and source.startswith("inter"):
            raise DatasetFormatError(f"{path}: the header is followed by no interactions")


def check_model_config(config):
    """Validate the plugin model's keys before any data is loaded (InputError names the key)."""
    model_class = MODELS.get(config["model"])
    if model_class is not None:
        try:
            model_class.check_config(config)
        except ValueError as err:
            raise InputError(str(err)) from None


def check_dataset(config):
    """Raise before any work when the dataset's files are missing or malformed, or the hyperparameters invalid.

    :class:`DatasetNotFoundError` for missing files, :class:`DatasetFormatError` (naming file, line and column)
    for malformed ones, :class:`InputError` naming the key for invalid Blossom hyperparameters.
    """
    check_model_config(config)
    name, path = config["dataset"], os.path.abspath(config["data_path"])
    benchmark = config["benchmark_filename"]
    wanted = [f"{name}.{part}.inter" for part in benchmark] if benchmark else [f"{name}.inter"]
    missing = [f for f in wanted if not os.path.isfile(os.path.join(path, f))]
    if missing:
        where = "the folder does not exist" if not os.path.isdir(path) else f"it lacks {', '.join(missing)}"
        raise DatasetNotFoundError(
            f"dataset '{name}' not found: looked in {path} ({where}). RecBole would try to download it, "
            f"which needs internet. Get the atomic files of '{name}' (for public datasets: "
            f"https://recbole.io/dataset_list.html), put {wanted[0]} in {path}, or point data_path "
            f"(--data_path) to the folder that holds {name}/{wanted[0]}."
        )
    check_atomic_files(config)


# Unknown keys at least this close to a known key (difflib ratio, case-insensitive) are taken for typos.
TYPO_CUTOFF = 0.85


def check_config_keys(sources, known):
    """InputError for a given key that is not known but close to a known one (a typo); returns the other
    unknown keys (sorted), which the caller passes on with a warning.

    ``sources``: ``{key: where it was given}`` (a file, or the config dict / command line); ``known``: the
    keys RecBole and the plugin know.
    """
    lowered = {}
    for key in known:
        lowered.setdefault(key.lower(), key)
    unknown = []
    for key in sorted(sources):
        if key in known:
            continue
        close = difflib.get_close_matches(key.lower(), lowered, n=1, cutoff=TYPO_CUTOFF)
        if close:
            raise InputError(
                f"config key '{key}' (from {sources[key]}) is unknown; did you mean '{lowered[close[0]]}'? "
                f"Fix the name: an unknown key would be ignored and the default used instead")
        unknown.append(key)
    return unknown


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def amp_without_scaler(config):
    """A warning (str) when ``config`` trains in fp16 on a CUDA GPU without RecBole's gradient scaler, else None.

    RecBole's ``enable_amp`` autocasts to float16 on CUDA; without ``enable_scaler`` small gradients underflow to
    zero. Measured on an H100 (far10k2k, L = 2048, 4 epochs, ``docs/long_histories.md``): BlossomSASRec and
    SASRecSDPA reached validation NDCG@10 0.000-0.002 this way, 0.08 and 0.19 with the scaler.
    """
    if not (config.get("enable_amp") and not config.get("enable_scaler")):
        return None
    if not (torch.cuda.is_available() and config.get("use_gpu")):
        return None  # autocast on the CPU is bfloat16, which needs no scaling
    return ("enable_amp: True without enable_scaler: True trains in float16 on the GPU with no loss scaling, "
            "so small gradients underflow to zero and the model may not learn (measured: NDCG@10 near 0 where "
            "the scaler gave 0.08-0.19); set enable_scaler: True")


def check_values(config, model_keys):
    """Values RecBole or the models would refuse only after the data is loaded (InputError names the key).

    ``config``: the final config dict; ``model_keys``: the keys the model's own yaml sets.
    """
    check_model_config(config)  # the model's own rules first: their messages are the most specific
    if config.get("MODEL_TYPE") == ModelType.SEQUENTIAL and not _positive_int(config.get("MAX_ITEM_LIST_LENGTH")):
        raise InputError(f"MAX_ITEM_LIST_LENGTH must be a positive integer (the longest input sequence), "
                         f"got {config.get('MAX_ITEM_LIST_LENGTH')!r}")
    if {"hidden_size", "n_heads"} <= set(model_keys):
        hidden, heads = config.get("hidden_size"), config.get("n_heads")
        for key, value in (("hidden_size", hidden), ("n_heads", heads)):
            if not _positive_int(value):
                raise InputError(f"{key} must be a positive integer, got {value!r}")
        if hidden % heads:
            raise InputError(f"hidden_size ({hidden}) must be divisible by n_heads ({heads}): each head takes "
                             f"hidden_size / n_heads channels")
    if config.get("blossom_impl") == "fast":
        on_gpu = torch.cuda.is_available() and config.get("use_gpu") and str(config.get("gpu_id", "")) != ""
        if not on_gpu or importlib.util.find_spec("triton") is None:
            why = "Triton is not installed" if on_gpu else "no CUDA GPU is in use on this machine"
            raise InputError(f"blossom_impl=fast runs Triton kernels on a CUDA GPU, but {why}; use "
                             f"blossom_impl=auto (the fast path where it can run, the PyTorch path otherwise) "
                             f"or blossom_impl=torch")
