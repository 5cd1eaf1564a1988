"""RecBole's quick-start API for plugin and built-in models, without ray.

Same arguments and results as ``recbole.quick_start``: :func:`run`, :func:`run_recbole`,
:func:`objective_function` (for ``recbole.trainer.HyperTuning``) and :func:`load_data_and_model`.
"""

import logging
import os
import sys
from collections.abc import MutableMapping
from logging import getLogger

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from recbole.utils import get_environment, get_trainer, init_logger, init_seed, set_color

from recbole_blossom import distributed
from recbole_blossom.checkpoint import load_checked
from recbole_blossom.checks import DatasetNotFoundError, InputError, check_atomic_files, check_dataset
from recbole_blossom.config import BlossomConfig, get_model_class
from recbole_blossom.data import create_dataset, data_preparation


def make_config(model=None, dataset=None, config_file_list=None, config_dict=None):
    """``BlossomConfig``; any error while building it is bad input and raised as :class:`InputError`.

    RecBole's own config errors (a ``KeyError`` for a missing dataset name, a ``ValueError`` for an
    inconsistent setting, a ``NotImplementedError`` for an unknown metric) become InputError with the same message.
    """
    try:
        return BlossomConfig(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    except InputError:
        raise
    except (KeyError, ValueError, TypeError, NotImplementedError) as err:
        raise InputError(err.args[0] if len(err.args) == 1 else str(err)) from None


def prepare(config):
    """Seed and load the data (checked by the caller); returns ``dataset, train_data, valid_data, test_data``.

    RecBole's errors about a malformed file that the sampled check (:data:`checks.SAMPLE_ROWS` rows) did not
    reach do not name the file: the whole of each file is then checked for the line to report.
    """
    init_seed(config["seed"], config["reproducibility"])
    try:
        dataset = create_dataset(config)
    except ValueError:
        check_atomic_files(config, max_rows=None)  # raises DatasetFormatError naming the file and line
        raise
    return (dataset, *data_preparation(config, dataset))


def build_model(config, train_data):
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    return get_model_class(config["model"])(config, train_data._dataset).to(config["device"])


def _log_file():
    """The file RecBole's logger writes (``init_logger``), or None."""
    return next((h.baseFilename for h in getLogger().handlers if hasattr(h, "baseFilename")), None)


def run_recbole(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, queue=None):
    """Train and test one model on one dataset; returns RecBole's result dict."""
    config = make_config(model, dataset, config_file_list, config_dict)
    check_dataset(config)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.orig_argv)  # the command as typed (entry points hide sys.argv from RecBole)
    logger.info(config)
    dataset, train_data, valid_data, test_data = prepare(config)
    logger.info(dataset)
    model = build_model(config, train_data)
    logger.info(model)

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if not config["single_spec"]:
        distributed.share_checkpoint_name(trainer)  # read after rank 0 has written it (the barrier below)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    if not config["single_spec"]:
        dist.barrier()
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    result = {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "saved_model_file": trainer.saved_model_file if saved else None,
        "log_file": _log_file(),
    }
    if not config["single_spec"]:
        dist.destroy_process_group()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)
    return result


def run_recboles(rank, *args):
    """Entry point of each process of a multi-GPU run (``torch.multiprocessing.spawn``)."""
    kwargs = args[-1]
    if not isinstance(kwargs, MutableMapping):
        raise ValueError(f"The last argument of run_recboles should be a dict, got {type(kwargs)}")
    kwargs["config_dict"] = kwargs.get("config_dict") or {}
    kwargs["config_dict"]["local_rank"] = rank
    run_recbole(*args[:3], **kwargs)


def run(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, nproc=1, world_size=-1,
        ip="localhost", port="5678", group_offset=0):
    """RecBole's ``run``: one process, or ``nproc`` processes (``torch.distributed``, NCCL on GPUs)."""
    if nproc == 1 and world_size <= 0:
        return run_recbole(model, dataset, config_file_list, config_dict, saved)
    # Check in this process, so bad input fails once and clearly instead of inside every spawned process
    # (RecBole's Config sets CUDA_VISIBLE_DEVICES; the spawned processes set it themselves).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        config = make_config(model, dataset, config_file_list, config_dict)
        distributed.check_processes(config, nproc, world_size, group_offset)
        check_dataset(config)
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    world_size = nproc if world_size == -1 else world_size
    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = dict(config_dict or {})
    config_dict.update({"world_size": world_size, "ip": ip, "port": port, "nproc": nproc, "offset": group_offset})
    mp.spawn(run_recboles, args=(model, dataset, config_file_list, {"config_dict": config_dict, "queue": queue}),
             nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """Objective for ``recbole.trainer.HyperTuning``: trains one configuration, returns its results."""
    config = make_config(config_dict=config_dict, config_file_list=config_file_list)
    check_dataset(config)
    init_seed(config["seed"], config["reproducibility"])
    logger = getLogger()
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
    init_logger(config)
    logging.basicConfig(level=logging.ERROR)
    _, train_data, valid_data, test_data = prepare(config)
    model = build_model(config, train_data)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, verbose=False, saved=saved)
    test_result = trainer.evaluate(test_data, load_best_model=saved)
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }


def load_data_and_model(model_file, data_path=None):
    """Load a checkpoint safely, rebuild its data and model.

    Returns ``config, model, dataset, train_data, valid_data, test_data`` like RecBole's. A checkpoint
    trained on a GPU loads on a CPU-only machine. ``data_path``: the folder that holds ``<dataset>/`` now,
    when it is not where the checkpoint's run found it (the checkpoint stores that folder; checkpoints of
    older versions store it relative to the folder the run was started in).
    """
    checkpoint = load_checked(model_file, map_location="cpu")
    config = checkpoint["config"]
    # RecBole's Config.__init__ sets the numpy 1 aliases its metrics read (np.float in MRR); an unpickled
    # Config ran no __init__, so a fresh process would fail in evaluate() without this
    config.compatibility_settings()
    if not torch.cuda.is_available():
        config["device"] = torch.device("cpu")
    if data_path is not None:
        config["data_path"] = os.path.join(os.path.abspath(data_path), config["dataset"])
    try:
        check_dataset(config)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(
            f"{err} The checkpoint {model_file} was trained on these files: pass "
            f"load_data_and_model({model_file!r}, data_path=FOLDER) with the folder that holds "
            f"{config['dataset']}/ now.") from None
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)
    dataset, train_data, valid_data, test_data = prepare(config)
    logger.info(dataset)
    model = build_model(config, train_data)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data
