"""``dfrn factors`` and the ``factors/`` outputs of a study: tables and the loadings figure."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.utils.validation import check_is_fitted

from dfrn.errors import DfrnInputError
from dfrn.io import atomic_write_tsv
from dfrn.plotting import format_table, plot_loadings, plot_scree
from dfrn.targets.factors import ID_COLUMN, SymptomFactors, check_complete, read_items_table

__all__ = ["write_factor_outputs", "write_stability", "suggest_factors", "run_factors"]


def write_factor_outputs(
    model: SymptomFactors, items: pd.DataFrame, out_dir: str | Path
) -> dict[str, Path]:
    """Write the factor tables and the loadings heatmap; return their paths by kind.

    * ``factors/loadings.tsv``: column ``item`` then one column per factor;
    * ``factors/scores.tsv``: ``participant_id`` then one column per factor (``items`` scored
      with :meth:`SymptomFactors.transform`);
    * ``factors/variance.tsv``: ``factor``, ``variance``, ``proportion``, ``cumulative``;
    * ``figures/factor_loadings.png``: annotated heatmap of the loadings.

    Parameters
    ----------
    model : SymptomFactors
        A fitted model.
    items : DataFrame
        The items it scores (index ``participant_id``).
    out_dir : str or Path
        The folder that receives ``factors/`` and ``figures/``.

    Returns
    -------
    dict
        Paths by kind: ``loadings``, ``scores``, ``variance``, ``figure``.
    """
    from dfrn.workflows.results import ResultsFolder

    check_is_fitted(model, "loadings_")
    folder = ResultsFolder(Path(out_dir))
    paths = {
        "loadings": folder.factors / "loadings.tsv",
        "scores": folder.factors / "scores.tsv",
        "variance": folder.factors / "variance.tsv",
        "figure": folder.figure("factor_loadings"),
    }
    scores = model.transform(items)
    atomic_write_tsv(model.loadings_.rename_axis("item").reset_index(), paths["loadings"])
    atomic_write_tsv(scores.rename_axis(ID_COLUMN).reset_index(), paths["scores"])
    atomic_write_tsv(model.variance_table(), paths["variance"])
    plot_loadings(model.loadings_, paths["figure"])
    return paths


def write_stability(
    stability: pd.DataFrame, out_dir: str | Path, log: Any = print
) -> pd.DataFrame | None:
    """Write ``factors/stability.tsv``, log the per-factor summary, warn about unstable factors.

    Returns the per-factor summary (:func:`dfrn.targets.stability.summarise_stability`), or
    None for an empty table (no resamples): nothing is written then and the log says so.
    """
    from dfrn.targets.stability import summarise_stability
    from dfrn.workflows.results import ResultsFolder

    if stability.empty:
        log("factor stability not estimated (no resamples): factors/stability.tsv not written")
        return None

    folder = ResultsFolder(Path(out_dir))
    atomic_write_tsv(stability, folder.factors / "stability.tsv", float_format=None)
    summary = summarise_stability(stability)
    atomic_write_tsv(summary, folder.factors / "stability_summary.tsv", float_format=None)
    how = stability["alignment"].iloc[0] if len(stability) else "hungarian"
    log(format_table(summary.round(3), f"Factor stability: Tucker's congruence with the full fit "
                                       f"({len(stability['resample'].unique())} fits, "
                                       f"{how} alignment)"))
    for row in summary.itertuples():
        if row.median_congruence < 0.85 or row.n_below_085 >= max(1, 0.1 * row.n_fits):
            warnings.warn(
                f"factor {row.factor!r} is unstable: its congruence with the full fit is below "
                f"0.85 ('not the same factor') in {row.n_below_085} of {row.n_fits} fits "
                f"(median {row.median_congruence:.2f}); do not take its correlations at face "
                "value",
                UserWarning,
                stacklevel=2,
            )
    return summary


def suggest_factors(
    items_path: str | Path, out_dir: str | Path | None = None, *, seed: int = 0, log: Any = print
) -> pd.DataFrame:
    """``dfrn factors ITEMS --suggest``: the criteria table, and the scree plot with ``--out``."""
    from dfrn.targets.retention import suggest_n_factors

    items = read_items_table(items_path)
    table, pa, _ = suggest_n_factors(items, seed=seed)
    log(f"{len(items)} participants x {items.shape[1]} items")
    log(format_table(table, "How many factors the items support"))
    if out_dir is not None:
        from dfrn.workflows.results import ResultsFolder

        folder = ResultsFolder(Path(out_dir))
        atomic_write_tsv(table, folder.factors / "criteria.tsv")
        path = plot_scree(pa.observed, pa.threshold, pa.random_mean, pa.n_components,
                          folder.figure("factor_scree"))
        log(f"wrote {folder.factors / 'criteria.tsv'}, {path}")
    return table


def run_factors(
    items_path: str | Path,
    n_factors: int | str,
    out_dir: str | Path,
    *,
    names: Mapping[str, Sequence[str]] | None = None,
    impute: str | None = None,
    tol: float = 1e-5,
    n_resamples: int = 50,
    seed: int = 0,
    log: Any = print,
) -> SymptomFactors:
    """``dfrn factors``: fit on an items table, write the outputs and the stability estimate.

    ``n_factors`` is a number or ``"parallel"`` / ``"map"`` (refused when the criterion
    retains no factor). Stability is split-half: ``n_resamples`` random halves (seeded), each
    aligned to the full fit; 0 skips it (no ``stability.tsv``). Refuses to overwrite an
    existing ``factors/`` folder in ``out_dir``. Messages name the ``dfrn factors`` options.
    """
    from dfrn.targets.retention import resolve_n_factors
    from dfrn.targets.stability import split_half_stability

    out_dir = Path(out_dir)
    if (out_dir / "factors").exists():
        raise DfrnInputError(
            f"{out_dir / 'factors'} already exists; choose another --out (results are never "
            "overwritten)"
        )
    items = read_items_table(items_path)
    if impute is None:
        check_complete(items, "use --impute median")
    k = resolve_n_factors(items, n_factors, seed=seed, option="--n-factors N")
    model = SymptomFactors(n_factors=k, names=names or None, impute=impute, tol=tol)
    model.fit(items)
    paths = write_factor_outputs(model, items, out_dir)
    var = model.variance_table()
    log(f"{len(items)} participants x {items.shape[1]} items -> {k} varimax factors")
    log(var.round(4).to_string(index=False))
    if not names:
        top = model.top_items(3)
        log("top-loading items per factor (name them with --name FACTOR=ITEM,ITEM):")
        for factor, g in top.groupby("factor", sort=False):
            log(f"  {factor}: " + ", ".join(f"{r.item} ({r.loading:.2f})" for r in g.itertuples()))
    written = [str(p) for p in paths.values()]
    if n_resamples == 0:
        log("factor stability not estimated (--resamples 0)")
    else:
        full = items.fillna(model.item_medians_) if impute == "median" else items
        stability = split_half_stability(full, model, n_resamples=n_resamples, seed=seed)
        write_stability(stability, out_dir, log)
        written.append(str(out_dir / "factors/stability.tsv"))
    log(f"wrote {', '.join(written)}")
    return model
