"""Tiny CPU runs on RecBole's bundled ml-100k, shared by the reliability and checkpoint tests, and models built
without data (a stand-in dataset that only counts items)."""

import contextlib
import os

import pytest
import torch

from recbole_blossom import BlossomConfig

# BlossomSASRec/SASRec small enough for a few seconds on 2 CPU cores: the users with 20-24 interactions.
TINY = {
    "epochs": 1,
    "hidden_size": 16,
    "inner_size": 32,
    "n_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 1,
    "cmp_block_len": 4,
    "cmp_stride": 2,
    "slc_block_size": 2,
    "n_slc_blocks": 2,
    "stis_window": 4,
    "MAX_ITEM_LIST_LENGTH": 10,
    "train_batch_size": 256,
    "eval_batch_size": 4096,
    "user_inter_num_interval": "[20,25)",
    "show_progress": False,
}


def tiny(directory, **overrides):
    """The tiny config with checkpoints under ``directory``."""
    return {**TINY, "checkpoint_dir": os.path.join(str(directory), "saved"), **overrides}


@contextlib.contextmanager
def inside(directory):
    """Run with ``directory`` as the working directory (RecBole writes log/ there)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(directory)
        yield


class Items:
    """What ``SequentialRecommender.__init__`` reads from a dataset: the number of items."""

    def __init__(self, n_items):
        self.n_items = n_items

    def num(self, field):
        return self.n_items


def model_without_data(model_class, n_items, config_dict):
    """``model_class`` on ml-100k's config with ``config_dict`` and ``n_items`` items, seeded, without data."""
    config = BlossomConfig(model=model_class.__name__, dataset="ml-100k", config_dict=config_dict)
    torch.manual_seed(0)
    return model_class(config, Items(n_items))
