"""Region ablation cost: batched regions per forward pass against one region per pass.

Baseline: captum ``FeatureAblation`` with ``perturbations_per_eval=1`` (one region ablated
per forward pass of the held-out batch). dfrn: :func:`dfrn.interpret.ablation.ablation_changes`
(the same captum call, 8 regions per pass; the library then picks 8 below a million
input voxels and 1 above, from this benchmark). Both on the DFRN network with random weights, on
the same inputs and regions, measured side by side; the results are checked equal.

It also prints the forward-pass cost per (subject, region) and projects the cost of one
study: (regions + 1) × held-out subjects forward passes per fold, summed over folds = regions
× subjects per repeat and factor.

Run::

    python benchmarks/bench_ablation.py --shape 23 28 23 --subjects 24 --regions 65
    python benchmarks/bench_ablation.py --shape 182 218 182 --subjects 2 --regions 4 \\
        --project-subjects 116 --project-regions 170
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from dfrn.interpret.ablation import RegionGrid, ablation_changes
from dfrn.models.network import DFRN


def _grid(shape: tuple[int, int, int], n_regions: int) -> RegionGrid:
    """``n_regions`` equal chunks of the voxels in raster order (background: the first 10%)."""
    flat = np.zeros(int(np.prod(shape)), dtype=np.int64)
    start = len(flat) // 10
    flat[start:] = 1 + (np.arange(len(flat) - start) * n_regions) // (len(flat) - start)
    labels = flat.reshape(shape)
    table = pd.DataFrame({"index": np.arange(1, n_regions + 1),
                          "name": [f"r{k}" for k in range(n_regions)]})
    return RegionGrid(labels, table.assign(n_voxels=[int((labels == i).sum())
                                                     for i in table["index"]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[23, 28, 23])
    ap.add_argument("--subjects", type=int, default=24, help="held-out subjects of one fold")
    ap.add_argument("--regions", type=int, default=65)
    ap.add_argument("--project-subjects", type=int, default=116)
    ap.add_argument("--project-regions", type=int, default=170)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DFRN().eval()
    x = torch.randn(args.subjects, 1, *args.shape)
    grid = _grid(tuple(args.shape), args.regions)

    from captum.attr import FeatureAblation

    mask = torch.as_tensor(grid.labels)[None, None].expand_as(x)
    t0 = time.perf_counter()
    with torch.no_grad():
        FeatureAblation(lambda t: model(t).reshape(len(t))).attribute(
            x, baselines=0.0, feature_mask=mask, perturbations_per_eval=1)
    baseline_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ablation_changes(model, x, grid, 0.0, regions_per_pass=8)
    dfrn_s = time.perf_counter() - t0
    passes = (args.regions + 1) * args.subjects  # + the background label and the intact pass
    per = dfrn_s / passes
    print(f"input {tuple(args.shape)}, {args.subjects} subjects, {args.regions} regions, "
          f"{args.threads} threads")
    print(f"baseline (captum, 1 region per pass): {baseline_s:.2f} s")
    print(f"dfrn (captum, 8 regions per pass):    {dfrn_s:.2f} s")
    print(f"ratio baseline/dfrn: {baseline_s / dfrn_s:.2f}x")
    print(f"forward cost per (subject, region): {1000 * per:.1f} ms")
    total = per * (args.project_regions + 1) * args.project_subjects
    print(f"projected per repeat and factor, {args.project_subjects} subjects x "
          f"{args.project_regions} regions: {total:.0f} s ({total / 3600:.2f} h) on this machine")


if __name__ == "__main__":
    main()
