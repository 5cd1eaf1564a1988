"""Sequence data that keeps each interaction once and builds history windows when a batch is drawn (issue 11).

RecBole's ``SequentialDataset.data_augmentation`` stores, for every interaction but each user's first, a padded
row of ``MAX_ITEM_LIST_LENGTH`` entries for every interaction field: host memory ``interactions x L``. Here
:class:`WindowSequentialDataset` stores the interactions once (sorted by user and time, as RecBole sorts them)
plus, per row, the position of its target (the history window is the ``length`` interactions before it). Its
``inter_feat`` is a :class:`WindowInteraction`: splitting, sorting and indexing it keep it lazy; the dataset's
``__getitem__`` (what RecBole's dataloaders call per batch) materialises a plain RecBole ``Interaction`` with
every ``*_list`` field, built vectorised (one block copy per row and field, no Python loop per row). The batches
equal RecBole's own: same rows, order, targets, lengths, left-aligned zero padding, dtypes; RecBole's
dataloaders, samplers, trainer and evaluation are used unchanged.

Config keys (defaults in ``properties/overall.yaml``):

- ``seq_pipeline``: ``windows`` (this module) or ``recbole`` (RecBole's ``SequentialDataset``).
- ``seq_train_mode``: ``per_prefix`` (RecBole's rows: one target per row) or ``every_position`` (one row per
  window of a user's training history, a target at every real input position; needs ``windows``).

Shapes: ``N`` interactions, ``B`` rows of a batch, ``L`` = ``MAX_ITEM_LIST_LENGTH``.
"""

import importlib
import os
import pickle
from collections import Counter
from logging import getLogger

import numpy as np
import torch
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation as recbole_data_preparation
from recbole.data.dataloader import TrainDataLoader
from recbole.data.dataset import SequentialDataset
from recbole.data.interaction import Interaction
from recbole.data.utils import create_samplers, get_dataloader, load_split_dataloaders, save_split_dataloaders
from recbole.utils import FeatureType, ModelType, get_model, set_color
from recbole.utils.argument_list import dataset_arguments

from recbole_blossom.model import MODELS, target_list_field
from recbole_blossom.model.base import SEQ_TRAIN_MODES

SEQ_PIPELINES = ("windows", "recbole")


def seq_pipeline(config):
    """The configured ``seq_pipeline`` (``windows`` when the config does not know the key)."""
    return config["seq_pipeline"] or "windows"


def seq_train_mode(config):
    """The configured ``seq_train_mode`` (``per_prefix`` when the config does not know the key)."""
    return config["seq_train_mode"] or "per_prefix"


def _recbole_only_reason(config):
    """Why this config must use RecBole's own dataset, or None when the windows pipeline applies."""
    if config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        return f"model {config['model']} is not sequential"
    if hasattr(importlib.import_module("recbole.data.dataset"), config["model"] + "Dataset"):
        return f"RecBole builds a dataset of its own for model {config['model']}"
    if config["benchmark_filename"]:
        return "benchmark_filename is set (its files already hold the *_list fields)"
    return None


def every_position_refusal(config):
    """Why ``seq_train_mode: every_position`` cannot run with this config (a message naming the keys), or None."""
    if seq_pipeline(config) != "windows":
        return ("seq_train_mode every_position needs seq_pipeline: windows (got recbole); "
                "for RecBole's pipeline set seq_train_mode: per_prefix")
    reason = _recbole_only_reason(config)
    if reason:
        return f"seq_train_mode every_position is not available: {reason}; set seq_train_mode: per_prefix"
    # RecBole's parsed form ({distribution: none} for none), or the raw value (None) while its Config is built
    sampling = (config["train_neg_sample_args"] or {}).get("distribution", "none")
    if sampling != "none":
        return ("seq_train_mode every_position trains with the cross-entropy loss over all items at every "
                f"position; set train_neg_sample_args: ~ (got {sampling} negative sampling), or set "
                "seq_train_mode: per_prefix")
    model = MODELS.get(config["model"]) or get_model(config["model"])
    # The model's own config-aware answer when it has one (e.g. LinRec only in its causal form).
    supported = getattr(model, "every_position_supported", None)
    if not (supported(config) if supported else getattr(model, "supports_every_position", False)):
        able = sorted(name for name, cls in MODELS.items() if getattr(cls, "supports_every_position", False))
        return (f"seq_train_mode every_position needs a model that predicts the next item at every position "
                f"(class attribute supports_every_position); {config['model']} has not. "
                f"Models that have: {', '.join(able) or 'none'}")
    return None


