"""Training that learns before it stops: stopping rules and BatchNorm statistics, measured.

Three synthetic cohorts with subtle effects that a network learns late, each with an age
confound (age drives a broad gray-matter atrophy and enters the target):

- ``shape``: a local shape change (the hippocampus shrinks by a smooth radial displacement
  of 2 mm per SD of the planted score);
- ``gm``: a local gray-matter change (the hippocampus darkens by 6% per SD);
- ``distributed``: the target is the mean of five planted scores, each darkening its own
  region by 6% per SD (insula, hippocampus, brainstem, caudate, cerebellum).

Target = planted score (z) + 0.5 × z(age) + 0.5 × noise; covariates age and sex are
regressed out of the target in each training fold (``[confounds] target = "residualize"``),
as a user asking "beyond age and sex" runs it. Network input 8 mm (built at 4 mm, block
averaged by 2), 90 subjects, 3-fold CV, ``--epochs`` epochs, ``--widen`` channels.

Each (cohort, seed, fold) trains two networks: one with the 10% inner validation split
(6 subjects) and one on every training subject. Per epoch the first records its validation
loss and test predictions under both BatchNorm statistics (PyTorch's running averages, and
recomputed over the training subjects with the output centred); the rules are then replayed
on the same trajectory, so they differ only in the epoch they keep (and ``voxel_ridge``,
dfrn's voxel-wise ridge, on the same inputs, folds and residualised targets):

- ``val`` (the paper's rule, dfrn's default before), ``smoothed`` (min_epochs 10), both with
  patience 10 and the running or the recomputed statistics;
- ``fold-mean``: one epoch for all folds, the lowest of the folds' validation curves
  averaged (3-epoch median), from their inner splits only;
- ``fixed``: the second network, all ``--epochs`` epochs (``early_stopping = "none"``, and
  what ``auto`` does when the split would hold fewer than 20 subjects).

Printed per cohort and rule: pooled r and partial r (beyond age and sex) of the out-of-fold
predictions with the target, mean per-fold r, mean kept epoch and seconds per fold;
then each rule minus ``val+running`` paired over seeds. Every fit's row goes to ``--out``
(resumes).

Run::

    python benchmarks/bench_learning.py --seeds 5 --epochs 50 --threads 1 --out rows.tsv
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import KFold

from dfrn.data.images import block_downsample, normalise
from dfrn.data.synth import FACTORS, make_synthetic_cohort
from dfrn.models.early_stopping import EarlyStopping
from dfrn.models.regressor import DFRNRegressor
from dfrn.models.ridge import DEFAULT_ALPHAS, KernelRidgeCV, voxel_gram

RULES = ("val+running", "smoothed+running", "val+recompute", "smoothed+recompute",
         "fold-mean+recompute", "fixed+running", "fixed+recompute")


@dataclass
class Cohort:
    name: str
    volumes: list[np.ndarray]
    target: np.ndarray
    covariates: np.ndarray


def _cohort(name: str, root: Path, n: int) -> Cohort:
    folder = root / name
    kw = ({"displacement": 2.0} if name == "shape" else {"effect": 0.06})
    if not (folder / "participants.tsv").exists():
        make_synthetic_cohort(folder, n_subjects=n, voxel_size=4.0, seed=5, age_effect=0.05,
                              radius=14.0,
                              **kw)
    table = pd.read_csv(folder / "participants.tsv", sep="\t")
    mask = block_downsample(nib.load(folder / "brain_mask.nii.gz").get_fdata(), 2) > 0.5
    vols = [normalise(block_downsample(nib.load(folder / f).get_fdata(dtype=np.float32), 2),
                      mask) for f in table["t1"]]
    planted = (table[list(FACTORS)].mean(axis=1) * np.sqrt(len(FACTORS))
               if name == "distributed" else table["anhedonia"]).to_numpy(float)
    z_age = ((table["age"] - table["age"].mean()) / table["age"].std()).to_numpy()
    noise = np.random.default_rng([5, 9]).standard_normal(len(table))
    covs = np.column_stack([table["age"], (table["sex"] == "M").astype(float)])
    return Cohort(name, vols, planted + 0.5 * z_age + 0.5 * noise, covs)


class _Recorder(DFRNRegressor):
    """A regressor that records its validation loss and test predictions under the running
    and the recomputed BatchNorm statistics: every epoch, or (``every = False``) after the
    last one. Training is unchanged: the running statistics are put back each time."""

    test_volumes: list[np.ndarray]
    every: bool = True

    def _val_loss(self, loop) -> float:
        self.calls_ = getattr(self, "calls_", 0) + 1
        if not self.every and self.calls_ < self.epochs:
            return float("nan")
        saved = {k: v.clone() for k, v in self.model_.state_dict().items()}
        row = {"val_running": self._scaled_loss(loop), "test_running": self._test()}
        self.bn_stats = "recompute"
        self._recompute_bn(loop)
        row["val_recompute"] = self._scaled_loss(loop)
        self._centre_output(loop)
        row["test_recompute"] = self._test()
        self.bn_stats = "running"
        self.model_.load_state_dict(saved)  # training goes on as without the record
        self.trace_.append(row)
        return row["val_running"]

    def _scaled_loss(self, loop) -> float:
        if not len(self.val_ids_):
            return float("nan")
        pv = self._predict_scaled(loop.volumes, self.val_ids_, loop.feeder, loop.step_model)
        return float(np.mean((pv[:, 0] - loop.ys[self.val_ids_, 0].numpy()) ** 2))

    def _test(self) -> np.ndarray:
        scaled = self._predict_scaled(self.test_volumes, range(len(self.test_volumes)))
        return scaled[:, 0] * self.y_std_ + self.y_mean_


def _train(c: Cohort, train: np.ndarray, test: np.ndarray, y: np.ndarray, seed: int,
           epochs: int, widen: float, split: bool) -> tuple[list[dict], float]:
    """One network's records: per epoch (with a split) or after the last epoch."""
    est = _Recorder(epochs=epochs, seed=seed, widen_factor=widen, voxel_mm=8.0,
                    early_stopping="val" if split else "none", patience=epochs + 1,
                    val_fraction=0.1, bn_stats="running", device="cpu")
    est.trace_, est.test_volumes, est.every = [], [c.volumes[i] for i in test], split
    t0 = time.perf_counter()
    est.fit([c.volumes[i] for i in train], y[train])
    return est.trace_, time.perf_counter() - t0


