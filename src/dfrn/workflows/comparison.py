"""``cv/comparison.tsv``: does the network beat the classic models, and do they beat the
covariates?

Every pair of models that the study ran on the same folds and the same targets is compared
by :func:`dfrn.evaluation.comparison.compare_models` (Δr with a paired bootstrap CI, the
corrected resampled t-test on the folds' MSE, a verdict):

* the network (``dfrn``) vs each baseline model (``ridge``: the ROI ridge; ``voxel_ridge``);
* with covariates and raw targets, the network and each baseline vs the covariates-only
  model (``covariates``). With ``[confounds] target = "residualize"`` the brain models
  predict residuals and the covariates-only model the raw score, so they are not compared
  head to head: ``cv/confounds.tsv`` says what each adds beyond the covariates.

No model's features are adjusted for the covariates: the comparison is like for like.
The stage runs after the baseline in ``dfrn run``; ``dfrn baseline RESULTS`` and
``dfrn report RESULTS`` rewrite it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from dfrn.config import StudyConfig
from dfrn.evaluation.bootstrap import Bootstrap
from dfrn.evaluation.comparison import COMPARISON_COLUMNS, ModelPair, compare_models
from dfrn.evaluation.metrics import format_p, readable
from dfrn.io import atomic_write_tsv
from dfrn.plotting import format_table
from dfrn.workflows.confounds import BASELINE_KEYS, MODEL_WORDS, baseline_files
from dfrn.workflows.results import ResultsFolder

__all__ = ["study_bootstrap", "compare_study_models", "run_comparison_stage",
           "refresh_comparison", "readable_comparison", "verdict_sentence"]


def study_bootstrap(cfg: StudyConfig) -> Bootstrap:
    """The study's resamples: ``[compare] bootstrap`` draws seeded by ``[cv] seed``."""
    return Bootstrap(cfg.compare.bootstrap, cfg.cv.seed)


def _models(folder: ResultsFolder, cfg: StudyConfig,
            log: Callable[[str], None]) -> dict[str, pd.DataFrame]:
    """The predictions of every model the folder holds, under their table names."""
    models = {"dfrn": folder.read_predictions()}
    for model, key in BASELINE_KEYS.items():
        path = baseline_files(folder.root, model).predictions
        if path.is_file():
            models[key] = folder.read_predictions(path)
    if folder.covariates_predictions.is_file() and (cfg.cohort.covariates or cfg.cohort.site):
        if cfg.confounds.target == "residualize":
            log("comparison: the brain models predict residualised targets, the covariates-only "
                "model the raw score; cv/confounds.tsv says what each adds beyond the covariates")
        else:
            models["covariates"] = folder.read_predictions(folder.covariates_predictions)
    return models


def _pairs(models: dict[str, pd.DataFrame]) -> list[ModelPair]:
    """The network vs each baseline, then each brain model vs the covariates-only model."""
    baselines = [k for k in models if k not in ("dfrn", "covariates")]
    names = [("dfrn", b) for b in baselines]
    if "covariates" in models:
        names += [(m, "covariates") for m in ("dfrn", *baselines)]
    words = {**MODEL_WORDS, "covariates": "the covariates-only model"}
    return [ModelPair(a, b, words[a], words[b]) for a, b in names]


def _factors(a: pd.DataFrame, b: pd.DataFrame, pair: ModelPair,
             log: Callable[[str], None]) -> list[str]:
    """The factors both models predicted; one log line per factor that one lacks."""
    fa = list(dict.fromkeys(a["factor"].astype(str)))
    fb = set(b["factor"].astype(str))
    for f in [*fa, *sorted(fb - set(fa))]:
        if f not in fb or f not in fa:
            lacks = pair.words_b if f not in fb else pair.words_a
            log(f"comparison: no {pair.a} vs {pair.b} row for {f}: {lacks} has no predictions "
                "of it")
    return [f for f in fa if f in fb]


def compare_study_models(folder: ResultsFolder, cfg: StudyConfig,
                         log: Callable[[str], None]) -> pd.DataFrame:
    """Every pair's rows (:data:`dfrn.evaluation.comparison.COMPARISON_COLUMNS`)."""
    models = _models(folder, cfg, log)
    boot = study_bootstrap(cfg)
    frames = [compare_models(models[p.a], models[p.b], p, boot,
                             _factors(models[p.a], models[p.b], p, log))
              for p in _pairs(models)]
    frames = [f for f in frames if len(f)]
    return (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=COMPARISON_COLUMNS))


def readable_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """The table for reading (log, report): numbers rounded, p as Table 1 prints it, and
    "—" where the t-test or an r is undefined (its reason is in the verdict)."""
    shown = readable(table, 3)
    for col in ("r_a", "r_b", "delta_r", "ci_low", "ci_high", "t_corrected", "df"):
        shown[col] = ["—" if not np.isfinite(float(v)) else v for v in shown[col]]
    return shown


def verdict_sentence(row: pd.Series) -> str:
    """One comparison in words, e.g. "anhedonia: the ROI ridge beats the network (Δr −0.15,
    95% CI −0.24 to −0.07, corrected p 0.02)"."""
    def num(x: float) -> str:
        return f"{x:.2f}".replace("-", "−") if np.isfinite(x) else "undefined"

    ci = (f", 95% CI {num(row['ci_low'])} to {num(row['ci_high'])}"
          if np.isfinite(row["ci_low"]) else "")
    return (f"{row['factor']}: {row['verdict']} (Δr {num(row['delta_r'])}{ci}, corrected p "
            f"{format_p(float(row['p_corrected']))})")


def run_comparison_stage(out: str | Path, cfg: StudyConfig,
                         log: Callable[[str], None] = print) -> pd.DataFrame | None:
    """Write ``cv/comparison.tsv`` and log it with one verdict per row; None when the study
    ran a single model (then no stale table of an earlier model set is left behind)."""
    folder = ResultsFolder(Path(out))
    table = compare_study_models(folder, cfg, log)
    if table.empty:
        folder.comparison.unlink(missing_ok=True)
        return None
    atomic_write_tsv(table, folder.comparison, float_format=None)
    log(format_table(readable_comparison(table.drop(columns=["verdict"])),
                     "Model comparison on the same folds (cv/comparison.tsv): Δr = r_a − r_b "
                     f"with a paired bootstrap 95% CI ({cfg.compare.bootstrap} resamples), and "
                     "the corrected resampled t-test on the folds' MSE (Nadeau & Bengio 2003)"))
    for _, row in table.iterrows():
        log(f"  {row['model_a']} vs {row['model_b']}, {verdict_sentence(row)}")
    log("  (a verdict needs both tests; 'no detectable difference' does not show the models "
        "are equal, and neither test says why one model is better)")
    return table


def refresh_comparison(out: str | Path, log: Callable[[str], None] = print
                       ) -> pd.DataFrame | None:
    """Rewrite ``cv/comparison.tsv`` of a finished results folder from its own config,
    holding the folder's lock (None, nothing written, for a folder without predictions)."""
    from dfrn.config import load_config
    from dfrn.workflows.study import results_lock

    folder = ResultsFolder(Path(out))
    if not (folder.is_run() and folder.predictions.is_file()):
        return None
    with results_lock(folder.root, "dfrn report", log):
        return run_comparison_stage(out, load_config(folder.config_toml), log)
