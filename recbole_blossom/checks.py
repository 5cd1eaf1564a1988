"""Checks that run before any work: the dataset's atomic files and the plugin models' hyperparameters.

RecBole reads atomic files late (after the logger, the config dump and the model are set up) and its errors
about malformed files do not name the file (``not enough values to unpack``, ``could not convert string to
float``). :func:`check_atomic_files` reads each file's header and a bounded sample of its rows and raises
:class:`DatasetFormatError` naming the file, the line and column, and what is allowed.
"""

import os

from recbole.utils import FeatureType

from recbole_blossom.hparams import BlossomHParams, BlossomRuntime

# Rows checked per atomic file; the header is always checked. Bounded so huge files cost little.
SAMPLE_ROWS = 100_000
ALLOWED_TYPES = tuple(t.value for t in FeatureType)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's atomic files are not on disk (RecBole would try to download them)."""


class DatasetFormatError(ValueError):
    """An atomic file RecBole would load is malformed (its message names the file, line and column)."""


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
    """Check the first ``max_rows`` rows: the column count, and numbers in loaded float columns.

    Returns the number of non-empty rows checked.
    """
    checks = [(i, field, ftype) for i, (field, ftype) in enumerate(columns, start=1)
              if _is_loaded(field, loaded) and ftype in ("float", "float_seq")]
    rows = 0
    try:
        with open(path, encoding=encoding) as f:
            f.readline()
            for line_no, line in enumerate(f, start=2):
                if line_no > max_rows + 1:
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

    Missing files are reported by ``recbole_blossom.quick_start.check_dataset`` (DatasetNotFoundError).
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
                        f"{path}: column '{field}' ({key}{why}) is needed, but load_col/unload_col leaves it out")
        rows = check_rows(path, columns, loaded, sep, seq_sep, encoding, max_rows)
        if rows == 0 and source.startswith("inter"):
            raise DatasetFormatError(f"{path}: the header is followed by no interactions")


def check_model_config(config):
    """Validate the plugin's Blossom hyperparameters before any data is loaded (ValueError names the key)."""
    from recbole_blossom.model import MODELS

    if config["model"] in MODELS and config["model"].startswith("Blossom"):
        BlossomHParams.from_config(config)
        BlossomRuntime.from_config(config)


def check_processes(config, nproc, world_size, group_offset):
    """Raise ValueError naming the argument when a multi-process run cannot start as asked.

    RecBole asserts without a message when ``gpu_id`` lists fewer GPUs than ``nproc``; ranks beyond
    ``world_size`` hang in ``init_process_group``.
    """
    import torch

    for name, value, low in (("nproc", nproc, 1), ("group_offset", group_offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if world_size != -1 and (isinstance(world_size, bool) or not isinstance(world_size, int)
                             or world_size < group_offset + nproc):
        raise ValueError(
            f"world_size ({world_size!r}) must be -1 (= nproc) or at least group_offset + nproc "
            f"({group_offset} + {nproc}): the processes of this machine take global ranks "
            f"{group_offset}..{group_offset + nproc - 1}"
        )
    gpu_id = config["gpu_id"]
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, tuple) else str(gpu_id)
    if torch.cuda.is_available() and config["use_gpu"] and gpu_id:
        gpus = [g for g in gpu_id.split(",") if g.strip()]
        if len(gpus) < nproc:
            raise ValueError(
                f"nproc={nproc} needs one GPU per process, but gpu_id lists {len(gpus)} ({gpu_id!r}); "
                f"pass e.g. --gpu_id={','.join(map(str, range(nproc)))}"
            )
