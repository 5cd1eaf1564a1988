"""``BlossomConfig``: RecBole's ``Config`` that knows the plugin's models and yaml defaults.

Resolution order (lowest priority first), as in RecBole: RecBole's own defaults (``overall.yaml``, the
built-in model's yaml, RecBole's dataset yaml, the sequential quick-start yaml), then the plugin's
``properties/overall.yaml`` (the shared training and evaluation protocol), ``properties/model/<model>.yaml``
and ``properties/dataset/<dataset>.yaml``; then the user's config files, config dict and command line.
"""

import glob
import os

from recbole.config import Config
from recbole.utils import get_model as recbole_get_model

from recbole_blossom.model import MODELS

_HERE = os.path.dirname(os.path.abspath(__file__))


def properties_dir():
    """The plugin's yaml defaults: inside the installed package, else ``properties/`` of the checkout."""
    for path in (os.path.join(_HERE, "properties"), os.path.join(os.path.dirname(_HERE), "properties")):
        if os.path.isfile(os.path.join(path, "overall.yaml")):
            return path
    raise FileNotFoundError(f"recbole_blossom's properties/overall.yaml is missing (looked next to {_HERE})")


def builtin_model_names():
    """Names of RecBole's built-in models (one yaml per model in RecBole's properties)."""
    import recbole

    pattern = os.path.join(os.path.dirname(recbole.__file__), "properties", "model", "*.yaml")
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(pattern))


def available_models():
    return sorted(MODELS) + builtin_model_names()


def get_model_class(name):
    """Model class by name: plugin models first, then RecBole's. Unknown names list what exists."""
    if not isinstance(name, str):
        return name
    if name in MODELS:
        return MODELS[name]
    try:
        return recbole_get_model(name)
    except (ValueError, AttributeError, ImportError):
        raise ValueError(
            f"model '{name}' is unknown. Plugin models: {', '.join(sorted(MODELS))}. "
            f"RecBole models: {', '.join(builtin_model_names())}"
        ) from None


class BlossomConfig(Config):
    """RecBole ``Config`` that resolves plugin model names and loads the plugin's yaml defaults."""

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
        if model is None:
            raise KeyError("model must be given: as an argument, in a config file, a config dict or --model=NAME")
        return super()._get_model_and_dataset(get_model_class(model), dataset)

    def _init_device(self):
        """RecBole's device set-up, except that a multi-process run without GPUs uses gloo on the CPU.

        RecBole always starts NCCL on GPU ``local_rank``. When CUDA is unavailable, ``use_gpu`` is false or
        ``gpu_id`` is empty, each process here joins a gloo group over ``ip:port`` and trains on the CPU.
        """
        import torch

        config = self.final_config_dict
        gpu_id = config["gpu_id"]
        gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, tuple) else str(gpu_id)
        on_cpu = not torch.cuda.is_available() or not config["use_gpu"] or not gpu_id
        if "local_rank" not in config or not on_cpu:
            return super()._init_device()
        config["gpu_id"] = gpu_id
        torch.distributed.init_process_group(
            backend="gloo", rank=config["local_rank"] + config["offset"], world_size=config["world_size"],
            init_method=f"tcp://{config['ip']}:{config['port']}",
        )
        config["device"] = torch.device("cpu")
        config["single_spec"] = False
        if config["local_rank"] != 0:
            config.update(state="error", show_progress=False, verbose=False)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        root = properties_dir()
        for path in (
            os.path.join(root, "overall.yaml"),
            os.path.join(root, "model", f"{model}.yaml"),
            os.path.join(root, "dataset", f"{dataset}.yaml"),
        ):
            if os.path.isfile(path):
                loaded = self._update_internal_config_dict(path) or {}
                if path.endswith(os.path.join("dataset", f"{dataset}.yaml")):
                    self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]