def check_data_config(config):
    """Raise ValueError naming the key when ``seq_pipeline`` / ``seq_train_mode`` cannot be honoured."""
    pipeline, mode = seq_pipeline(config), seq_train_mode(config)
    if pipeline not in SEQ_PIPELINES:
        raise ValueError(f"seq_pipeline is {pipeline!r}; allowed values: {', '.join(SEQ_PIPELINES)}")
    if mode not in SEQ_TRAIN_MODES:
        raise ValueError(f"seq_train_mode is {mode!r}; allowed values: {', '.join(SEQ_TRAIN_MODES)}")
    refusal = every_position_refusal(config) if mode == "every_position" else None
    if refusal:
        raise ValueError(refusal)


def uses_windows(config):
    """Whether this config's data go through :class:`WindowSequentialDataset`."""
    return seq_pipeline(config) == "windows" and _recbole_only_reason(config) is None


def pad_store(values, max_len):
    """``values`` (N, *rest) followed by ``max_len + 1`` zero rows, so every window start ``<= N`` reads in range."""
    return torch.cat([values, values.new_zeros((max_len + 1, *values.shape[1:]))])


def take_windows(store, starts, lengths, max_len):
    """Left-aligned, zero-padded windows: (B, max_len, *rest) with ``out[b, t] = store[starts[b] + t]`` for
    ``t < lengths[b]`` and 0 beyond.

    ``store`` (N + max_len + 1, *rest) from :func:`pad_store`; ``starts``, ``lengths`` (B,) long. The windows
    are rows of a strided view of ``store`` (no index tensor of size B x L is built): one block copy per row.
    """
    windows = store.unfold(0, max_len, 1)  # (N + 2, *rest, max_len), a view
    out = windows.index_select(0, starts)
    if store.dim() > 1:
        out = out.movedim(-1, 1).contiguous()
    pad = torch.arange(max_len) >= lengths[:, None]
    return out.masked_fill_(pad.reshape(*pad.shape, *([1] * (store.dim() - 1))), 0)


def gather_windows(values, ends, lengths, max_len, shift=0):
    """``out[b, t] = values[ends[b] - lengths[b] + shift + t]`` for ``t < lengths[b]``, 0 beyond: (B, max_len, *rest).

    ``values`` (N, *rest), not padded; for one-off use (the datasets keep a padded store).
    """
    return take_windows(pad_store(values, max_len), ends - lengths + shift, lengths, max_len)


