"""The training recipe, measured: the paper's recipe against each change, on two cohorts.

Baseline: the paper's recipe as dfrn runs it by default (one network per factor, Adam
lr 0.001, batch 4, SSE, early stopping on the raw loss of a 10% inner validation split,
patience 10, best weights kept), capped at ``--epochs``. Each variant changes one thing:

- ``joint``: one network for all five factors (the paper's ablation);
- ``smoothed``: early stopping on the smoothed validation loss (min_epochs 10);
- ``none``: no early stopping (all ``--epochs`` epochs, every training subject);
- ``augment``: TorchIO light augmentation;
- ``adamw``: AdamW, weight decay 0.01;
- ``cosine``: cosine learning-rate schedule;
- ``best``: every single change above (joint excepted) whose mean r beat the paper's on
  both cohorts, combined.

Cohorts (synthetic, from :func:`dfrn.data.synth.make_synthetic_cohort`, network input at
8 mm, 23×28×23):

- ``demo``: like ``dfrn demo``: 72 subjects, regions darkened 0.4 per SD, age atrophy;
- ``subtle``: 116 subjects, subtle local atrophy: each factor's region shrinks by a smooth
  radial displacement of 2 mm per SD (no intensity change).

For each seed the cohort is split into 2/3 training and 1/3 test subjects (the split changes
with the seed); r is Pearson's r between the test subjects' predictions and the true score
of ``--factor``. Printed: mean ± sd of r over seeds, mean seconds per fit, mean epochs.

Run::

    python benchmarks/bench_recipe.py --seeds 3 --epochs 20 --threads 2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from dfrn.data.images import block_downsample, normalise
from dfrn.data.synth import FACTORS, make_synthetic_cohort
from dfrn.models.regressor import DFRNRegressor

VARIANTS: dict[str, dict] = {
    "paper": {},
    "joint": {},
    "smoothed": {"early_stopping": "smoothed"},
    "none": {"early_stopping": "none"},
    "augment": {"augment": "light"},
    "adamw": {"weight_decay": 0.01},
    "cosine": {"lr_schedule": "cosine"},
}


@dataclass
class Cohort:
    name: str
    volumes: list[np.ndarray]
    scores: pd.DataFrame


def _cohort(name: str, root: Path, **kw) -> Cohort:
    folder = root / name
    if not (folder / "participants.tsv").exists():
        make_synthetic_cohort(folder, voxel_size=4.0, radius=14.0, seed=0, **kw)
    table = pd.read_csv(folder / "participants.tsv", sep="\t")
    mask = block_downsample(nib.load(folder / "brain_mask.nii.gz").get_fdata(), 2) > 0.5
    vols = []
    for f in table["t1"]:
        data = block_downsample(nib.load(folder / f).get_fdata(dtype=np.float32), 2)
        vols.append(normalise(data, mask))
    return Cohort(name, vols, table[list(FACTORS)])


def _fit(c: Cohort, variant: str, seed: int, factor: str, epochs: int) -> dict:
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(c.volumes))
    n_test = len(order) // 3
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    settings = {}
    for name in (variant.split("+") if variant != "paper" else []):
        settings.update(VARIANTS[name])
    joint = "joint" in variant.split("+")
    y = c.scores.to_numpy() if joint else c.scores[factor].to_numpy()
    est = DFRNRegressor(epochs=epochs, seed=seed, voxel_mm=8.0, **settings)
    t0 = time.perf_counter()
    est.fit([c.volumes[i] for i in train], y[train])
    seconds = time.perf_counter() - t0
    pred = est.predict([c.volumes[i] for i in test])
    if joint:
        pred = pred[:, list(FACTORS).index(factor)]
    truth = c.scores[factor].to_numpy()[test]
    return {"cohort": c.name, "variant": variant, "seed": seed,
            "r": float(np.corrcoef(pred, truth)[0, 1]), "seconds": seconds,
            "epochs": len(est.history_), "kept_epoch": est.best_epoch_}


def _table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    g = df.groupby(["cohort", "variant"], sort=False)
    return pd.DataFrame({
        "r_mean": g["r"].mean(), "r_sd": g["r"].std(ddof=1), "seconds": g["seconds"].mean(),
        "epochs": g["epochs"].mean(), "kept_epoch": g["kept_epoch"].mean(),
    }).round(3)


def _paired(rows: pd.DataFrame) -> None:
    """Per variant and cohort: r minus the paper recipe's r on the same seed (same split and
    initial weights), mean ± sd, and how many seeds it is ahead on."""
    paper = rows[rows.variant == "paper"].set_index(["cohort", "seed"])["r"]
    for (cohort, variant), g in rows[rows.variant != "paper"].groupby(["cohort", "variant"],
                                                                      sort=False):
        d = g.set_index(["cohort", "seed"])["r"] - paper
        d = d.dropna()
        print(f"{cohort:7s} {variant:24s} r - paper r: {d.mean():+.3f} ± {d.std(ddof=1):.3f} "
              f"(ahead on {int((d > 0).sum())} of {len(d)} seeds); time ratio "
              f"{g['seconds'].mean() / rows[(rows.variant == 'paper') & (rows.cohort == cohort)]['seconds'].mean():.2f}")


def _best(table: pd.DataFrame) -> str:
    """The single changes (joint excepted) that beat the paper's recipe on every cohort."""
    wins = []
    for name in VARIANTS:
        if name in ("paper", "joint"):
            continue
        better = [table.loc[(c, name), "r_mean"] > table.loc[(c, "paper"), "r_mean"]
                  for c in table.index.get_level_values(0).unique()]
        if all(better):
            wins.append(name)
    if "smoothed" in wins and "none" in wins:  # two stopping rules: keep the better one
        mean = {n: table.xs(n, level=1)["r_mean"].mean() for n in ("smoothed", "none")}
        wins.remove(min(mean, key=mean.get))
    return "+".join(wins)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--factor", default="anhedonia")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", type=Path, default=Path("/tmp/dfrn-bench-recipe"))
    ap.add_argument("--variants", nargs="*", default=None,
                    help="run only these variants (default: all, then the best combination)")
    ap.add_argument("--out", type=Path, default=None,
                    help="every fit's row (TSV), written as it goes; an existing file resumes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cohorts = [
        _cohort("demo", args.root, n_subjects=72, effect=0.4, age_effect=0.15),
        _cohort("subtle", args.root, n_subjects=116, displacement=2.0),
    ]
    rows: list[dict] = []
    if args.out and args.out.is_file():  # resume: keep the fits already made
        rows = pd.read_csv(args.out, sep="\t").to_dict("records")
    done = {(r["cohort"], r["variant"], int(r["seed"])) for r in rows}

    def run(variant: str) -> None:
        for c in cohorts:
            for seed in range(args.seeds):
                if (c.name, variant, seed) in done:
                    continue
                rows.append(_fit(c, variant, seed, args.factor, args.epochs))
                print(rows[-1], flush=True)
                if args.out:
                    pd.DataFrame(rows).to_csv(args.out, sep="\t", index=False)

    for variant in args.variants or VARIANTS:
        run(variant)
    table = _table(rows)
    if all((c.name, v) in table.index for c in cohorts for v in VARIANTS):
        best = _best(table)
        if best and best not in VARIANTS:
            run(best)
        print(f"\nbest combination: {best or '(none beat the paper recipe on every cohort)'}")
    table = _table(rows)
    print(table.to_string())
    _paired(pd.DataFrame(rows))


if __name__ == "__main__":
    main()
