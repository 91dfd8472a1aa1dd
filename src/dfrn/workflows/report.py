"""``dfrn report``: one self-contained HTML page for a results folder (jinja2 template).

The page embeds every figure as a base64 PNG and each factor's interactive slice viewer
(nilearn ``view_img``, its scripts inlined, in an ``<iframe srcdoc>``), and it references no
network resource, so it opens from a USB stick. It is written to ``RESULTS/report.html``.
"""

from __future__ import annotations

import base64
import json
import re
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from dfrn.errors import DfrnInputError
from dfrn.evaluation.metrics import mean_r, readable
from dfrn.interpret.sanity import fails_sanity
from dfrn.io import atomic_write_text
from dfrn.workflows.results import ResultsFolder

__all__ = ["write_report", "rewrite_report", "REFERENCES", "training_words", "image_words"]

REFERENCES = [
    "DFRN: deep factor regression of depression symptom factors from structural MRI (the "
    "method implemented here).",
    "Hara K, Kataoka H, Satoh Y (2018). Can spatiotemporal 3D CNNs retrace the history of 2D "
    "CNNs and ImageNet? CVPR.",
    "Springenberg JT et al. (2015). Striving for simplicity: the all convolutional net "
    "(guided backpropagation). ICLR workshop.",
    "Adebayo J et al. (2018). Sanity checks for saliency maps. NeurIPS.",
    "Zeiler MD, Fergus R (2014). Visualizing and understanding convolutional networks "
    "(occlusion). ECCV.",
    "Kaiser HF (1958). The varimax criterion for analytic rotation in factor analysis. "
    "Psychometrika 23:187-200.",
    "Horn JL (1965). A rationale and test for the number of factors in factor analysis. "
    "Psychometrika 30:179-185.",
    "Lorenzo-Seva U, ten Berge JMF (2006). Tucker's congruence coefficient as a meaningful "
    "index of factor similarity. Methodology 2:57-64.",
    "Rolls ET et al. (2020). Automated anatomical labelling atlas 3. NeuroImage 206:116189.",
    "Abraham A et al. (2014). Machine learning for neuroimaging with scikit-learn (nilearn). "
    "Front Neuroinform 8:14.",
    "Schulz MA, Yeo BTT, Vogelstein JT, et al. (2020). Different scaling of linear models and "
    "deep learning in UK Biobank brain images versus machine-learning datasets. Nat Commun "
    "11:4238.",
]
#: Cited in the Methods for the CIs and the model comparison.
COMPARISON_REFERENCES = [
    "Efron B, Tibshirani RJ (1993). An Introduction to the Bootstrap. Chapman & Hall.",
    "Nadeau C, Bengio Y (2003). Inference for the generalization error. Mach Learn "
    "52:239-281.",
    "Bouckaert RR, Frank E (2004). Evaluating the replicability of significance tests for "
    "comparing learning algorithms. PAKDD, LNCS 3056:3-12.",
]
#: Cited in the Methods when the study has covariates.
CONFOUND_REFERENCES = [
    "Snoek L, Miletić S, Scholte HS (2019). How to control for confounds in decoding analyses "
    "of neuroimaging data. NeuroImage 184:741-760.",
    "Dinga R, Schmaal L, Penninx BWJH, Veltman DJ, Marquand AF (2020). Controlling for "
    "effects of confounding variables on machine learning predictions. bioRxiv "
    "2020.08.17.255034.",
    "More S, Eickhoff SB, Caspers J, Patil KR (2021). Confound removal and normalization in "
    "practice: a neuroimaging based sex prediction case study. ECML PKDD 2020 Workshops, "
    "CCIS 1325.",
    "Freedman D, Lane D (1983). A nonstochastic interpretation of reported significance "
    "levels. J Bus Econ Stat 1:292-298.",
    "Winkler AM, Ridgway GR, Webster MA, Smith SM, Nichols TE (2014). Permutation inference "
    "for the general linear model. NeuroImage 92:381-397.",
]
#: Cited when the ridge baseline is harmonised with ComBat.
COMBAT_REFERENCES = [
    "Johnson WE, Li C, Rabinovic A (2007). Adjusting batch effects in microarray expression "
    "data using empirical Bayes methods. Biostatistics 8:118-127.",
    "Fortin JP et al. (2018). Harmonization of cortical thickness measurements across "
    "scanners and sites. NeuroImage 167:104-120.",
]