class WindowInteraction(Interaction):
    """An ``Interaction`` whose ``*_list`` fields are computed from the stored interactions on demand.

    ``interaction`` holds the row's own columns (the target's fields and the length field), ``(B, ...)``.
    ``base`` holds every interaction once, ``{field: (N + L + 1, ...)}`` (zero rows at the end, see
    :func:`pad_store`), shared between views. ``ends`` (B,) is each row's target position in ``base`` (for
    every-position rows its last target), ``lengths`` (B,) its number of inputs. ``list_fields`` maps a list
    field to ``(base field, shift)``: row ``b`` of it is ``base[field][ends[b] - lengths[b] + shift + t]`` for
    ``t < lengths[b]``. Indexing with an index (not a field name) gives another lazy view; a field name
    gives that column (a list field is then built for all rows); :meth:`materialize` gives the plain batch.
    """

    def __init__(self, rows, base, list_fields, ends, lengths, max_len, train_mode="per_prefix"):
        super().__init__(rows)
        self.base = base
        self.list_fields = dict(list_fields)
        self.ends = ends
        self.lengths = lengths
        self.max_len = max_len
        self.train_mode = train_mode
        self.length = len(ends)

    def _view(self, index):
        if not isinstance(index, (slice, torch.Tensor)):  # lists, ranges, numpy arrays, numbers
            index = torch.as_tensor(np.asarray(index))
            if index.numel() == 0:
                index = index.long()  # an empty list would index as float
        if isinstance(index, torch.Tensor) and index.dim() == 0:
            index = index.reshape(1)
        rows = {k: v[index] for k, v in self.interaction.items()}
        return WindowInteraction(rows, self.base, self.list_fields, self.ends[index], self.lengths[index],
                                 self.max_len, self.train_mode)

    def list_column(self, field):
        """The list field ``field`` for these rows, (B, L, *rest)."""
        source, shift = self.list_fields[field]
        return take_windows(self.base[source], self.ends - self.lengths + shift, self.lengths, self.max_len)

    def materialize(self):
        """The plain RecBole ``Interaction`` of these rows: own columns first, then the list fields."""
        data = dict(self.interaction)
        for field in self.list_fields:
            data[field] = self.list_column(field)
        return Interaction(data)

    def __getitem__(self, index):
        if isinstance(index, str):
            if index in self.interaction:
                return self.interaction[index]
            return self.list_column(index)
        return self._view(index)

    def __iter__(self):
        return iter(self.columns)

    def __contains__(self, item):
        return item in self.interaction or item in self.list_fields

    @property
    def columns(self):
        return list(self.interaction) + list(self.list_fields)

    def _reindex(self, index):
        super()._reindex(index)
        self.ends, self.lengths = self.ends[index], self.lengths[index]

    def drop(self, column):
        if column in self.list_fields:
            del self.list_fields[column]
        else:
            super().drop(column)

    def update(self, new_inter):
        for k in new_inter.interaction:
            self.list_fields.pop(k, None)
        super().update(new_inter)

    # Everything that copies the rows works on the materialised batch.
    def to(self, device, selected_field=None):
        return self.materialize().to(device, selected_field)

    def cpu(self):
        return self.materialize()

    def numpy(self):
        return self.materialize().numpy()

    def repeat(self, sizes):
        return self.materialize().repeat(sizes)

    def repeat_interleave(self, repeats, dim=0):
        return self.materialize().repeat_interleave(repeats, dim)

    def __str__(self):
        lazy = ", ".join(self.list_fields)
        return f"{super().__str__()}    built per batch: {lazy}\n"


