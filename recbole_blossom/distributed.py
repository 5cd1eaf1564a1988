"""Multi-process training (``torch.distributed``): the checks, the CPU (gloo) path and the trainer patch.

RecBole trains in several processes with NCCL on one GPU each. The plugin adds:

* :func:`check_processes`: a bad process layout is refused before any process starts (RecBole asserts
  without a message, or hangs in ``init_process_group``);
* :func:`init_cpu_process_group`: without GPUs each process joins a gloo group and trains on the CPU
  (called by ``BlossomConfig._init_device`` where RecBole would start NCCL);
* :func:`install`: RecBole's trainer wraps the model in ``DistributedDataParallel(device_ids=[rank])``,
  which CPU modules refuse; CPU modules get no ``device_ids``;
* :func:`share_checkpoint_name`: every process reads rank 0's checkpoint file.
"""

import recbole.trainer.trainer as trainer_module
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from recbole_blossom.checks import InputError


def gpu_ids(config):
    """``gpu_id`` as RecBole writes it: a comma-separated string (a tuple in yaml becomes ``"0,1"``)."""
    gpu_id = config["gpu_id"]
    return ",".join(map(str, gpu_id)) if isinstance(gpu_id, tuple) else str(gpu_id)


def uses_gpus(config):
    """Whether this config trains on GPUs: CUDA is there, ``use_gpu`` is on and ``gpu_id`` lists some."""
    return torch.cuda.is_available() and bool(config["use_gpu"]) and bool(gpu_ids(config))


def check_processes(config, nproc, world_size, group_offset):
    """Raise InputError naming the argument when a multi-process run cannot start as asked.

    RecBole asserts without a message when ``gpu_id`` lists fewer GPUs than ``nproc``; ranks beyond
    ``world_size`` hang in ``init_process_group``.
    """
    for name, value, low in (("nproc", nproc, 1), ("group_offset", group_offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if world_size != -1 and (isinstance(world_size, bool) or not isinstance(world_size, int)
                             or world_size < group_offset + nproc):
        raise InputError(
            f"world_size ({world_size!r}) must be -1 (= nproc) or at least group_offset + nproc "
            f"({group_offset} + {nproc}): the processes of this machine take global ranks "
            f"{group_offset}..{group_offset + nproc - 1}"
        )
    if uses_gpus(config):
        gpu_id = gpu_ids(config)
        gpus = [g for g in gpu_id.split(",") if g.strip()]
        if len(gpus) < nproc:
            raise InputError(
                f"nproc={nproc} needs one GPU per process, but gpu_id lists {len(gpus)} ({gpu_id!r}); "
                f"pass e.g. --gpu_id={','.join(map(str, range(nproc)))}"
            )


def init_cpu_process_group(config):
    """Join the run's gloo group over ``ip:port`` and train on the CPU (``config`` is the final dict).

    Rank 0 logs; the other processes are silenced as RecBole silences them on GPUs.
    """
    config["gpu_id"] = gpu_ids(config)
    dist.init_process_group(
        backend="gloo", rank=config["local_rank"] + config["offset"], world_size=config["world_size"],
        init_method=f"tcp://{config['ip']}:{config['port']}",
    )
    config["device"] = torch.device("cpu")
    config["single_spec"] = False
    if config["local_rank"] != 0:
        config.update(state="error", show_progress=False, verbose=False)


def share_checkpoint_name(trainer):
    """RecBole names the checkpoint by each process's clock and only rank 0 writes it: every process takes
    rank 0's name."""
    names = [trainer.saved_model_file]
    dist.broadcast_object_list(names, src=0)
    trainer.saved_model_file = names[0]


def _ddp_on_any_device(module, device_ids=None, **kwargs):
    """RecBole's ``DistributedDataParallel(model, device_ids=[rank])``; CPU modules get no ``device_ids``."""
    if next(module.parameters()).device.type == "cpu":
        device_ids = None
    return DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def install():
    """Let RecBole's trainer wrap CPU models for multi-process training (idempotent)."""
    trainer_module.DistributedDataParallel = _ddp_on_any_device