def _read_tsv(path: Path) -> pd.DataFrame:
    """One of dfrn's tables, names read as text (a factor may be called "NA" or "null")."""
    from dfrn.data.cohort import read_delimited

    return read_delimited(path, path.name, ("participant_id", "factor", "task", "model"),
                          allow_empty=True)


def _png(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def _table(path: Path, round_to: int | None = 3, max_rows: int | None = None) -> str | None:
    if not path.is_file():
        return None
    df = _read_tsv(path)
    if max_rows is not None:
        df = df.head(max_rows)
    return _frame(df, round_to)


def _frame(df: pd.DataFrame, round_to: int | None = 3) -> str:
    """An HTML table of :func:`dfrn.evaluation.metrics.readable` numbers."""
    return readable(df, round_to).to_html(index=False, border=0, na_rep="", escape=True)


_FRAME_MARGIN = 40  # px around a viewer: the page's body margin and the colour bar's labels
_NETWORK_LINK = re.compile(r"<link[^>]+href=[\"']https?://[^>]*>", re.IGNORECASE)


def _viewer(factor: str, fam: Path, background: Any) -> dict[str, str]:
    """One factor's offline slice viewer, with the frame size it needs."""
    from nilearn.plotting import view_img

    img = nib.load(fam)
    data = np.asarray(img.dataobj, dtype=np.float32)
    thr = float(np.percentile(data[data > 0], 90)) if np.any(data > 0) else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        view = view_img(img, bg_img=background, threshold=thr, symmetric_cmap=False,
                        cmap="hot", title=f"|FAM| {factor}", black_bg=True)
        page = view.get_standalone()
    page = _NETWORK_LINK.sub("", page)  # nilearn links its favicon from the web
    # an inline canvas leaves a descender gap under it: a block one ends at its bottom edge
    page = page.replace("</head>", "<style>canvas { display: block; }</style></head>", 1)
    # the frame holds the viewer's own size plus the page's margins; the template's onload
    # grows it to the rendered content, so no scroll bar cuts the slices
    return {"factor": factor, "srcdoc": page, "width": str(int(view.width) + _FRAME_MARGIN),
            "height": str(int(view.height) + _FRAME_MARGIN)}


def _sanity(path: Path) -> tuple[str | None, str, bool]:
    if not path.is_file():
        return None, "", False
    df = _read_tsv(path)
    verdicts = []
    fails = False
    for method, g in df.groupby("method", sort=False):
        fc = g.loc[g["step"] == "fc", "spearman"]
        if len(fc):
            rho = float(fc.iloc[0])
            bad = bool(fails_sanity(df, str(method)))
            fails |= bad and method == df["method"].iloc[0]
            verdicts.append(
                f"{method}: after randomising only the output layer the map keeps a Spearman "
                f"correlation of {rho:.2f} with the trained model's map, so it "
                + ("mostly shows the image, not what the network learned (fails)."
                   if bad else "depends on what the network learned (passes).")
            )
    return _frame(df), " ".join(verdicts), fails


def _stopping_words(t: dict[str, Any], train_sizes: list[int] | None = None) -> str:
    """The stopping rule as it ran: ``train_sizes`` (one per network) decide the split."""
    from dfrn.models.early_stopping import plan_stopping

    rule = t.get("early_stopping", "val")
    fixed = f"for {t['epochs']} epoch{'s' if t['epochs'] != 1 else ''} (no early stopping"
    sizes = train_sizes or []
    plans = [plan_stopping(rule, n, t["val_fraction"], t.get("min_val_subjects", 20))
             for n in sizes]
    stopped = [p for p in plans if p.rule != "none"]
    if rule == "none" or not t["val_fraction"]:
        return fixed + ")"
    if sizes and not stopped:
        return f"{fixed}: {plans[0].reason})"
    if rule == "auto" and not sizes:  # the networks' sizes are unknown: the condition
        return (f"for {t['epochs']} epochs, or with early stopping where the inner "
                f"validation split ({t['val_fraction']:.0%} of the training subjects) held "
                f"at least {t.get('min_val_subjects', 20)} subjects")
    split = ("stratified on the target" if t.get("val_split", "stratified") == "stratified"
             else "random")
    watched = ("the raw validation loss" if rule == "val" else
               f"a moving average (weight {t.get('smoothing', 0.8):g}) of the 3-epoch median "
               "validation loss")
    kept = (f"; no epoch before {t.get('min_epochs', 10)} kept" if rule == "smoothed" else
            f"; no epoch kept or counted before the training loss fell below "
            f"{t.get('learning_start', 0.8):g}" if rule == "auto" else "")
    n_val = (f"{min(p.n_val for p in stopped)}–{max(p.n_val for p in stopped)} subjects, "
             if stopped else "")
    text = (f"for at most {t['epochs']} epochs with early stopping on {watched} of "
            f"{n_val}{t['val_fraction']:.0%} of the training subjects ({split}; patience "
            f"{t['patience']}{kept})")
    if len(stopped) < len(plans):
        text += (f"; {len(plans) - len(stopped)} of {len(plans)} networks trained for "
                 f"{t['epochs']} epochs without it ({next(p for p in plans if p.rule == 'none').reason})")
    return text


def training_words(cfg: dict[str, Any], factors: list[str],
                   train_sizes: list[int] | None = None) -> str:
    """The training recipe in one sentence (the report's Methods and the run's log).

    ``train_sizes`` (the training subjects of each network) let the sentence say whether
    early stopping ran, and on how many validation subjects; without them it names the rule.
    """
    t, m = cfg["training"], cfg["model"]
    joint = m.get("heads", "separate") == "joint"
    heads = (f"One 3D ResNet-10-style network with one output per symptom factor (joint "
             f"heads, the paper's ablation; {', '.join(factors)}" if joint else
             f"One 3D ResNet-10-style network per symptom factor ({', '.join(factors)}")
    optimiser = (f"AdamW (lr {t['lr']}, weight decay {t['weight_decay']:g})"
                 if t.get("weight_decay", 0) > 0 else f"Adam (lr {t['lr']})")
    extras = []
    if t.get("lr_schedule", "constant") == "cosine":
        extras.append("a cosine learning-rate schedule")
    if t.get("augment", "none") != "none":
        extras.append("TorchIO augmentation of the training batches (random affine ±3°, ±2 "
                      "mm, ±3% scale" + (", bias field" if t.get("augment_bias_field") else "")
                      + (", left-right flips" if t.get("augment_flip") else ", no flips") + ")")
    loss = "sum of the factors' squared errors" if joint else "sum of squared errors"
    if t.get("bn_stats", "running") == "recompute":
        extras.append("BatchNorm statistics averaged over each network's training subjects "
                      "after training (no gradient) and the output intercept refitted on "
                      "them (least squares)")
    n_seeds = int(t.get("n_seeds", 1))
    if n_seeds > 1:
        extras.append(f"{n_seeds} seeds per fold, their predictions averaged")
    widen = float(m.get("widen_factor", 1.0))
    width = "" if widen == 1.0 else f"; channels × {widen:g}, as MONAI's widen_factor"
    return (f"{heads}; block strides {m['block_strides']}{width}) was trained with the "
            f"{loss}, {optimiser}, batch "
            f"size {t['batch_size']}, {_stopping_words(t, train_sizes)}"
            + ("" if not extras else ", with " + ", ".join(extras)) + ".")


_GENERIC_IMAGE_COLUMNS = ("", "t1", "t1w", "image", "img", "scan", "mri", "nifti")


def image_words(n_subjects: int, *, image_column: str = "t1", intensity: str = "zscore",
                mask: bool = False, downsample: int = 1, bids: bool = False) -> str:
    """What the network's input images are, in one sentence (the Methods and the run's log).

    ``zscore`` and ``minmax`` are normalised T1-weighted images; ``intensity = "none"`` maps
    (e.g. binary lesion maps) are named from the image column and used as they are.

    Parameters
    ----------
    n_subjects : int
        Participants in the study.
    image_column, intensity, mask, downsample, bids
        The ``[cohort]`` keys (``mask``: whether a brain mask is set; ``bids``: whether the
        images come from a BIDS root rather than a table's column).

    Returns
    -------
    str
        e.g. "944 participants' lesion maps (image column 'lesion') on a common grid were used
        as they are (intensity none: no normalisation) and downsampled by 1."
    """
    if intensity != "none":
        return (f"{n_subjects} participants' T1-weighted images on a common grid were "
                f"normalised ({intensity}{' inside a brain mask' if mask else ''}) and "
                f"downsampled by {downsample}.")
    if bids:
        maps = "maps (the BIDS *_T1w files)"
    else:
        stem = re.sub(r"[\s_.-]*(paths?|files?|images?|imgs?|maps?|nii|gz)$", "",
                      image_column.strip(), flags=re.IGNORECASE)
        stem = re.sub(r"[\s_.-]+", " ", stem).strip()
        maps = (f"maps (image column '{image_column}')" if stem.lower() in _GENERIC_IMAGE_COLUMNS
                else f"{stem} maps (image column '{image_column}')")
    return (f"{n_subjects} participants' {maps} on a common grid were used as they are "
            f"(intensity none: no normalisation{'; 0 outside a brain mask' if mask else ''}) "
            f"and downsampled by {downsample}.")


def _baseline_methods(cfg: dict[str, Any]) -> str:
    """The Methods sentences on the ridge baselines that ran (``models_run``, set by
    :func:`write_report` from the folder), else on those the config enables."""
    b = cfg.get("baseline", {})
    models = b.get("models_run")
    if models is None:  # older configs have no models list: the ROI ridge only
        models = b.get("models", ["roi_ridge"]) if b.get("enabled", True) else []
    permuted = b.get("models_permuted", models)
    text = ""

    def tested(model: str) -> str:
        return ", with a permutation test. " if model in permuted else ". "

    if "roi_ridge" in models:
        column = cfg["cohort"].get("gm_column") or "gm"
        text += (f"A ridge regression on the atlas-region sums of the '{column}' maps (ml) was "
                 "evaluated on the same folds" + tested("roi_ridge"))
    if "voxel_ridge" in models:
        text += ("A ridge regression on the network's input voxels (dual form; the network's "
                 "inputs, targets and folds, its penalty chosen by inner cross-validation on "
                 "each training fold) was evaluated as a linear yardstick (Schulz et al. 2020)"
                 + tested("voxel_ridge"))
    return text


def _baseline_models_run(folder: ResultsFolder) -> list[str]:
    """The baseline models whose predictions the folder holds: what the Methods describe
    (``[baseline] models`` may have grown on a resume, the ROI ridge may have lacked an
    atlas, or a later ``dfrn baseline`` ran on a run without the stage)."""
    from dfrn.workflows.confounds import BASELINE_KEYS, baseline_files

    return [m for m in BASELINE_KEYS if baseline_files(folder.root, m).predictions.is_file()]


def _baseline_models_permuted(folder: ResultsFolder) -> list[str]:
    """The baseline models whose permutation test ran (none with residualised targets or
    ``n_permutations = 0``): only those are said to have one."""
    from dfrn.workflows.confounds import BASELINE_KEYS, baseline_files

    return [m for m in BASELINE_KEYS if baseline_files(folder.root, m).permutation.is_file()]


def _ridge_table(folder: ResultsFolder, metrics: pd.DataFrame) -> str | None:
    """The ridge-vs-DFRN table: mean and sd of r over repeats per factor, each ridge baseline
    of the folder (``ridge``: ROI volumes; ``voxel_ridge``: the network's inputs) beside DFRN."""
    from dfrn.workflows.confounds import BASELINE_KEYS, baseline_files

    table = mean_r(metrics)[["mean_r", "sd_r"]].rename(columns={"mean_r": "dfrn_r",
                                                                "sd_r": "dfrn_sd"})
    found = False
    for model, key in BASELINE_KEYS.items():
        path = baseline_files(folder.root, model).metrics
        if path.is_file():
            base = mean_r(folder.read_metrics(path))[["mean_r", "sd_r"]]
            table = table.join(base.rename(columns={"mean_r": f"{key}_r", "sd_r": f"{key}_sd"}))
            found = True
    return _frame(table.reset_index()) if found else None


def _comparison_context(folder: ResultsFolder, cfg: dict[str, Any]) -> dict[str, Any]:
    """The comparison's verdict sentences (network vs each baseline first) and its table."""
    from dfrn.workflows.comparison import readable_comparison, verdict_sentence

    scope = ("Raw comparison: every model sees its inputs as they are (no covariate is "
             "regressed out of any model's features)")
    if _covariate_names(cfg):
        scope += (("; all were trained on the residualised targets" if
                   cfg.get("confounds", {}).get("target") == "residualize" else
                   "; the covariates-only model is the bar")
                  + ". The comparison beyond the covariates is the section above.")
    else:
        scope += "."
    if not folder.comparison.is_file():
        return {"comparison": None, "comparison_verdicts": [], "comparison_scope": scope}
    table = _read_tsv(folder.comparison)
    words = {"dfrn": "DFRN", "ridge": "ROI ridge", "voxel_ridge": "voxel ridge",
             "covariates": "covariates"}
    verdicts = [f"{words.get(r.model_a, r.model_a)} vs {words.get(r.model_b, r.model_b)}, "
                f"{verdict_sentence(pd.Series(r._asdict()))}" for r in table.itertuples()]
    html = readable_comparison(table).to_html(index=False, border=0, na_rep="", escape=True)
    return {"comparison": html, "comparison_verdicts": verdicts, "comparison_scope": scope}


def _baseline_permutations(folder: ResultsFolder) -> str | None:
    """The ridge baselines' permutation tests in one table, a ``model`` column first."""
    from dfrn.workflows.confounds import BASELINE_KEYS, baseline_files

    frames = [_read_tsv(path).assign(model=key)
              for model, key in BASELINE_KEYS.items()
              if (path := baseline_files(folder.root, model).permutation).is_file()]
    if not frames:
        return None
    table = pd.concat(frames, ignore_index=True)
    return _frame(table[["model", *[c for c in table.columns if c != "model"]]], 4)


def _train_sizes(folder: ResultsFolder) -> list[int] | None:
    """Each finished CV network's training-set size (``task.json``'s ``n_train``)."""
    sizes = []
    for meta_file in sorted(folder.tasks.glob("*/task.json")) if folder.tasks.is_dir() else []:
        n = json.loads(meta_file.read_text(encoding="utf-8")).get("n_train")
        if n is not None:
            sizes.append(int(n))
    return sizes or None


def _methods(cfg: dict[str, Any], n_subjects: int, factors: list[str],
             train_sizes: list[int] | None = None) -> str:
    c, cv = cfg["cohort"], cfg["cv"]
    text = (
        image_words(n_subjects, image_column=str(c.get("image_column", "t1")),
                    intensity=str(c.get("intensity", "zscore")), mask=bool(c.get("mask")),
                    downsample=int(c.get("downsample", 1)), bids=bool(c.get("bids")))
        + " " + training_words(cfg, factors, train_sizes)
        + f" Performance was estimated by {cv['n_repeats']} × {cv['n_folds']}-fold "
        "subject-level cross-validation (Pearson r of pooled out-of-fold predictions per "
        "repeat). "
    )
    if "factors" in cfg:
        f = cfg["factors"]
        text += (
            f"Symptom factors were derived by principal components with varimax rotation "
            f"({f['n_factors']} factors, fitted on {'all subjects' if f['fit_on'] == 'all' else 'each training fold'}). "
        )
    text += _baseline_methods(cfg)
    text += _comparison_methods(cfg)
    text += _confound_methods(cfg)
    att = cfg.get("attention", {})
    if att.get("enabled", True) and att.get("ablation", True):
        base = ("the training subjects' mean input" if att.get("ablation_baseline", "train_mean")
                == "train_mean" else "zero")
        text += ("Region importance was measured out of fold by ablation (occlusion; Zeiler & "
                 "Fergus 2014) with captum's FeatureAblation: each atlas region of each test "
                 f"subject's input was set to {base} of its fold, the fold's model predicted "
                 "again, and the fall in the pooled out-of-fold r was recorded, with a "
                 f"{att.get('bootstrap', 1000)}-resample bootstrap CI over subjects. ")
    if cfg.get("attention", {}).get("enabled", True):
        text += (f"Factor attention maps were computed with {cfg['attention']['method']} and "
                 "checked with the cascading model-randomisation test.")
    return text


def _comparison_methods(cfg: dict[str, Any]) -> str:
    """The Methods sentences on the CIs and the model comparison."""
    n = cfg.get("compare", {}).get("bootstrap", 2000)
    if not n:
        return ""
    return (f"Each r has a 95% percentile bootstrap CI over subjects ({n} resamples of the "
            "pooled out-of-fold predictions, the same resamples for every model and repeat; "
            "Efron & Tibshirani 1993). Models run on the same folds were compared by Δr with "
            "a paired bootstrap CI and by the corrected resampled t-test of the folds' mean "
            "squared errors, which accounts for the overlap of the training sets (Nadeau & "
            "Bengio 2003; Bouckaert & Frank 2004); a model was said to beat another when both "
            "agreed at the 5% level. No covariate was regressed out of any model's features. ")


def _covariate_names(cfg: dict[str, Any]) -> list[str]:
    from dfrn.data.covariates import covariate_names

    return covariate_names(cfg["cohort"].get("covariates", []), cfg["cohort"].get("site", ""))


def _confound_methods(cfg: dict[str, Any]) -> str:
    """The Methods sentences on covariates, residualisation and harmonisation."""
    from dfrn.data.covariates import describe_covariates

    names = _covariate_names(cfg)
    if not names:
        return ""
    words = describe_covariates(names)
    conf = cfg.get("confounds", {})
    text = (
        f"Covariates: {words} (categorical ones one-hot coded). A covariates-only linear model "
        "was cross-validated in the same folds. Each model's pooled out-of-fold predictions "
        f"were judged by what they add beyond {words} (Dinga et al. 2020; More et al. 2021): "
        "the partial correlation r(y, ŷ | covariates) with its parametric p, the ΔR² of "
        "y ~ covariates + ŷ over y ~ covariates, and a permutation p for ΔR² by Freedman–Lane "
        f"({conf.get('n_permutations', 1000)} permutations of the residuals of y ~ covariates; "
        "Winkler et al. 2014). "
    )
    if conf.get("target") == "residualize":
        text += ("The targets were residualised on the covariates inside each training fold "
                 "(ordinary least squares fitted on the training subjects and applied to the "
                 "test subjects; Snoek et al. 2019); Table 1 reports r on those residuals. ")
    if cfg.get("baseline", {}).get("harmonize") == "combat":
        text += ("The ridge baseline's ROI features were harmonised across sites with ComBat "
                 "(Johnson et al. 2007; Fortin et al. 2018), learned on each training fold while "
                 "keeping the covariates' effects, and applied to its test fold. ")
    return text


def _confounds_context(folder: ResultsFolder, cfg: dict[str, Any]) -> dict[str, Any]:
    """The report's "Beyond the covariates" section, or an empty one."""
    from dfrn.data.covariates import describe_covariates

    names = _covariate_names(cfg)
    if not names or not folder.confounds_summary.is_file():
        return {"confounds": None, "confound_verdicts": [], "covariate_words": ""}
    summary = _read_tsv(folder.confounds_summary)
    verdicts = [(r.factor, r.verdict) for r in summary.itertuples() if r.model != "covariates"]
    table = summary.drop(columns=["verdict"])
    return {"confounds": _frame(table, 3), "confound_verdicts": verdicts,
            "covariate_words": describe_covariates(names)}


def _references(cfg: dict[str, Any]) -> list[str]:
    refs = list(REFERENCES)
    if cfg.get("compare", {}).get("bootstrap", 2000):
        refs += COMPARISON_REFERENCES
    if _covariate_names(cfg):
        refs += CONFOUND_REFERENCES
    if cfg.get("baseline", {}).get("harmonize") == "combat":
        refs += COMBAT_REFERENCES
    t = cfg.get("training", {})
    if t.get("augment", "none") != "none":
        refs.append("Pérez-García F, Sparks R, Ourselin S (2021). TorchIO: a Python library for "
                    "efficient loading, preprocessing, augmentation and patch-based sampling of "
                    "medical images in deep learning. Comput Methods Programs Biomed 208:106236.")
    if t.get("weight_decay", 0) > 0:
        refs.append("Loshchilov I, Hutter F (2019). Decoupled weight decay regularization "
                    "(AdamW). ICLR.")
    return refs


def _target_note(cfg: dict[str, Any]) -> str:
    from dfrn.data.covariates import describe_covariates

    if cfg.get("confounds", {}).get("target") == "residualize":
        return (f"Targets residualised on {describe_covariates(_covariate_names(cfg))} inside "
                "each training fold: r is on the residuals.")
    return "Raw targets."


def _regions_title(cfg: dict[str, Any], fails: bool) -> str:
    method = cfg.get("attention", {}).get("method", "guided_backprop")
    title = f"Top regions by mean |attention| ({method})"
    if fails:
        return (f"{title}: an image-driven map ({method} fails the sanity check below), not a "
                "ranking of what the networks use")
    return title


def _training_histories(folder: ResultsFolder) -> pd.DataFrame | None:
    """Repeat 0's finished CV tasks (seed 0): each epoch's losses and the chosen epoch.

    Reads ``cv/tasks/<task>/history.tsv`` and ``task.json`` of every task folder with a
    manifest (a finished task); a joint network's curves are labelled "all factors (joint)".
    None when there is none (e.g. a copied folder without its tasks).
    """
    frames = []
    for task in sorted(folder.tasks.glob("repeat-0_fold-*")) if folder.tasks.is_dir() else []:
        files = [task / n for n in ("manifest.json", "task.json", "history.tsv")]
        if not all(f.is_file() for f in files):
            continue
        meta = json.loads(files[1].read_text(encoding="utf-8"))
        if int(meta.get("seed_index", 0)) != 0:
            continue
        history = _read_tsv(files[2])
        factor = "all factors (joint)" if meta.get("factors") else str(meta["factor"])
        frames.append(history.reindex(columns=["epoch", "train_loss", "val_loss"]).assign(
            factor=factor, fold=int(meta["fold"]),
            chosen_epoch=int(meta.get("chosen_epoch", meta.get("best_epoch", -1)))))
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True)