def _replay(trace: list[dict], rule: str, stats: str) -> int:
    """The epoch a stopping rule keeps, replayed on the recorded validation losses."""
    stopper = EarlyStopping(rule, patience=10, min_epochs=10)
    for row in trace:
        if stopper.update(row[f"val_{stats}"]).stop:
            break
    return max(stopper.best_epoch_, 0)


def _fold_mean_epoch(traces: list[list[dict]]) -> int:
    curves = np.array([[row["val_recompute"] for row in t] for t in traces]).mean(axis=0)
    smooth = [statistics.median(curves[max(0, e - 2): e + 1]) for e in range(len(curves))]
    start = min(9, len(smooth) - 1)  # as smoothed: never before epoch 10
    return int(np.argmin(smooth[start:]) + start)


def _residual(covs: np.ndarray, v: np.ndarray) -> np.ndarray:
    return v - LinearRegression().fit(covs, v).predict(covs)


def _score(c: Cohort, folds: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
           preds: list[np.ndarray]) -> dict:
    """Pooled r with the (fold-residualised) target, partial r beyond the covariates, and
    the mean per-fold r."""
    pooled_pred = np.empty(len(c.target))
    pooled_true = np.empty(len(c.target))
    fold_r = []
    for (_, test, y_res), p in zip(folds, preds, strict=True):
        pooled_pred[test], pooled_true[test] = p, y_res[test]
        fold_r.append(np.corrcoef(p, y_res[test])[0, 1])
    partial = np.corrcoef(_residual(c.covariates, pooled_pred),
                          _residual(c.covariates, c.target))[0, 1]
    return {"r": np.corrcoef(pooled_pred, pooled_true)[0, 1], "partial_r": partial,
            "fold_r": float(np.mean(fold_r))}


