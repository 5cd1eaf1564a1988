"""How often LTIS picks each past block, for the selection rules considered in issue 12 (CPU, seconds).

Random queries and keys (reference sizes: head dim 16, 8 query heads, 2 kv heads, compression blocks 32 /
stride 16, selection blocks 16, top 4) through the frozen compression at its initialisation. For every query
with more past blocks than it may pick, the rate at which each past block is chosen is divided by the uniform
share ``4 / (number of past blocks)``; the table gives that ratio for block 0, for the block just before the
query's own, and the range over all blocks.

* ``sum``: a selection block scores the sum of the probabilities of its visible overlapping compressed
  blocks (the rule before issue 12: block 0 and the latest block have one such block, the others two);
* ``mean``: the mean of them (the rule in use);
* ``one-to-one``: selection block ``j`` scores compressed block ``j`` alone (the authors' mapping).

    python benchmarks/selection_rates.py --lengths 200 512
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_blossom.ltis import LTIS  # noqa: E402
from recbole_blossom.ops import naive  # noqa: E402


def scores(rule, q, k_cmp, mem, L):
    t = torch.arange(L)
    n_slc = -(-L // 16)
    mean = naive.selection_scores(q, k_cmp, mem, t, 32, 16, 16, n_slc, 0.25)
    visible = naive.compressed_visibility(t, k_cmp.shape[2], 32, 16).float()
    count = visible @ naive.overlap_matrix(k_cmp.shape[2], n_slc, 32, 16, 16)
    if rule == "mean":
        return mean
    if rule == "sum":
        return mean * count.clamp_min(1.0)
    # one-to-one: the probability of compressed block j (0 while it is not visible)
    total = mean * count.clamp_min(1.0)  # probs @ overlap; recover the per-block probabilities below
    probs = torch.zeros_like(total)
    n_cmp = k_cmp.shape[2]
    for j in range(n_slc):  # compressed block j overlaps selection blocks j and j + 1: peel from the left
        if j < n_cmp:
            probs[..., j] = total[..., j] - (probs[..., j - 1] if j > 0 else 0.0)
    return probs


def rates(rule, L, reps, batch=16):
    torch.manual_seed(0)
    ltis = LTIS(16, 2)
    own = torch.arange(L) // 16
    n_slc = int(own[-1]) + 1
    chosen = torch.zeros(L, n_slc)
    for rep in range(reps):
        gen = torch.Generator().manual_seed(rep)
        q, k = torch.randn(batch, 8, L, 16, generator=gen), torch.randn(batch, 2, L, 16, generator=gen)
        s = scores(rule, q, ltis.compressor(k), ltis.memory_key, L)
        s = s.masked_fill(~(torch.arange(n_slc)[None, :] < own[:, None]), float("-inf"))
        top = s.topk(4, dim=-1).indices
        chosen += torch.zeros(batch, 2, L, n_slc).scatter_(-1, top, 1.0).sum((0, 1))
    rows = own > 4
    ratio = (chosen[rows] / (reps * batch * 2)) / (4.0 / own[rows].float())[:, None]
    per_block = [ratio[own[rows] > j, j].mean().item() for j in range(n_slc - 1)]
    latest = ratio[torch.arange(ratio.shape[0]), own[rows] - 1].mean().item()
    return per_block[0], latest, min(per_block), max(per_block)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 512])
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    print("| rule | L | block 0 / uniform | latest past block / uniform | all blocks: min - max |")
    print("|---|---|---|---|---|")
    for L in args.lengths:
        for rule in ("sum", "one-to-one", "mean"):
            first, latest, lo, hi = rates(rule, L, args.reps)
            print(f"| {rule} | {L} | {first:.2f} | {latest:.2f} | {lo:.2f} - {hi:.2f} |", flush=True)


if __name__ == "__main__":
    main()
