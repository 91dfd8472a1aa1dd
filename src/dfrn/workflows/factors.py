"""``dfrn factors`` and the ``factors/`` outputs of a study: tables and the loadings figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.utils.validation import check_is_fitted

from dfrn.errors import DfrnInputError
from dfrn.io import atomic_write_tsv
from dfrn.plotting import plot_loadings
from dfrn.targets.factors import ID_COLUMN, SymptomFactors, read_items_table

__all__ = ["write_factor_outputs", "run_factors"]


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


def run_factors(
    items_path: str | Path,
    n_factors: int,
    out_dir: str | Path,
    *,
    names: Mapping[str, Sequence[str]] | None = None,
    impute: str | None = None,
    tol: float = 1e-5,
    log: Any = print,
) -> SymptomFactors:
    """``dfrn factors``: fit on an items table, write the outputs, print a summary.

    Refuses to overwrite an existing ``factors/`` folder in ``out_dir``.
    """
    out_dir = Path(out_dir)
    if (out_dir / "factors").exists():
        raise DfrnInputError(
            f"{out_dir / 'factors'} already exists; choose another --out (results are never "
            "overwritten)"
        )
    items = read_items_table(items_path)
    model = SymptomFactors(n_factors=n_factors, names=names or None, impute=impute, tol=tol)
    model.fit(items)
    paths = write_factor_outputs(model, items, out_dir)
    var = model.variance_table()
    log(f"{len(items)} participants x {items.shape[1]} items -> {n_factors} varimax factors")
    log(var.round(4).to_string(index=False))
    if not names:
        top = model.top_items(3)
        log("top-loading items per factor (name them with --name FACTOR=ITEM,ITEM):")
        for factor, g in top.groupby("factor", sort=False):
            log(f"  {factor}: " + ", ".join(f"{r.item} ({r.loading:.2f})" for r in g.itertuples()))
    log(f"wrote {', '.join(str(p) for p in paths.values())}")
    return model
