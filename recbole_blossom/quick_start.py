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
from recbole.utils import get_environment, get_trainer, init_logger, init_seed, set_color

from recbole_blossom.checks import (  # noqa: F401  (DatasetFormatError is part of the API)
    DatasetFormatError,
    DatasetNotFoundError,
    check_atomic_files,
    check_model_config,
    check_processes,
)
from recbole_blossom.compat import safe_torch_load
from recbole_blossom.config import BlossomConfig, get_model_class
from recbole_blossom.data import create_dataset, data_preparation


def check_dataset(config):
    """Raise before any work when the dataset's files are missing or malformed, or the hyperparameters invalid.

    :class:`DatasetNotFoundError` for missing files, :class:`DatasetFormatError` (naming file, line and column)
    for malformed ones, ``ValueError`` naming the key for invalid Blossom hyperparameters.
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
            f"https://recbole.io/dataset_list.html), put {wanted[0]} in {path}, or point --data_path to the "
            f"folder that holds {name}/{wanted[0]}."
        )
    check_atomic_files(config)


def _prepare(config):
    """Seed and load the data (checked by the caller); returns ``dataset, train_data, valid_data, test_data``."""
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    return (dataset, *data_preparation(config, dataset))


def _build_model(config, train_data):
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    return get_model_class(config["model"])(config, train_data._dataset).to(config["device"])


def run_recbole(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, queue=None):
    """Train and test one model on one dataset; returns RecBole's result dict."""
    config = BlossomConfig(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    check_dataset(config)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)
    dataset, train_data, valid_data, test_data = _prepare(config)
    logger.info(dataset)
    model = _build_model(config, train_data)
    logger.info(model)

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if not config["single_spec"]:
        # RecBole names the checkpoint by each process's clock and only rank 0 writes it: every process
        # must read rank 0's file, and only after rank 0 has finished writing it.
        names = [trainer.saved_model_file]
        dist.broadcast_object_list(names, src=0)
        trainer.saved_model_file = names[0]
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
    import torch.multiprocessing as mp

    # Check in this process, so bad input fails once and clearly instead of inside every spawned process
    # (RecBole's Config sets CUDA_VISIBLE_DEVICES; the spawned processes set it themselves).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        config = BlossomConfig(model=model, dataset=dataset, config_file_list=config_file_list,
                               config_dict=config_dict)
        check_processes(config, nproc, world_size, group_offset)
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
    config = BlossomConfig(config_dict=config_dict, config_file_list=config_file_list)
    check_dataset(config)
    init_seed(config["seed"], config["reproducibility"])
    logger = getLogger()
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
    init_logger(config)
    logging.basicConfig(level=logging.ERROR)
    _, train_data, valid_data, test_data = _prepare(config)
    model = _build_model(config, train_data)
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


def load_data_and_model(model_file):
    """Load a checkpoint safely, rebuild its data and model.

    Returns ``config, model, dataset, train_data, valid_data, test_data`` like RecBole's. A checkpoint
    trained on a GPU loads on a CPU-only machine.
    """
    checkpoint = safe_torch_load(model_file, map_location="cpu")
    config = checkpoint["config"]
    if not torch.cuda.is_available():
        config["device"] = torch.device("cpu")
    check_dataset(config)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)
    dataset, train_data, valid_data, test_data = _prepare(config)
    logger.info(dataset)
    model = _build_model(config, train_data)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data