def _learning_context(folder: ResultsFolder, metrics: pd.DataFrame) -> dict[str, Any]:
    """Table 1's companions: per-fold r, learning warnings and the training-curves figure."""
    from dfrn.evaluation.learning import learning_warnings
    from dfrn.evaluation.metrics import fold_r, fold_r_summary
    from dfrn.plotting import plot_training_curves

    folds = None
    if folder.predictions.is_file():
        summary = fold_r_summary(fold_r(folder.read_predictions()), metrics)
        folds = _frame(summary, 3)
    learning_tsv, warned = folder.cv / "learning.tsv", {}
    if learning_tsv.is_file():  # absent in folders of older versions: nothing to show
        learning = _read_tsv(learning_tsv)
        missing = {"factor", "task", "learned", "warning"} - set(learning.columns)
        if missing:
            raise DfrnInputError(f"{learning_tsv} lacks the column(s) {', '.join(sorted(missing))}"
                                 "; rerun 'dfrn run' with the same config and --out")
        warned = learning_warnings(learning)
    histories = _training_histories(folder)
    if histories is not None:
        plot_training_curves(histories, folder.figure("training_curves"))
    return {"fold_r": folds, "learning_warnings": list(warned.items()),
            "training_curves": _png(folder.figure("training_curves"))}


