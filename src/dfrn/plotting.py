"""Figures and printed tables of the cross-validation results.

Figure 2 plots, for each factor, every subject's out-of-fold prediction (averaged over
repeats) against the true score, with a robust-regression line (statsmodels ``RLM`` with
Huber's T norm), and the mean Pearson r over repeats in the title.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dfrn.io import atomic_write

__all__ = ["robust_line", "plot_fig2", "format_table"]


def robust_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Intercept and slope of a Huber robust regression of ``y`` on ``x`` (statsmodels RLM)."""
    import statsmodels.api as sm

    fit = sm.RLM(
        np.asarray(y, float), sm.add_constant(np.asarray(x, float)), M=sm.robust.norms.HuberT()
    ).fit()
    intercept, slope = (float(v) for v in fit.params)
    return intercept, slope


def plot_fig2(predictions: pd.DataFrame, metrics: pd.DataFrame, path: str | Path) -> Path:
    """Predicted vs real score per factor, with a robust-regression line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = list(dict.fromkeys(predictions["factor"]))
    ncol = min(len(factors), 5)
    nrow = int(np.ceil(len(factors) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax, factor in zip(axes.flat, factors, strict=False):
        g = predictions[predictions["factor"] == factor]
        per_subject = g.groupby("participant_id")[["y_true", "y_pred"]].mean()
        x = per_subject["y_true"].to_numpy()
        y = per_subject["y_pred"].to_numpy()
        ax.scatter(x, y, s=12, alpha=0.7, color="tab:blue", edgecolor="none")
        if len(x) >= 3 and np.ptp(x) > 0:
            b0, b1 = robust_line(x, y)
            xs = np.linspace(x.min(), x.max(), 50)
            ax.plot(xs, b0 + b1 * xs, color="tab:red", lw=2, label="robust fit (RLM)")
        r = metrics.loc[metrics["factor"] == factor, "pearson_r"]
        ax.set_title(f"{factor}\nmean r = {np.nanmean(r):.2f}", fontsize=10)
        ax.set_xlabel("real score")
        ax.set_ylabel("predicted score")
    for ax in list(axes.flat)[len(factors) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Out-of-fold predictions (mean over repeats)")
    fig.tight_layout()
    out = Path(path)
    atomic_write(out, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return out


def format_table(df: pd.DataFrame, title: str = "") -> str:
    """A plain-text rendering of a small table, for printing."""
    text = df.to_string(index=False)
    return f"{title}\n{text}" if title else text
