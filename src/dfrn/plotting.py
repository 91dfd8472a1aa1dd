"""Every figure dfrn draws, and the plain-text tables it prints; one style.

Figures are built on :class:`matplotlib.figure.Figure` objects (no pyplot state and no
backend switch, so they are safe in workers and inside other programs) and written as PNG
through :func:`dfrn.io.atomic_write`. Library modules never draw; workflows call these.

Figure 2 plots, for each factor, every subject's out-of-fold prediction (averaged over
repeats) against the true score, with a robust-regression line (statsmodels ``RLM`` with
Huber's T norm), and the mean Pearson r over repeats in the title.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dfrn.data.images import ImageLike
from dfrn.io import atomic_write

__all__ = ["robust_line", "plot_fig2", "plot_training_curves", "plot_loadings", "format_table"]


def robust_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Intercept and slope of a Huber robust regression of ``y`` on ``x`` (statsmodels RLM)."""
    import statsmodels.api as sm

    fit = sm.RLM(
        np.asarray(y, float), sm.add_constant(np.asarray(x, float)), M=sm.robust.norms.HuberT()
    ).fit()
    intercept, slope = (float(v) for v in fit.params)
    return intercept, slope


def plot_fig2(predictions: pd.DataFrame, metrics: pd.DataFrame, path: str | Path) -> Path:
    """Figure 2: predicted vs real score per factor, with a robust-regression line.

    Parameters
    ----------
    predictions : DataFrame
        Long predictions table (``participant_id``, ``factor``, ``y_true``, ``y_pred``, ...).
    metrics : DataFrame
        Metrics per (repeat, factor), for the mean r in each title.
    path : str or Path
        The PNG to write (atomically).
    """
    from dfrn.evaluation.metrics import mean_r

    factors = list(dict.fromkeys(predictions["factor"]))
    means = mean_r(metrics) if len(metrics) else None
    ncol = min(len(factors), 5)
    nrow = int(np.ceil(len(factors) / ncol))
    fig = Figure(figsize=(3.2 * ncol, 3.2 * nrow))
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False))
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
        r = means.at[factor, "mean_r"] if means is not None and factor in means.index else np.nan
        ax.set_title(f"{factor}\nmean r = {r:.2f}", fontsize=10)
        ax.set_xlabel("real score")
        ax.set_ylabel("predicted score")
    for ax in list(axes.flat)[len(factors) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    # one 3.2-inch panel is narrower than the title's one line: break it, and let matplotlib
    # wrap it further (wrap=True keeps it inside the figure for any width)
    title = "Out-of-fold predictions" + ("\n" if ncol == 1 else " ") + "(mean over repeats)"
    fig.suptitle(title, wrap=True)
    fig.tight_layout()
    return _save(fig, path, dpi=120)


HISTORY_COLUMNS = ("factor", "fold", "epoch", "train_loss", "val_loss", "chosen_epoch")


def plot_training_curves(histories: pd.DataFrame, path: str | Path) -> Path:
    """Training curves: per factor, each fold network's train and validation loss per epoch.

    Train loss is a solid line, validation loss a dashed one in the fold's colour, and the
    chosen (kept) epoch a dot on the validation curve (on the train curve when the fold
    held out no validation subjects, whose validation loss is all NaN and not drawn).

    Parameters
    ----------
    histories : DataFrame
        Long table, one row per (factor, fold, epoch): :data:`HISTORY_COLUMNS` (losses per
        target value of the scaled target; ``chosen_epoch`` repeats the fold's kept epoch).
    path : str or Path
        The PNG to write (atomically); usually ``figures/training_curves.png``.

    Returns
    -------
    Path
        ``path``.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    factors = list(dict.fromkeys(histories["factor"]))
    ncol = min(len(factors), 3)
    nrow = int(np.ceil(len(factors) / ncol))
    fig = Figure(figsize=(4.2 * ncol, 3.4 * nrow + 0.6), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False)
    colours = [f"C{k % 10}" for k in range(10)]
    for ax, factor in zip(axes.flat, factors, strict=False):
        for k, (fold, g) in enumerate(histories[histories["factor"] == factor].groupby("fold")):
            g = g.sort_values("epoch")
            c = colours[k % len(colours)]
            ax.plot(g["epoch"], g["train_loss"], color=c, lw=1.2, label=f"fold {fold}")
            val = g["val_loss"].to_numpy(float)
            has_val = bool(np.isfinite(val).any())
            if has_val:
                ax.plot(g["epoch"], val, color=c, lw=1.2, ls="--")
            chosen = g[g["epoch"] == g["chosen_epoch"].iloc[0]]
            if len(chosen):
                y = chosen["val_loss" if has_val else "train_loss"].iloc[0]
                ax.plot(chosen["epoch"], [y], "o", color=c, ms=6, mec="black", mew=0.8)
        ax.set_title(str(factor), fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (MSE of the scaled target)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.5, histories["epoch"].max() + 0.5)
    for ax in list(axes.flat)[len(factors):]:
        ax.axis("off")
    keys = [Line2D([], [], color="grey", lw=1.2, label="train loss"),
            Line2D([], [], color="grey", lw=1.2, ls="--", label="validation loss"),
            Line2D([], [], color="grey", marker="o", ls="", mec="black", label="chosen epoch")]
    fig.legend(handles=keys, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    axes.flat[0].legend(fontsize=7, frameon=False, ncol=2)
    fig.suptitle("Training curves per fold (repeat 0)", wrap=True)
    return _save(fig, path, dpi=110)


def plot_loadings(loadings: pd.DataFrame, path: str | Path) -> Path:
    """Annotated heatmap of rotated factor loadings (items × factors)."""
    n_items, k = loadings.shape
    fig = Figure(figsize=(1.1 * k + 2.8, 0.32 * n_items + 1.6))
    ax = fig.add_subplot()
    values = loadings.to_numpy()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(np.arange(k), labels=[str(c) for c in loadings.columns], rotation=35, ha="right")
    ax.set_yticks(np.arange(n_items), labels=[str(i) for i in loadings.index])
    for i in range(n_items):
        for j in range(k):
            v = values[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(v) > 0.6 else "black")
    ax.set_title("Rotated factor loadings")
    fig.colorbar(image, ax=ax, label="loading", shrink=0.8)
    fig.tight_layout()
    return _save(fig, path, dpi=120)


def _save(fig: Figure, path: str | Path, dpi: int = 120, **kwargs: object) -> Path:
    """Write a figure as PNG atomically (no pyplot state, no backend switch)."""
    out = Path(path)
    atomic_write(out, lambda p: fig.savefig(p, dpi=dpi, format="png", **kwargs))
    return out


def format_table(df: pd.DataFrame, title: str = "") -> str:
    """A plain-text rendering of a small table, for printing."""
    text = df.to_string(index=False)
    return f"{title}\n{text}" if title else text


def _fig3_errors(summary: pd.DataFrame, ci: pd.DataFrame | None) -> tuple[np.ndarray, bool]:
    """The bars' error bars: the 95% bootstrap CI of the mean r (asymmetric, shape (2, k))
    where ``ci`` gives it, else the sd over repeats (shape (k,); NaN with one repeat: no
    bar, not "± 0")."""
    mean = summary["mean_r"].to_numpy(float)
    if ci is None:
        return summary["sd_r"].to_numpy(float), False
    ci = ci.reindex(summary.index)
    return np.vstack([mean - ci["ci_low"].to_numpy(float),
                      ci["ci_high"].to_numpy(float) - mean]), True


def _fig3_figure(tables: list[tuple[str, pd.DataFrame, str]],
                 cis: list[pd.DataFrame | None] | None = None) -> Figure:
    """Figure 3's bars, one group per factor and one bar per model, the legend below the axes
    (outside them, so it never covers a bar; wrapped, and in two columns where they fit)."""
    import textwrap

    from dfrn.evaluation.metrics import mean_r

    factors = list(
        dict.fromkeys(
            [str(f) for _, m, _ in tables[::-1] for f in m["factor"]]  # DFRN's order first
        )
    )
    labels = [textwrap.fill(label, 40) for label, _, _ in tables]
    fig_width = max(4.0, 1.3 * len(factors) + 2.0)
    ncols = min(len(tables), max(1, int(fig_width // 3.2)))  # about 3.2 in per column
    lines = sum(max(lab.count("\n") + 1 for lab in labels[i:i + ncols])
                for i in range(0, len(labels), ncols))
    fig = Figure(figsize=(fig_width, 3.6 + 0.22 * lines), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(tables)
    xs = np.arange(len(factors))
    cis = cis or [None] * len(tables)
    boot = False
    for k, ((_, metrics, color), label) in enumerate(zip(tables, labels, strict=True)):
        summary = mean_r(metrics.assign(factor=metrics["factor"].astype(str))).reindex(factors)
        err, has_ci = _fig3_errors(summary, cis[k])
        boot = boot or has_ci
        offset = (k - (len(tables) - 1) / 2) * width
        ax.bar(xs + offset, summary["mean_r"].to_numpy(float), width, yerr=err, capsize=3,
               label=label, color=color)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(xs, factors, rotation=20 if len(factors) > 4 else 0, ha="center")
    ax.set_ylabel("Pearson r (mean over repeats, 95% bootstrap CI)" if boot
                  else "Pearson r (mean ± sd over repeats)")
    ax.set_title("Out-of-fold prediction of symptom factors")
    fig.legend(loc="outside lower center", ncols=ncols, frameon=False, fontsize="small")
    return fig


def plot_fig3(
    ridge_metrics: pd.DataFrame | None,
    dfrn_metrics: pd.DataFrame | None,
    path: str | Path,
    covariates_metrics: pd.DataFrame | None = None,
    covariates_label: str = "Covariates only",
    target_note: str = "",
    voxel_ridge_metrics: pd.DataFrame | None = None,
    cis: Mapping[str, pd.DataFrame] | None = None,
) -> Path:
    """Figure 3: mean Pearson r per factor, the ridge baselines next to DFRN, with each mean's
    95% bootstrap CI over subjects (``cis``; else ± sd over repeats).

    With ``covariates_metrics`` the covariates-only model's bar comes first: the r the brain
    models have to clear. Then the ROI ridge, the voxel ridge and DFRN; the legend sits
    below the axes.

    Parameters
    ----------
    ridge_metrics : DataFrame or None
        Metrics of the ROI ridge baseline (:func:`dfrn.evaluation.metrics.compute_metrics`,
        one row per repeat and factor); None when it did not run.
    dfrn_metrics : DataFrame or None
        The network's metrics, in the same format; None draws the other bars alone.
    path : str or Path
        The PNG to write (atomically); usually ``figures/fig3_rr_vs_dfrn.png``.
    covariates_metrics : DataFrame, optional
        Metrics of the covariates-only model (same format).
    covariates_label : str
        Its legend entry (e.g. "Covariates only (age and sex)").
    target_note : str
        Appended to the brain models' legend entries (e.g. " (residualised target)").
    voxel_ridge_metrics : DataFrame, optional
        Metrics of the ridge on the network's input voxels (same format).
    cis : mapping of str to DataFrame, optional
        Each model's CI of the mean r (:func:`dfrn.evaluation.bootstrap.mean_r_ci`) under
        ``"covariates"``, ``"roi_ridge"``, ``"voxel_ridge"`` or ``"dfrn"``.

    Returns
    -------
    Path
        ``path``.
    """
    candidates = [
        ("covariates", covariates_label, covariates_metrics, "#e0a030"),
        ("roi_ridge", f"Ridge regression (ROI volumes){target_note}", ridge_metrics, "#8c8c8c"),
        ("voxel_ridge", f"Ridge regression (network input voxels){target_note}",
         voxel_ridge_metrics, "#6a51a3"),
        ("dfrn", f"DFRN{target_note}", dfrn_metrics, "#1f77b4"),
    ]
    shown = [c for c in candidates if c[2] is not None]
    if not shown:
        raise ValueError("Figure 3 needs the metrics of at least one model")
    fig = _fig3_figure([(label, m, color) for _, label, m, color in shown],
                       [(cis or {}).get(key) for key, *_ in shown])
    out = Path(path)
    atomic_write(out, lambda p: fig.savefig(p, dpi=150, format="png"))
    return out


__all__ += ["plot_fig3"]


def plot_fam(
    maps: Mapping[str, ImageLike],
    template_img: ImageLike,
    path: str | Path,
    *,
    threshold_percentile: float = 90.0,
    display_mode: str = "z",
    n_cuts: int = 7,
    dpi: int = 150,
) -> Path:
    """Figure 4: the template with one attention overlay per factor (one row each).

    Pass the **absolute** maps (:attr:`dfrn.interpret.maps.AttentionMaps.absolute` through
    :func:`dfrn.interpret.maps.to_template_space`): the figure shows where each factor's
    networks attend. Each overlay is thresholded at ``threshold_percentile`` of its non-zero
    |values|; all-nonnegative maps use a sequential colour map, signed maps a symmetric one.

    Parameters
    ----------
    maps : mapping of str to nibabel image, str or Path
        Factor name → attention map on the template grid, in row order.
    template_img : nibabel image, str or Path
        The background image.
    path : str or Path
        The PNG to write (atomically); usually ``figures/fig4_fam.png``.
    threshold_percentile : float, default 90.0
        Percentile of each map's non-zero |values| below which it is not drawn.
    display_mode : str, default "z"
        nilearn display mode; ``"x"``, ``"y"`` and ``"z"`` show ``n_cuts`` slices.
    n_cuts : int, default 7
        Slices per row for the single-axis display modes.
    dpi : int, default 150
        Resolution of the PNG.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    DfrnInputError
        For no maps, or an unreadable or non-3D map or template.
    """
    from dfrn.data.images import load_img
    from dfrn.errors import DfrnInputError

    if not maps:
        raise DfrnInputError("plot_fam needs at least one factor map")
    template = load_img(template_img, "template")
    fig = _fam_figure(maps, template, threshold_percentile, display_mode, n_cuts)
    out = Path(path)
    atomic_write(
        out, lambda p: fig.savefig(p, dpi=dpi, facecolor=fig.get_facecolor(), format="png")
    )
    return out


def _fam_scale(data: np.ndarray, threshold_percentile: float) -> tuple[float, float, bool]:
    """Threshold and maximum of an attention map's non-zero |values|, and whether it is signed."""
    vals = np.abs(data[np.isfinite(data) & (data != 0)])
    thr = float(np.percentile(vals, threshold_percentile)) if vals.size else 0.0
    vmax = float(vals.max()) if vals.size else 1.0
    signed = bool(np.nanmin(data) < 0) if data.size else False
    return thr, vmax, signed


def _fam_figure(maps: Mapping[str, ImageLike], template: ImageLike, threshold_percentile: float,
                display_mode: str, n_cuts: int) -> Figure:
    """Figure 4 itself: one row per factor, its map over ``template`` (see :func:`plot_fam`)."""
    from nilearn import plotting

    from dfrn.data.images import load_img

    n = len(maps)
    fig = Figure(figsize=(14, 2.6 * n), facecolor="black")
    for row, (factor, img) in enumerate(maps.items()):
        im = load_img(img, f"attention map of {factor}")
        thr, vmax, signed = _fam_scale(np.asarray(im.dataobj, dtype=np.float64),
                                       threshold_percentile)
        ax = fig.add_axes((0.0, 1.0 - (row + 1) / n, 1.0, 1.0 / n))
        plotting.plot_stat_map(
            im,
            bg_img=template,
            display_mode=display_mode,
            cut_coords=n_cuts if display_mode in ("x", "y", "z") else None,
            axes=ax,
            figure=fig,
            title=str(factor),
            threshold=thr,
            vmax=vmax,
            cmap="cold_hot" if signed else "hot",
            symmetric_cbar=signed,
            colorbar=True,
            annotate=True,
            draw_cross=False,
            black_bg=True,
        )
    return fig


def plot_sanity(df: pd.DataFrame, path: str | Path, *, dpi: int = 150) -> Path:
    """Spearman and SSIM against the randomisation step, one line per method.

    Parameters
    ----------
    df : DataFrame
        The table of :func:`dfrn.interpret.sanity.cascading_randomization` (columns
        ``method, step, spearman, ssim``; more are ignored).
    path : str or Path
        The PNG to write (atomically); usually ``figures/attention_sanity.png``.
    dpi : int, default 150
        Resolution of the PNG.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    DfrnInputError
        When a column is missing.
    """
    from matplotlib.figure import Figure

    from dfrn.errors import DfrnInputError

    missing = {"method", "step", "spearman", "ssim"} - set(df.columns)
    if missing:
        raise DfrnInputError(f"sanity table lacks columns {sorted(missing)}")
    steps = list(dict.fromkeys(df["step"]))
    pos = {s: i for i, s in enumerate(steps)}
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2, sharex=True)
    for ax, metric, title in zip(
        axes,
        ("spearman", "ssim"),
        ("Spearman rank correlation of |map|", "SSIM of |map|"),
        strict=True,
    ):
        for meth, sub in df.groupby("method", sort=False):
            ax.plot([pos[s] for s in sub["step"]], sub[metric], marker="o", label=str(meth))
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels(steps, rotation=45, ha="right")
        ax.set_ylim(-0.2, 1.05)
        ax.set_title(title)
        ax.set_xlabel("randomised from the top down to")
    axes[0].set_ylabel("similarity to the trained model's map")
    axes[1].legend(frameon=False, fontsize="small")
    fig.tight_layout()
    out = Path(path)
    atomic_write(out, lambda p: fig.savefig(p, dpi=dpi, format="png"))
    return out