@dataclass(frozen=True)
class _Run:
    """What a finished results folder says about its run."""

    folder: ResultsFolder
    cfg: dict[str, Any]  # config.toml, as read
    env: dict[str, Any]  # environment.json
    metrics: pd.DataFrame
    factors: list[str]
    n_subjects: int


def _read_run(out: str | Path) -> _Run:
    """The run written to ``out``; an error when it is not a finished results folder."""
    import tomllib

    folder = ResultsFolder(Path(out))
    if not folder.is_run() or not folder.metrics.is_file():
        raise DfrnInputError(
            f"{out} is not a finished results folder of 'dfrn run' (no run.json or "
            "cv/metrics.tsv); run or resume 'dfrn run' first"
        )
    cfg = tomllib.loads(folder.config_toml.read_text(encoding="utf-8"))
    env = json.loads(folder.environment_json.read_text(encoding="utf-8"))
    plan = folder.read_folds()
    metrics = folder.read_metrics()
    return _Run(folder, cfg, env, metrics, factors=list(dict.fromkeys(metrics["factor"])),
                n_subjects=int(plan["participant_id"].nunique()))


def _header_context(run: _Run, notes: list[str] | None) -> dict[str, Any]:
    """The page's header: the study, the software and when the page was written."""
    from dfrn.models.package import dfrn_version

    cfg, env = run.cfg, run.env
    ds = cfg["cohort"].get("downsample", 1)
    return {
        "title": run.folder.root.resolve().name,
        "version": dfrn_version(),
        "written": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "n_subjects": run.n_subjects,
        "factors": run.factors,
        "cv": f"{cfg['cv']['n_repeats']} × {cfg['cv']['n_folds']}-fold, seed {cfg['cv']['seed']}",
        "network_input": f"downsample {ds}, intensity {cfg['cohort'].get('intensity', 'zscore')}",
        "environment": f"Python {env.get('python')}, torch {env.get('packages', {}).get('torch')}"
                       f", {env.get('platform')}",
        "notes": notes or [],
        "config_text": run.folder.config_toml.read_text(encoding="utf-8"),
    }


