"""The baseline stage of a study: ridge regression on atlas ROI volumes, same folds.

Reads the results folder's config, cohort and fold plan (``cv/folds.tsv``), computes ROI
features (gray-matter volume per atlas region from the cohort's ``gm`` column; mean T1
intensity per region, with a warning, when there are no GM maps), cross-validates
:class:`dfrn.models.ridge.RidgeBaseline` on the network's (repeat, fold) plan, runs the
permutation test, and draws Figure 3 next to the network's metrics when they exist.

Outputs: ``baseline/roi_features.tsv``, ``baseline/predictions.tsv``,
``baseline/metrics.tsv``, ``baseline/permutation.tsv`` and ``figures/fig3_rr_vs_dfrn.png``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from dfrn.config import StudyConfig
from dfrn.data.atlas import roi_mean_intensity, roi_volumes, write_roi_features
from dfrn.data.cohort import Cohort
from dfrn.errors import DfrnInputError
from dfrn.evaluation.folds import iter_splits
from dfrn.evaluation.metrics import PREDICTION_COLUMNS, compute_metrics
from dfrn.evaluation.permutation import permutation_test, write_permutation_table
from dfrn.models.ridge import (
    DEFAULT_ALPHAS,
    RidgeBaseline,
    cross_validate_baseline,
    encode_covariates,
    plot_fig3,
    write_baseline_outputs,
)
from dfrn.plotting import format_table
from dfrn.targets.providers import StaticTargets, TargetProvider
from dfrn.workflows.attention import load_atlas_for

__all__ = ["run_baseline_stage"]


def _features(cohort: Cohort, cfg: StudyConfig, atlas, out: Path, log) -> pd.DataFrame:
    path = out / "baseline" / "roi_features.tsv"
    if path.is_file():
        return pd.read_csv(path, sep="\t", dtype={"participant_id": str}).set_index(
            "participant_id"
        )
    gm = cohort.path_column(cfg.cohort.gm_column)
    if gm is not None:
        for pid, p in zip(cohort.participant_ids, gm, strict=True):
            if not p.is_file():
                raise DfrnInputError(f"participant {pid}: GM map not found: {p}")
        log(f"ROI features: gray-matter volume (ml) in {len(atlas.names)} regions of {atlas.source}")
        feats = roi_volumes(gm, atlas, cohort.participant_ids)
    else:
        warnings.warn(
            f"no '{cfg.cohort.gm_column}' column of GM maps in the cohort: the baseline falls back "
            "to mean T1 intensity per region",
            UserWarning,
            stacklevel=2,
        )
        feats = roi_mean_intensity(cohort.images, atlas, cohort.participant_ids)
    feats.index = feats.index.astype(str)
    feats.index.name = "participant_id"
    write_roi_features(feats, out)
    return feats


def _predict_with_provider(
    feats: pd.DataFrame, provider: TargetProvider, plan: pd.DataFrame,
    cov: pd.DataFrame | None, alphas,
) -> pd.DataFrame:
    """Ridge CV where targets are fitted per fold (``[factors] fit_on = "train"``)."""
    rows = []
    for r, f, train, test in iter_splits(plan):
        y_train, y_test = provider(r, f, train, test)
        for factor in y_train.columns:
            ytr = y_train[factor].dropna()
            yte = y_test[factor].dropna()
            model = RidgeBaseline(alphas=alphas).fit(
                feats.loc[ytr.index], ytr.to_numpy(),
                covariates=None if cov is None else cov.loc[ytr.index],
            )
            pred = model.predict(feats.loc[yte.index], covariates=None if cov is None else cov.loc[yte.index])
            rows.append(pd.DataFrame({
                "participant_id": yte.index, "repeat": r, "fold": f, "factor": factor,
                "y_true": yte.to_numpy(), "y_pred": pred,
            }))
    return pd.concat(rows, ignore_index=True)[PREDICTION_COLUMNS]


def run_baseline_stage(
    out: str | Path,
    cfg: StudyConfig | None = None,
    cohort: Cohort | None = None,
    targets: pd.DataFrame | None = None,
    provider: TargetProvider | None = None,
    plan: pd.DataFrame | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    atlas: str | None = None,
    atlas_labels: str | None = None,
    n_permutations: int | None = None,
) -> dict[str, pd.DataFrame]:
    """Run the ridge baseline on a results folder whose fold plan exists.

    Called without ``cfg`` (``dfrn baseline RESULTS``), it takes the folder's lock and first
    checks that the input files are those the run was made with.
    """
    if cfg is None:
        from dfrn.workflows.study import open_finished_study, results_lock

        with results_lock(Path(out), "dfrn baseline", log):
            study = open_finished_study(out, progress)
            return run_baseline_stage(
                out, study.cfg, study.cohort, None, None, study.plan, progress, log, atlas,
                atlas_labels, n_permutations,
            )
    from dfrn.workflows.study import load_study_cohort, study_targets

    out = Path(out)
    b = cfg.baseline
    cohort = cohort or load_study_cohort(cfg)
    if plan is None:
        plan = pd.read_csv(out / "cv" / "folds.tsv", sep="\t", dtype={"participant_id": str})
    if targets is None or provider is None:
        targets, provider = study_targets(cohort, cfg, plan, out, log)
    atlas_obj = load_atlas_for(atlas or b.atlas, atlas_labels or b.atlas_labels, log)
    if atlas_obj is None:
        log("baseline skipped: it needs an atlas (--atlas/--atlas-labels or [baseline] atlas)")
        return {}
    feats = _features(cohort, cfg, atlas_obj, out, log)
    alphas = tuple(b.alphas) if b.alphas else DEFAULT_ALPHAS
    cov = None
    if b.covariates:
        missing = [c for c in b.covariates if c not in cohort.table.columns]
        if missing:
            raise DfrnInputError(
                f"baseline covariate {missing[0]!r} is not in the cohort table "
                f"(available: {', '.join(map(str, cohort.table.columns))})"
            )
        cov = encode_covariates(cohort.table[list(b.covariates)])
        if cov.isna().any().any():
            pid = cov.index[cov.isna().any(axis=1)][0]
            raise DfrnInputError(f"participant {pid}: a baseline covariate is missing")
    static = isinstance(provider, StaticTargets)
    if static:
        pred = cross_validate_baseline(feats, targets, plan, cov, alphas=alphas)
    else:
        pred = _predict_with_provider(feats, provider, plan, cov, alphas)
    write_baseline_outputs(pred, out)
    metrics = compute_metrics(pred)
    results = {"predictions": pred, "metrics": metrics}

    n_perm = b.n_permutations if n_permutations is None else n_permutations
    if n_perm > 0 and static:
        perm = permutation_test(
            feats, targets, plan, n_perm=n_perm, seed=cfg.cv.seed, covariates=cov,
            progress=progress, alphas=alphas,
        )
        write_permutation_table(perm, out)
        log(format_table(perm.round(4), f"Ridge baseline: permutation test ({n_perm} permutations)"))
        results["permutation"] = perm
    elif n_perm > 0:
        log("note: the permutation test needs targets fixed before CV; skipped with fit_on = 'train'")

    dfrn_metrics = None
    if (out / "cv" / "metrics.tsv").is_file():
        dfrn_metrics = pd.read_csv(out / "cv" / "metrics.tsv", sep="\t")
    plot_fig3(metrics, dfrn_metrics, out / "figures" / "fig3_rr_vs_dfrn.png")
    summary = metrics.groupby("factor", sort=False)["pearson_r"].mean().rename("ridge_r").to_frame()
    if dfrn_metrics is not None:
        summary["dfrn_r"] = dfrn_metrics.groupby("factor", sort=False)["pearson_r"].mean()
    log(format_table(summary.reset_index().round(3), "Mean Pearson r over repeats: ridge vs DFRN"))
    results["summary"] = summary
    return results

