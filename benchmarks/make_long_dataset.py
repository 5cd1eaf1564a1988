"""Seeded generator of RecBole atomic files with long histories and planted long-range structure.

Writes ``OUT/NAME/NAME.inter`` (``user_id:token item_id:token timestamp:float``, tab separated) and
``OUT/NAME/NAME.json`` (the arguments, to recognise a set made before). Every user has exactly ``--history``
interactions; users ``0 .. U-1``, items ``0 .. N-1``. Ids are written zero-padded to a fixed width (tokens,
so ``00042`` is just the name of user 42); the timestamp of a user's ``t``-th interaction is ``t``.

What it plants (all draws from ``numpy.random.default_rng(seed)``):

1. The ``N`` items form ``--clusters K`` interests of ``S = N // K`` consecutive ids (items beyond ``K * S``
   appear only as noise).
2. Each user has ``--interests m`` distinct interests. For each of them the user has a private **cycle**: ``C =
   --cycle`` distinct items of that interest in a random order, entered at a random offset.
3. The history is a run of **episodes** whose lengths are uniform in ``[--episode_min, --episode_max]``. The
   episodes visit the user's interests round-robin in a fixed random order, so each interest comes back every
   ``m`` episodes, after a gap of the other ``m - 1`` episodes.
4. ``--draws cycle`` (the default): an episode continues its interest's cycle exactly where that interest's
   previous episode stopped. So the item after ``x`` is, for this user, the item that followed ``x`` the last
   time the user met ``x``: about ``C`` steps back in that interest, i.e. about ``m * C`` steps back in the
   history (``3 * 128 = 384`` with the defaults), and never within the last ``C`` steps of the interest. A
   model that sees less than that can tell the interest from recent items but must guess among its ``S``
   items; one that sees further can copy (an induction rule: find the previous occurrence, take its successor).
   ``--draws random``: every item of an episode is a uniform draw (with replacement) from the interest's ``C``
   items, the user's favourites in it. The next item is then one of the favourites, which the user's earlier
   episodes of the interest show: with many interests (``m`` episodes a round) those lie further back than a
   short window reaches, which sees only the items drawn so far in the current episode. A model that sees
   them needs no order, only which items of the interest the user chose before (a bag of the past).
5. Noise: each interaction is, with probability ``--noise``, replaced by a uniform random item (the cycle
   still advances under it, so the structure resumes right after).

Measured by :func:`copy_rule` (cycles): the share of positions whose item equals the successor of the previous
occurrence of the item before it, and the distance back to that occurrence; by :func:`last_seen` (random draws):
how far back each position's item last occurred, so the share a window of ``L`` items can see; by
:func:`window_rule_recall`: Recall@10 of a rule with no training that ranks the items of the current interest
by how often they occur in the last ``L`` items, what a window of ``L`` gives without learning anything;
:func:`window_report` (``--report L ...``): both for the test items (each history's last), per window length.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

DEFAULTS = {"clusters": 50, "interests": 3, "cycle": 128, "episode_min": 16, "episode_max": 48, "noise": 0.05,
            "draws": "cycle"}
DRAWS = ("cycle", "random")


def generate(users, history, items, seed, clusters=50, interests=3, cycle=128, episode_min=16, episode_max=48,
             noise=0.05, draws="cycle"):
    """``(U, H)`` int64 item ids of every user's history, in time order (see the module docstring)."""
    size = items // clusters
    if clusters < 1 or size < 1 or not 1 <= interests <= clusters or not 1 <= cycle <= size:
        raise ValueError(f"need 1 <= interests ({interests}) <= clusters ({clusters}) and 1 <= cycle ({cycle}) <= "
                         f"items // clusters ({size})")
    if not 1 <= episode_min <= episode_max or not 0 <= noise <= 1 or users < 1 or history < 1:
        raise ValueError("need users, history >= 1, 1 <= episode_min <= episode_max and 0 <= noise <= 1")
    if draws not in DRAWS:
        raise ValueError(f"draws is {draws!r}; allowed: {', '.join(DRAWS)}")
    rng = np.random.default_rng(seed)
    # Interests of each user (distinct clusters), in the round-robin order the episodes visit them.
    chosen = rng.permuted(np.tile(np.arange(clusters), (users, 1)), axis=1)[:, :interests]  # (U, m)
    # Each (user, interest) cycle: the first C of a random permutation of the cluster's S items.
    cycles = rng.permuted(np.tile(np.arange(size), (users, interests, 1)), axis=2)[:, :, :cycle]
    cycles = chosen[:, :, None] * size + cycles  # (U, m, C) item ids
    offsets = rng.integers(0, cycle, (users, interests))

    episodes = history // episode_min + 1  # enough episodes to cover the history
    episodes += (-episodes) % interests  # whole rounds, so episodes reshape into (rounds, m)
    lengths = rng.integers(episode_min, episode_max + 1, (users, episodes))
    starts = np.cumsum(lengths, axis=1) - lengths  # (U, E) first position of each episode
    # Steps already taken in the same interest before each episode: sum of that interest's earlier episodes.
    rounds = lengths.reshape(users, -1, interests)
    before = (np.cumsum(rounds, axis=1) - rounds).reshape(users, episodes)

    # Episode of every position: mark episode starts, cumulative sum.
    marks = np.zeros((users, history + 1), dtype=np.int32)
    inside = starts < history
    rows = np.broadcast_to(np.arange(users)[:, None], starts.shape)
    marks[rows[inside], starts[inside]] = 1
    episode = np.cumsum(marks[:, :history], axis=1, dtype=np.int32) - 1  # (U, H); int32 cumsum is much faster
    position = np.arange(history)[None, :]
    slot = episode % interests
    user = np.arange(users)[:, None]
    if draws == "cycle":
        step = np.take_along_axis(before, episode, 1) + position - np.take_along_axis(starts, episode, 1)
        index = (offsets[user, slot] + step) % cycle
    else:  # drawn after everything the cycles use, so a cycle set is the same with or without this option
        index = rng.integers(0, cycle, (users, history))
    result = cycles[user, slot, index]
    if noise > 0:
        noisy = rng.random((users, history)) < noise
        result[noisy] = rng.integers(0, items, int(noisy.sum()))
    return result