class WindowSequentialDataset(SequentialDataset):
    """RecBole's ``SequentialDataset`` whose augmentation stores positions, not padded copies of every prefix."""

    def data_augmentation(self):
        """Same rows as RecBole's augmentation: every interaction but each user's first, history up to L."""
        self.logger.debug("data_augmentation (windows)")
        self._aug_presets()
        self._check_field("uid_field", "time_field")
        self.sort(by=[self.uid_field, self.time_field], ascending=True)
        base = self.inter_feat
        uid = base[self.uid_field]
        positions = torch.arange(len(uid))
        first = torch.ones(len(uid), dtype=torch.bool)
        first[1:] = uid[1:] != uid[:-1]
        user_start = torch.cummax(torch.where(first, positions, 0), dim=0).values
        ends = positions[~first]
        lengths = torch.clamp(ends - user_start[ends], max=self.max_item_list_len)
        rows = {field: base[field][ends] for field in base}
        rows[self.item_list_length_field] = lengths
        list_fields = {getattr(self, f"{field}_list_field"): (field, 0) for field in base if field != self.uid_field}
        store = {field: pad_store(base[field], self.max_item_list_len) for field in base}
        self.inter_feat = WindowInteraction(rows, store, list_fields, ends, lengths, self.max_item_list_len)

    def __getitem__(self, index, join=True):
        df = self.inter_feat[index]
        if isinstance(df, WindowInteraction):
            df = df.materialize()
        return self.join(df) if join else df

    def inter_matrix(self, form="coo", value_field=None):
        """RecBole's sequential ``inter_matrix``: the rows' interactions plus each user's first interaction."""
        if not self.uid_field or not self.iid_field:
            raise ValueError("dataset does not exist uid/iid, thus can not converted to sparse matrix.")
        inter = self.inter_feat
        if not isinstance(inter, WindowInteraction):
            return super().inter_matrix(form, value_field)
        firsts = inter[inter[self.item_list_length_field] == 1]
        columns = {}
        for field in inter.interaction:
            if field == self.item_list_length_field:
                continue
            # A row of length 1 adds the interaction before it (its history's only item); uid stays the row's.
            extra = firsts[field] if field == self.uid_field else self.inter_feat.base[field][firsts.ends - 1]
            columns[field] = torch.cat([inter[field], extra])
        return self._create_sparse_matrix(Interaction(columns), self.uid_field, self.iid_field, form, value_field)

    def counter(self, field):
        """RecBole's token counter; for every-position rows it counts every target, as the per-prefix rows would
        (RecBole's popularity metrics read ``item_counter`` of the training set)."""
        inter = self.inter_feat
        if not isinstance(inter, WindowInteraction) or inter.train_mode != "every_position" or field not in inter.base:
            return super().counter(field)
        if self.field2type[field] != FeatureType.TOKEN:
            raise ValueError(f"Field [{field}] is not a token field.")
        first_target = inter.ends - inter.lengths + 1
        offsets = torch.cumsum(inter.lengths, 0) - inter.lengths
        steps = torch.arange(int(inter.lengths.sum())) - torch.repeat_interleave(offsets, inter.lengths)
        targets = torch.repeat_interleave(first_target, inter.lengths) + steps
        return Counter(inter.base[field][targets].numpy())

    def every_position(self):
        """A copy whose rows are the windows of each user's training history (``seq_train_mode: every_position``).

        Call on the training split. A user's targets here are consecutive interactions ``h_f .. h_l`` (the split
        keeps each user's earliest ones); the inputs are the items before them, ``h_{f-1} .. h_{l-1}``. Cut
        from the end backwards into windows of at most L inputs, so every target is in exactly one row.
        A row: ``item_id_list`` (and every other ``*_list``) = its inputs, ``target_item_id_list`` = the next
        item at each input position, ``item_length`` = number of inputs; its plain fields are those of its last
        target.
        """
        inter = self.inter_feat
        if not isinstance(inter, WindowInteraction) or inter.train_mode != "per_prefix":
            raise ValueError("every_position() needs the per-prefix training split of a WindowSequentialDataset")
        order = torch.argsort(inter.ends)
        ends, uid = inter.ends[order], inter[self.uid_field][order]
        new_user = torch.ones(len(ends), dtype=torch.bool)
        new_user[1:] = uid[1:] != uid[:-1]
        group_first = torch.nonzero(new_user).reshape(-1)
        counts = torch.diff(group_first, append=torch.tensor([len(ends)]))
        first_end, last_end = ends[group_first], ends[group_first + counts - 1]
        gaps = torch.nonzero(last_end - first_end + 1 != counts).reshape(-1)
        if len(gaps):
            raise ValueError(
                "seq_train_mode every_position needs each user's training interactions to be consecutive in time; "
                f"user id {int(uid[group_first[gaps[0]]])} has gaps (eval_args split "
                f"{self.config['eval_args']['split']}). Use a per-user split such as LS or RS grouped by user."
            )
        # Users in the order of their first training row in the split (RecBole's row order), windows in time order.
        first_row = torch.full((len(counts),), len(order), dtype=torch.long)
        group_of_row = torch.cumsum(new_user.long(), 0) - 1
        first_row.scatter_reduce_(0, group_of_row, order, reduce="amin")
        users = torch.argsort(first_row)
        counts, last_end = counts[users], last_end[users]
        max_len = self.max_item_list_len
        windows = (counts + max_len - 1) // max_len
        user_of_window = torch.repeat_interleave(torch.arange(len(counts)), windows)
        offset = torch.cumsum(windows, 0) - windows
        from_end = windows[user_of_window] - 1 - (torch.arange(int(windows.sum())) - offset[user_of_window])
        w_ends = last_end[user_of_window] - from_end * max_len
        w_lengths = torch.clamp(counts[user_of_window] - from_end * max_len, max=max_len)
        rows = {field: inter.base[field][w_ends] for field in inter.interaction if field in inter.base}
        rows[self.item_list_length_field] = w_lengths
        list_fields = dict(inter.list_fields)
        list_fields[target_list_field(self.config)] = (self.iid_field, 1)
        nxt = self.copy(WindowInteraction(rows, inter.base, list_fields, w_ends, w_lengths, max_len,
                                          "every_position"))
        nxt.set_field_property(target_list_field(self.config), *self._list_property(self.iid_field))
        return nxt

    def target_count(self):
        """Training targets of these rows: the sum of the row lengths for every-position rows, else one a row."""
        inter = self.inter_feat
        if isinstance(inter, WindowInteraction) and inter.train_mode == "every_position":
            return int(inter.lengths.sum())
        return len(inter)

    def _list_property(self, field):
        list_field = getattr(self, f"{field}_list_field")
        return self.field2type[list_field], self.field2source[list_field], self.field2seqlen[list_field]