def _run_seed(c: Cohort, seed: int, epochs: int, widen: float) -> list[dict]:
    folds, split, fixed, seconds = _folds(c, seed), [], [], []
    for train, test, y_res in folds:
        trace, s1 = _train(c, train, test, y_res, seed, epochs, widen, split=True)
        last, s2 = _train(c, train, test, y_res, seed, epochs, widen, split=False)
        split.append(trace)
        fixed.append(last[-1])
        seconds.append(s1 + s2)
    rows = []
    for rule in RULES:
        name, stats = rule.split("+")
        if name == "fixed":
            epochs_kept = [epochs - 1] * 3
            preds = [f[f"test_{stats}"] for f in fixed]
        else:
            e_all = _fold_mean_epoch(split) if name == "fold-mean" else None
            epochs_kept = [e_all if e_all is not None else _replay(t, name, stats)
                           for t in split]
            preds = [t[e][f"test_{stats}"] for t, e in zip(split, epochs_kept, strict=True)]
        rows.append({"cohort": c.name, "seed": seed, "rule": rule, **_score(c, folds, preds),
                     "kept_epoch": float(np.mean(epochs_kept)) + 1,
                     "seconds_per_fold": float(np.mean(seconds)) / 2})
    return rows


def _folds(c: Cohort, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The seed's 3 folds, each with the target residualised on its training subjects."""
    folds = []
    for train, test in KFold(3, shuffle=True, random_state=seed).split(c.target):
        fit = LinearRegression().fit(c.covariates[train], c.target[train])
        folds.append((train, test, c.target - fit.predict(c.covariates)))
    return folds


def _voxel_ridge_row(c: Cohort, seed: int) -> dict:
    """dfrn's voxel ridge (``[baseline] models = ["voxel_ridge"]``: dual form, inner 5-fold
    alpha) on exactly the networks' inputs, folds and residualised targets."""
    gram, preds, t0 = voxel_gram(c.volumes), [], time.perf_counter()
    folds = _folds(c, seed)
    for train, test, y_res in folds:
        pred, _ = KernelRidgeCV(gram, train, test, DEFAULT_ALPHAS, 5).predict(y_res[train][:, None])
        preds.append(pred[:, 0])
    return {"cohort": c.name, "seed": seed, "rule": "voxel_ridge", **_score(c, folds, preds),
            "kept_epoch": float("nan"), "seconds_per_fold": (time.perf_counter() - t0) / 3}


def _paired(df: pd.DataFrame, base: str = "val+running") -> None:
    ref = df[df.rule == base].set_index(["cohort", "seed"])
    for (cohort, rule), g in df[df.rule != base].groupby(["cohort", "rule"], sort=False):
        d = (g.set_index(["cohort", "seed"])["partial_r"] - ref["partial_r"]).dropna()
        print(f"{cohort:12s} {rule:22s} partial r − {base}: {d.mean():+.3f} ± "
              f"{d.std(ddof=1):.3f} (ahead on {int((d > 0).sum())} of {len(d)} seeds)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--widen", type=float, default=0.25)
    ap.add_argument("--subjects", type=int, default=90)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cohorts", nargs="*", default=["gm", "distributed", "shape"])
    ap.add_argument("--root", type=Path, default=Path("/tmp/dfrn-bench-learning"))
    ap.add_argument("--out", type=Path, default=None, help="rows TSV; an existing one resumes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = pd.read_csv(args.out, sep="\t").to_dict("records") if args.out and \
        args.out.is_file() else []
    done = {(r["cohort"], int(r["seed"]), r["rule"]) for r in rows}
    for name in args.cohorts:
        c = _cohort(name, args.root, args.subjects)
        for seed in range(args.seeds):
            if (name, seed, "voxel_ridge") not in done:  # cheap: added to resumed seeds too
                rows.append(_voxel_ridge_row(c, seed))
            if (name, seed, RULES[0]) in done:
                continue
            rows += _run_seed(c, seed, args.epochs, args.widen)
            print(pd.DataFrame(rows[-len(RULES) - 1:]).round(3).to_string(index=False), flush=True)
            if args.out:
                pd.DataFrame(rows).to_csv(args.out, sep="\t", index=False)
    df = pd.DataFrame(rows)
    g = df.groupby(["cohort", "rule"], sort=False)
    print(g[["r", "partial_r", "fold_r", "kept_epoch", "seconds_per_fold"]].mean().round(3)
          .to_string())
    _paired(df)


if __name__ == "__main__":
    main()
