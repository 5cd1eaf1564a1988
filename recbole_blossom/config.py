"""``BlossomConfig``: RecBole's ``Config`` that knows the plugin's models, yaml defaults and config keys.

Resolution order (lowest priority first), as in RecBole: RecBole's own defaults (``overall.yaml``, the
built-in model's yaml, RecBole's dataset yaml, the sequential quick-start yaml), then the plugin's
``properties/overall.yaml`` (the shared training and evaluation protocol), ``properties/model/<model>.yaml``
and ``properties/dataset/<dataset>.yaml``; then the user's config files, config dict and command line.

On top of RecBole's behaviour:

* every key the user gives is compared with the keys RecBole and the plugin know (:func:`known_keys`); a key
  close to a known one is an error naming both, any other unknown key is logged as a warning and passed on
  (your own model may read it);
* a config file that is missing, not yaml or not a mapping is an error naming the file (and the line);
* the interaction columns the protocol needs (user, item, and time when ``eval_args.order`` is ``TO``) are
  added to RecBole's default ``load_col`` unless the user sets ``load_col``;
* pairwise models (``BPR``, or ``loss_type: BPR``) get RecBole's negative sampling back unless the user sets
  ``train_neg_sample_args`` (the shared protocol turns it off for the CE loss);
* a model whose yaml defaults to ``seq_train_mode: every_position`` (BlossomSASRec) trains per prefix where the
  data side refuses that mode (:func:`recbole_blossom.data.every_position_refusal`: ``seq_pipeline: recbole``,
  negative sampling, which ``loss_type: BPR`` brings back, ``benchmark_filename``, ...) unless the user sets
  ``seq_train_mode``; a user's ``every_position`` there is an error;
* ``data_path`` is stored absolute, so a checkpoint's data can be found from another folder;
* on a machine without CUDA, ``use_gpu`` reads False and ``gpu_id`` is empty (as used);
* a multi-process run without GPUs uses gloo on the CPU (:mod:`recbole_blossom.distributed`).
"""

import copy
import difflib
import functools
import glob
import inspect
import logging
import os
import re

import recbole
import torch
import yaml
from recbole.config import Config
from recbole.utils import InputType
from recbole.utils import argument_list
from recbole.utils import get_model as recbole_get_model

from recbole_blossom import distributed
from recbole_blossom.checks import (InputError, amp_without_scaler, check_config_keys, check_values,
                                   required_inter_fields)
from recbole_blossom.data import every_position_refusal, seq_train_mode
from recbole_blossom.model import MODELS

_HERE = os.path.dirname(os.path.abspath(__file__))
_RECBOLE = os.path.dirname(os.path.abspath(recbole.__file__))
# Keys a RecBole source file reads: a literal name in config[...], config.get(...), final_config_dict[...]
_READ_KEY = re.compile(r"""\w*config\w*\s*(?:\[\s*|\.get\(\s*)["']([A-Za-z_]\w*)["']""")


def properties_dir():
    """The plugin's yaml defaults: inside the installed package, else ``properties/`` of the checkout."""
    for path in (os.path.join(_HERE, "properties"), os.path.join(os.path.dirname(_HERE), "properties")):
        if os.path.isfile(os.path.join(path, "overall.yaml")):
            return path
    raise FileNotFoundError(f"recbole_blossom's properties/overall.yaml is missing (looked next to {_HERE})")


def builtin_model_names():
    """Names of RecBole's built-in models (one yaml per model in RecBole's properties)."""
    pattern = os.path.join(_RECBOLE, "properties", "model", "*.yaml")
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(pattern))


def available_models():
    return sorted(MODELS) + builtin_model_names()


def get_model_class(name):
    """Model class by name: plugin models first, then RecBole's. Unknown names suggest the closest ones."""
    if not isinstance(name, str):
        return name
    if name in MODELS:
        return MODELS[name]
    try:
        return recbole_get_model(name)
    except (ValueError, AttributeError, ImportError):
        names = available_models()
        lowered = {n.lower(): n for n in names}
        close = [lowered[n] for n in difflib.get_close_matches(name.lower(), lowered, n=3, cutoff=0.6)]
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise InputError(
            f"model '{name}' is unknown.{hint} Plugin models: {', '.join(sorted(MODELS))}. "
            f"RecBole models: {', '.join(builtin_model_names())}"
        ) from None


def _yaml_keys(path):
    with open(path, encoding="utf-8") as f:
        return set(yaml.load(f, Loader=yaml.FullLoader) or {})