__all__ += ["plot_fam", "plot_sanity"]


def plot_scree(observed: np.ndarray, random_threshold: np.ndarray, random_mean: np.ndarray,
               n_components: int, path: str | Path) -> Path:
    """Scree plot with the parallel-analysis curves (95th percentile and mean of random data)."""
    k = np.arange(1, len(observed) + 1)
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    ax.plot(k, observed, "o-", color="tab:blue", label="items (observed)")
    ax.plot(k, random_threshold, "--", color="tab:red", label="random data, 95th percentile")
    ax.plot(k, random_mean, ":", color="tab:red", label="random data, mean")
    ax.axhline(1.0, color="grey", lw=0.8, label="eigenvalue 1 (Kaiser)")
    ax.axvline(n_components + 0.5, color="tab:green", lw=1,
               label=f"parallel analysis: {n_components}")
    ax.set_xlabel("component")
    ax.set_ylabel("eigenvalue")
    ax.set_xticks(k)
    ax.set_title("Scree plot and parallel analysis")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _save(fig, path, dpi=120)


__all__ += ["plot_scree"]


def plot_registration_qc(
    t1_img: ImageLike, template_mask: ImageLike, path: str | Path, *, title: str = "",
    dpi: int = 100,
) -> Path:
    """QC of one registration: the warped T1 with the template's brain outline, three planes.

    Parameters
    ----------
    t1_img : nibabel image, str or Path
        The subject's T1 in template space.
    template_mask : nibabel image, str or Path
        The template's brain mask; its outline is drawn in red.
    path : str or Path
        The PNG to write (atomically).
    title : str
        Usually the subject and the QC figures.
    dpi : int, default 100
        Resolution of the PNG.

    Returns
    -------
    Path
        ``path``.
    """
    from matplotlib.figure import Figure
    from nilearn import plotting

    from dfrn.data.images import load_img

    t1 = load_img(t1_img, "warped T1")
    mask = load_img(template_mask, "template mask")
    fig = Figure(figsize=(10, 3.6), facecolor="black")
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    display = plotting.plot_anat(
        t1, display_mode="ortho", cut_coords=(0, -18, 12), axes=ax, figure=fig,
        title=title or None, annotate=True, draw_cross=False, black_bg=True, dim=0,
    )
    display.add_contours(mask, levels=[0.5], colors="r", linewidths=1.0)
    out = Path(path)
    atomic_write(
        out, lambda p: fig.savefig(p, dpi=dpi, facecolor=fig.get_facecolor(), format="png")
    )
    return out


__all__ += ["plot_registration_qc"]