class EveryPositionTrainDataLoader(TrainDataLoader):
    """RecBole's train loader over every-position rows, with ``train_batch_size`` counting targets, as RecBole's.

    A row holds up to L targets, so a batch of ``train_batch_size`` rows would train up to L times as many
    targets a step as per-prefix training (at L = 200 and batch 2048 one step is an epoch of ml-100k). A batch
    takes ``max(1, round(train_batch_size * rows / targets))`` rows instead: about ``train_batch_size`` targets,
    and about as many steps an epoch as per-prefix training, so learning rate, batch size and patience carry
    over between the modes. ``config["train_batch_size"]`` stays as given (RecBole logs and saves the config).
    ``update_config`` (RecBole calls it on loaded dataloaders) keeps the rule; under multi-process training
    RecBole's ``AbstractDataLoader.__init__`` then divides the rows among the processes, as it divides the
    per-prefix batch. (RecBole gives every sequential model a ``TrainDataLoader``; a module-level class keeps
    saved dataloaders loadable.)
    """

    def _init_batch_size_and_step(self):
        # every_position is refused with negative sampling (check_data_config): no negatives to fit in a batch.
        targets, rows = self._dataset.target_count(), len(self._dataset)
        per_batch = max(1, round(self.config["train_batch_size"] * rows / max(targets, 1)))
        self.step = per_batch
        self.set_batch_size(per_batch)
        getLogger().info(
            f"every_position: train_batch_size {self.config['train_batch_size']} targets -> {per_batch} windows "
            f"per batch (mean {targets / max(rows, 1):.1f} targets a window)")


def _saved_dataset_file(config):
    return config["dataset_save_path"] or os.path.join(
        config["checkpoint_dir"], f"{config['dataset']}-{WindowSequentialDataset.__name__}.pth")


def create_dataset(config):
    """The dataset for ``config``: :class:`WindowSequentialDataset` under ``seq_pipeline: windows``, else RecBole's.

    Like RecBole, a dataset saved earlier (``save_dataset``) is reused when its dataset arguments match.
    """
    check_data_config(config)
    if not uses_windows(config):
        return recbole_create_dataset(config)
    path = _saved_dataset_file(config)
    if os.path.exists(path):
        with open(path, "rb") as f:
            saved = pickle.load(f)
        if isinstance(saved, WindowSequentialDataset) and all(
                config[arg] == saved.config[arg] for arg in dataset_arguments + ["seed", "repeatable"]):
            getLogger().info(set_color("Load filtered dataset from", "pink") + f": [{path}]")
            return saved
    dataset = WindowSequentialDataset(config)
    if config["save_dataset"]:
        dataset.save()
    return dataset


def data_preparation(config, dataset):
    """``train_data, valid_data, test_data`` with RecBole's dataloaders; every-position rows when configured."""
    check_data_config(config)
    mode = seq_train_mode(config)
    if not isinstance(dataset, WindowSequentialDataset) or mode == "per_prefix" and not config["save_dataloaders"]:
        return recbole_data_preparation(config, dataset)
    loaded = load_split_dataloaders(config)
    if loaded is not None and getattr(loaded[0]._dataset.inter_feat, "train_mode", None) == mode:
        dataset._change_feat_format()
        return loaded
    built = dataset.build()
    samplers = create_samplers(config, dataset, built)  # from the per-prefix splits: RecBole's used items
    train_dataset, valid_dataset, test_dataset = built
    if mode == "every_position":
        train_dataset = train_dataset.every_position()
    train_loader = EveryPositionTrainDataLoader if mode == "every_position" else get_dataloader(config, "train")
    train_data = train_loader(config, train_dataset, samplers[0], shuffle=config["shuffle"])
    valid_data = get_dataloader(config, "valid")(config, valid_dataset, samplers[1], shuffle=False)
    test_data = get_dataloader(config, "test")(config, test_dataset, samplers[2], shuffle=False)
    if config["save_dataloaders"]:
        save_split_dataloaders(config, dataloaders=(train_data, valid_data, test_data))
    getLogger().info(set_color("[Training]: ", "pink") + f"seq_train_mode = {mode}, "
                     f"{len(train_dataset)} rows, train_batch_size = {config['train_batch_size']}")
    return train_data, valid_data, test_data