def model_defaults(name):
    """The defaults a model's own yaml sets: RecBole's ``properties/model/<name>.yaml``, then the plugin's.

    The shared protocol (``properties/overall.yaml``) is not included; ``{}`` for a model without a yaml.
    """
    defaults = {}
    for path in (os.path.join(_RECBOLE, "properties", "model", f"{name}.yaml"),
                 os.path.join(properties_dir(), "model", f"{name}.yaml")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                defaults.update(yaml.load(f, Loader=Config._build_yaml_loader(None)) or {})
    return defaults


@functools.lru_cache(maxsize=None)
def _package_keys():
    """Keys RecBole and the plugin know: every key of their yamls, RecBole's argument lists, and every key a
    RecBole source file reads (RecBole reads some, e.g. ``encoding`` or ``neg_sampling``, without a yaml
    default). Built from the installed files, so it follows the installed RecBole."""
    keys = set()
    for root in (os.path.join(_RECBOLE, "properties"), properties_dir()):
        for path in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True):
            keys |= _yaml_keys(path)
    for name in ("general_arguments", "training_arguments", "evaluation_arguments", "dataset_arguments"):
        keys |= set(getattr(argument_list, name))
    for path in glob.glob(os.path.join(_RECBOLE, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            keys |= set(_READ_KEY.findall(f.read()))
    return frozenset(keys)


def known_keys(model_class=None):
    """Config keys RecBole and the plugin know, plus those the module of ``model_class`` reads (a user's own
    model passed as a class)."""
    keys = set(_package_keys())
    module = inspect.getmodule(model_class) if model_class is not None else None
    if module is not None and not module.__name__.startswith(("recbole.", "recbole_blossom.")):
        try:
            keys |= set(_READ_KEY.findall(inspect.getsource(module)))
        except (OSError, TypeError):
            pass  # no source (e.g. defined interactively): only the package keys are known
    return keys


def _protocol_needs_sampling(model_class, final):
    """Whether the model trains on (positive, sampled negative) pairs, as RecBole decides MODEL_INPUT_TYPE."""
    input_type = getattr(model_class, "input_type", None)
    if input_type is not None:
        return input_type == InputType.PAIRWISE
    return final.get("loss_type") == "BPR"


class BlossomConfig(Config):
    """RecBole ``Config`` that resolves plugin model names, loads the plugin's yaml defaults and checks keys."""

    def _load_config_files(self, file_list):
        """RecBole's, with errors that name the file; remembers which file gave each key."""
        self._key_sources = {}
        merged = {}
        for path in file_list or []:
            if not os.path.isfile(path):
                raise InputError(f"config file {path} does not exist (given in config_file_list / --config_files)")
            try:
                with open(path, encoding="utf-8") as f:
                    loaded = yaml.load(f.read(), Loader=self.yaml_loader)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f"{path}, line {mark.line + 1}" if mark is not None else path
                raise InputError(f"config file {where} is not valid yaml: "
                                  f"{getattr(err, 'problem', None) or err}") from None
            except UnicodeDecodeError as err:
                raise InputError(f"config file {path} is not utf-8 text: {err}") from None
            if loaded is None:
                continue
            if not isinstance(loaded, dict):
                raise InputError(f"config file {path} must hold 'key: value' lines, got a {type(loaded).__name__}")
            merged.update(loaded)
            self._key_sources.update({key: path for key in loaded})
        return merged

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
        if model is None:
            raise InputError("model must be given: as an argument, in a config file, a config dict or --model=NAME")
        model_class = get_model_class(model)
        sources = {key: "the config dict or the command line" for key in self.external_config_dict}
        sources.update({k: v for k, v in getattr(self, "_key_sources", {}).items()
                        if k not in self.variable_config_dict and k not in self.cmd_config_dict})
        unknown = check_config_keys(sources, known_keys(model_class))
        if unknown:
            logging.getLogger().warning(
                "config keys not read by RecBole or recbole_blossom (passed on, your own model may read them): "
                + ", ".join(f"{key} (from {sources[key]})" for key in unknown))
        return super()._get_model_and_dataset(model_class, dataset)

    def _init_device(self):
        """RecBole's device set-up, except that a multi-process run without GPUs uses gloo on the CPU, and
        that ``use_gpu`` / ``gpu_id`` read as used (False / empty) on a machine without CUDA."""
        config = self.final_config_dict
        if "local_rank" in config and not distributed.uses_gpus(config):
            distributed.init_cpu_process_group(config)
            return
        super()._init_device()
        if not torch.cuda.is_available():
            config.update(use_gpu=False, gpu_id="")

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        self._recbole_train_neg_sample_args = copy.deepcopy(self.internal_config_dict.get("train_neg_sample_args"))
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

    def _get_final_config_dict(self):
        final = super()._get_final_config_dict()
        user = self.external_config_dict
        if "train_neg_sample_args" not in user and _protocol_needs_sampling(self.model_class, final):
            final["train_neg_sample_args"] = copy.deepcopy(self._recbole_train_neg_sample_args)
        elif user.get("train_neg_sample_args") in (None, "None") and "train_neg_sample_args" in user \
                and _protocol_needs_sampling(self.model_class, final):
            raise InputError(
                f"{self.model} trains on pairs of a positive and a sampled negative item (pairwise, e.g. BPR "
                f"loss), but train_neg_sample_args is None in your config: remove it to get RecBole's default "
                f"sampling, or set e.g. train_neg_sample_args: {{distribution: uniform, sample_num: 1}}")
        load_col = final.get("load_col")
        if "load_col" not in user and isinstance(load_col, dict) and isinstance(load_col.get("inter"), list):
            inter = list(load_col["inter"])
            inter += [c for c in required_inter_fields(final).values() if c not in inter]
            final["load_col"] = {**load_col, "inter": inter}
        return final

    def _set_default_parameters(self):
        super()._set_default_parameters()
        self.final_config_dict["data_path"] = os.path.abspath(self.final_config_dict["data_path"])
        # A model's default every_position where the data side refuses it: RecBole's rows (before the model's
        # own check of its keys below, which would refuse it too).
        if "seq_train_mode" not in self.external_config_dict and seq_train_mode(self) == "every_position" \
                and every_position_refusal(self) is not None:
            self.final_config_dict["seq_train_mode"] = "per_prefix"
        check_values(self.final_config_dict, set(model_defaults(self.model)))
        warning = amp_without_scaler(self.final_config_dict)
        if warning:
            logging.getLogger().warning(warning)
