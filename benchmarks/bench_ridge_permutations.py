"""Benchmark: the ridge baseline's permutation test vs scikit-learn refits.

Baseline: for every permutation, refit ``make_pipeline(StandardScaler(), RidgeCV(alphas,
cv=5))`` in every fold (what a user would write with scikit-learn). dfrn prepares each fold
once and solves all permuted targets together. Both give the same predictions (see
tests/test_baseline.py); this prints the time per permutation of each and their ratio,
measured side by side in one run.

    python benchmarks/bench_ridge_permutations.py [--subjects 116] [--features 100] [--perms 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dfrn.evaluation.folds import iter_splits, make_fold_plan
from dfrn.evaluation.permutation import permutation_indices, permutation_test
from dfrn.models.ridge import DEFAULT_ALPHAS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=116)
    ap.add_argument("--features", type=int, default=100)
    ap.add_argument("--perms", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ids = [f"s{i:03d}" for i in range(args.subjects)]
    X = pd.DataFrame(rng.standard_normal((args.subjects, args.features)), index=ids)
    X.columns = [f"roi_{j}" for j in range(args.features)]
    y = pd.DataFrame({"f": X.iloc[:, 0] + rng.standard_normal(args.subjects)}, index=ids)
    plan = make_fold_plan(ids, 10, 1, seed=0)

    t = time.perf_counter()
    for perm in permutation_indices(len(ids), args.perms, 0):
        yp = y["f"].to_numpy()[perm]
        for _, _, train, test in iter_splits(plan):
            tr = X.index.get_indexer(train)
            te = X.index.get_indexer(test)
            m = make_pipeline(StandardScaler(), RidgeCV(alphas=DEFAULT_ALPHAS, cv=5))
            m.fit(X.iloc[tr], yp[tr]).predict(X.iloc[te])
    sk = (time.perf_counter() - t) / args.perms

    t = time.perf_counter()
    permutation_test(X, y, plan, n_perm=args.perms, seed=0, progress=False)
    ours = (time.perf_counter() - t) / args.perms

    print(f"{args.subjects} subjects x {args.features} ROIs, 10 folds, {args.perms} permutations")
    print(f"scikit-learn StandardScaler+RidgeCV refits (baseline): {1000 * sk:.1f} ms per permutation")
    print(f"dfrn permutation_test:                                 {1000 * ours:.1f} ms per permutation")
    print(f"speed-up: {sk / ours:.1f}x")


if __name__ == "__main__":
    main()