def _viewers(folder: ResultsFolder, cfg: dict[str, Any],
             factors: list[str]) -> list[dict[str, str]]:
    """The slice viewers of the factors with a FAM, over ``[attention] template``."""
    template = cfg.get("attention", {}).get("template") or "MNI152"
    background: Any = template
    if template != "MNI152" and Path(template).is_file():
        background = nib.load(template)
    viewers = []
    for factor in factors:
        fam = folder.fam(factor, absolute=True)
        if fam.is_file():
            viewers.append(_viewer(factor, fam, background))
    return viewers


def _attention_context(run: _Run) -> dict[str, Any]:
    """The attention section: viewers, top regions, region ablation and the sanity check."""
    folder = run.folder
    viewers = _viewers(folder, run.cfg, run.factors)
    sanity, verdict, fails = _sanity(folder.attention_table("sanity"))
    regions = None
    if folder.attention_table("regions").is_file():
        reg = _read_tsv(folder.attention_table("regions"))
        regions = _frame(reg[reg["rank"] <= 5], 4)
    ablation = None
    if folder.region_ablation.is_file():
        abl = _read_tsv(folder.region_ablation)
        ablation = _frame(abl[abl["rank"] <= 5][["factor", "rank", "region", "delta_r", "ci_low",
                                                 "ci_high", "mean_abs_change"]], 3)
    return {"viewers": viewers, "regions": regions,
            "regions_title": _regions_title(run.cfg, fails), "ablation": ablation,
            "sanity": sanity, "sanity_verdict": verdict, "sanity_fails": fails}