def copy_rule(histories):
    """How well "the next item is what followed the previous item last time" predicts, and how far back that is.

    ``histories`` (U, H). Returns ``(hit_rate, distances)``: over positions ``t`` whose previous item
    ``x_{t-1}`` occurred before (last at ``s``), the share with ``x_t == x_{s+1}``, and how far back the item to
    copy lies, ``t - (s + 1)``.
    """
    hits, distances = [], []
    for row in histories:
        last = {}
        for t in range(1, len(row)):
            prev = row[t - 1]
            if prev in last:
                s = last[prev]
                hits.append(row[s + 1] == row[t])
                distances.append(t - s - 1)
            last[prev] = t - 1
    return float(np.mean(hits)) if hits else 0.0, np.array(distances)


def last_seen(histories):
    """How far back each position's item last occurred in the same history: ``(U, H)`` int64, ``t - s`` for the
    latest ``s < t`` with the same item, ``-1`` where the item is new. A window of ``L`` items sees the item's
    earlier occurrence where ``1 <= distance <= L``."""
    users, history = histories.shape
    user, item, time_ = np.repeat(np.arange(users), history), histories.ravel(), np.tile(np.arange(history), users)
    order = np.lexsort((time_, item, user))  # by user, then item, then time
    flat_user, flat_item, flat_time = user[order], item[order], time_[order]
    same = (flat_user[1:] == flat_user[:-1]) & (flat_item[1:] == flat_item[:-1])
    out = np.full(users * history, -1, dtype=np.int64)
    out[order[1:][same]] = (flat_time[1:] - flat_time[:-1])[same]
    return out.reshape(users, history)