def _render(folder: ResultsFolder, context: dict[str, Any]) -> Path:
    """Render the page's template with ``context`` into ``report.html``; its path."""
    import jinja2

    loader = jinja2.PackageLoader("dfrn.workflows", "templates")
    environment = jinja2.Environment(loader=loader, autoescape=jinja2.select_autoescape(["j2"]))
    text = environment.get_template("report.html.j2").render(**context)
    path = folder.root / "report.html"
    atomic_write_text(path, text)
    return path


def write_report(out: str | Path, notes: list[str] | None = None) -> Path:
    """Write ``out/report.html`` from whatever the results folder holds; return its path."""
    run = _read_run(out)
    folder, cfg = run.folder, run.cfg
    ridge = _ridge_table(folder, run.metrics)
    cfg.setdefault("baseline", {})["models_run"] = _baseline_models_run(folder)
    cfg["baseline"]["models_permuted"] = _baseline_models_permuted(folder)
    attention = _attention_context(run)
    stability = _table(folder.factors / "stability_summary.tsv")
    return _render(folder, {
        **_header_context(run, notes),
        "table1": _table(folder.table1, None),
        "stability": stability,
        "fig2": _png(folder.figure("fig2_scatter")),
        "ridge": ridge,
        "fig3": _png(folder.figure("fig3_rr_vs_dfrn")),
        "network_permutation": _table(folder.network_permutation, 4),
        "baseline_permutation": _baseline_permutations(folder),
        "fig4": _png(folder.figure("fig4_fam")),
        **attention,
        "loadings": _table(folder.factors / "loadings.tsv"),
        "fig_loadings": _png(folder.figure("factor_loadings")),
        "prep_text": "No preprocessing ran in dfrn: the images were registered by the user "
                     "(QC tables and mosaics appear here when dfrn prep made the inputs).",
        "methods": _methods(cfg, run.n_subjects, run.factors, _train_sizes(folder)),
        "references": _references(cfg),
        "target_note": _target_note(cfg),
        **_confounds_context(folder, cfg),
        **_comparison_context(folder, cfg),
        "packages": [f for f in run.factors
                     if (folder.model_package(f) / "metadata.json").is_file()],
        **_learning_context(folder, run.metrics),
    })


def rewrite_report(out: str | Path) -> Path:
    """``dfrn report RESULTS``: rewrite ``cv/comparison.tsv`` from the folder's predictions
    (under its lock), then ``report.html``; return the page's path."""
    from dfrn.workflows.comparison import refresh_comparison

    refresh_comparison(out)
    return write_report(out)