def window_rule_recall(histories, window, size, positions, k=10):
    """Recall@``k`` at the given ``positions`` of each history of a rule that sees the last ``window`` items: the
    interest is that of the item before (ids ``// size``), and its items in the window are ranked by count,
    ties by recency. ``histories`` ``(U, H)``; one hit or miss per (user, position)."""
    hits = []
    for row in histories:
        for t in positions:
            seen = row[max(0, t - window):t]
            seen = seen[seen // size == row[t - 1] // size]
            counts = {}
            for age, item in enumerate(seen):  # later occurrences overwrite: recency breaks ties
                counts[item] = (counts.get(item, (0, 0))[0] + 1, age)
            ranked = sorted(counts, key=counts.get, reverse=True)[:k]
            hits.append(row[t] in ranked)
    return float(np.mean(hits))


def window_report(histories, lengths, size, rule_users=300):
    """What windows of each length in ``lengths`` can see of the test item (each history's last item, RecBole's
    leave-one-out test target): one dict per length with ``test_item_in_window`` (share of users whose test item
    occurred among their previous ``L`` items) and ``rule_recall@10`` (:func:`window_rule_recall` at the test
    position, on the first ``rule_users`` users; ``size`` items an interest)."""
    distance = last_seen(histories)[:, -1]
    last = histories.shape[1] - 1
    return [{"L": L, "test_item_in_window": round(float(np.mean((distance >= 1) & (distance <= L))), 4),
             "rule_recall@10": round(window_rule_recall(histories[:rule_users], L, size, [last]), 4)}
            for L in lengths]


def _digits(values, width):
    """(n, width) uint8 ASCII of non-negative ints, zero-padded."""
    out = np.empty((len(values), width), dtype=np.uint8)
    values = values.astype(np.int64)
    for column in range(width - 1, -1, -1):  # one pass per digit, vectorised over the rows
        values, digit = np.divmod(values, 10)
        out[:, column] = digit + ord("0")
    return out


def write_inter(path, histories, chunk_rows=2_000_000):
    """Write the atomic file: fixed-width rows assembled as bytes with numpy (no Python loop per row)."""
    users, history = histories.shape
    widths = [len(str(max(users - 1, 1))), len(str(max(int(histories.max()), 1))), len(str(max(history - 1, 1)))]
    tab, newline = np.full((1, 1), ord("\t"), np.uint8), np.full((1, 1), ord("\n"), np.uint8)
    per_chunk = max(1, chunk_rows // history)
    with open(path, "wb") as f:
        f.write(b"user_id:token\titem_id:token\ttimestamp:float\n")
        for first in range(0, users, per_chunk):
            block = histories[first:first + per_chunk]
            n = block.size
            columns = (np.repeat(np.arange(first, first + len(block)), history), block.reshape(-1),
                       np.tile(np.arange(history), len(block)))
            parts = []
            for column, width, end in zip(columns, widths, (tab, tab, newline)):
                parts += [_digits(column, width), np.broadcast_to(end, (n, 1))]
            np.concatenate(parts, axis=1).tofile(f)


def make(users, history, items, seed, out, name="long", histories=None, **options):
    """Generate and write ``out/name/name.inter`` unless a set with the same arguments is there; returns its folder.
    ``histories``: what :func:`generate` gives for these arguments, when the caller has it already."""
    options = {**DEFAULTS, **options}
    args = {"users": users, "history": history, "items": items, "seed": seed, **options}
    folder = os.path.join(out, name)
    meta, inter = os.path.join(folder, f"{name}.json"), os.path.join(folder, f"{name}.inter")
    if os.path.isfile(meta) and os.path.isfile(inter):
        with open(meta) as f:
            if json.load(f) == args:
                return folder
    os.makedirs(folder, exist_ok=True)
    if histories is None:
        histories = generate(users, history, items, seed, **options)
    write_inter(inter + ".part", histories)
    os.replace(inter + ".part", inter)
    with open(meta, "w") as f:
        json.dump(args, f, indent=1)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--history", type=int, required=True, help="interactions per user")
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder that gets NAME/NAME.inter (a RecBole data_path)")
    parser.add_argument("--name", default="long")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value, choices=DRAWS if key == "draws" else None)
    parser.add_argument("--report", type=int, nargs="+", metavar="L", default=[],
                        help="also print, for each window length L, what it sees of the test items "
                             "(window_report: one JSON line per L)")
    args = vars(parser.parse_args(argv))
    report = args.pop("report")
    if any(L < 1 for L in report):
        parser.error(f"--report lengths must be >= 1, got {report}")
    start = time.perf_counter()
    options = {key: args[key] for key in DEFAULTS}
    try:  # the report needs the histories even where the set is on disk already; generated once either way
        histories = (generate(args["users"], args["history"], args["items"], args["seed"], **options) if report
                     else None)
        folder = make(**args, histories=histories)
    except ValueError as err:
        parser.error(str(err))
    print(f"{folder}: {args['users']} users x {args['history']} in {time.perf_counter() - start:.1f} s")
    if report:
        for row in window_report(histories, report, args["items"] // args["clusters"]):
            print(json.dumps(row))


if __name__ == "__main__":
    sys.exit(main())
