"""``dfrn predict``: apply a study's model packages to new scans, with grid and leakage checks.

For every package (``MODEL`` itself, or each ``RESULTS/models/<factor>/``):

1. every scan's header is checked against the package's grid (shape and affine, within
   1e-3 mm): a scan off the grid is refused, by name, with a pointer to ``dfrn prep``;
2. scans whose content (:func:`dfrn.models.package.scan_content_digest`: voxels and affine,
   however the file was re-saved) is among the package's training scans are refused (the
   leakage check) unless ``allow_training_subjects``;
3. scans with no signal inside the package's brain mask (all zero or constant) are refused by
   name and file, unless the package reads raw intensities (``intensity = "none"``, where an
   empty map is an observation). A package trained on binary maps (:func:`_binary_values`:
   ``dfrn run`` records their values) refuses a scan with other values inside its mask (an
   empty map is still binary); NaN or inf voxels inside any package's mask (anywhere, for a
   package without one) are refused for every package;
4. scans are normalised and downsampled by :class:`dfrn.data.images.VolumeCache` with the
   package's mask and settings: the code path that made the training inputs (one subject's
   empty map is valid for an ``intensity = "none"`` package, even alone);
5. every network of the package predicts; ``predictions.tsv`` holds participant_id, factor,
   prediction (the ensemble mean), ensemble_sd, n_models, adjusted_for and prediction_full.
   A package trained on targets residualised on covariates (``[confounds] target =
   "residualize"``) predicts that residual (``adjusted_for`` names the covariates);
   ``prediction_full`` adds each network's covariate part back when the new cohort's table
   has the covariates, and is empty (NaN) when it lacks one: the log names it, and nothing is
   ever treated as zero. For other packages ``prediction_full`` equals ``prediction``;
6. ``lower`` and ``upper``: the CV+ interval at ``coverage`` (default 0.9) from the fold
   networks and their out-of-fold residuals (:mod:`dfrn.evaluation.conformal`), in the
   target units of ``prediction``; ``ood_score``, ``ood`` and ``ood_reason``: the
   out-of-distribution check (:mod:`dfrn.models.ood`) on the same network inputs. The log
   says how many scans each package flags; ``strict`` leaves flagged scans out of the
   table, one log line each. A package made before both (schema 2) predicts with these
   columns empty and one note; a refit package has no intervals (no fold networks).

With ``regions`` each subject's per-region sensitivity is written to ``regions.tsv``:
participant_id, factor, region, abs_change, the |change| of the subject's (ensemble)
prediction, in target units, when that atlas region of its scan is replaced by the
networks' neutral value (their training subjects' mean input, or 0). It is individual
sensitivity, not group importance: with no targets there is no r to lose (the study's
``attention/region_ablation.tsv`` measures that).

With ``attention`` each subject's guided-backprop map (averaged over the package's networks,
on the input grid, with its affine) is written to ``attention/``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dfrn.data.cohort import Cohort, load_bids_cohort, load_cohort_table
from dfrn.data.images import (
    AFFINE_ATOL,
    VolumeCache,
    VolumeSet,
    load_volume,
    read_header,
)
from dfrn.errors import DfrnInputError, ResultsFolderError, listed
from dfrn.evaluation.conformal import check_coverage, cv_plus_interval
from dfrn.io import atomic_write_nifti, atomic_write_tsv, file_digest
from dfrn.models.ood import (
    DETECTORS,
    STATISTICS,
    FeatureModel,
    OODCalibration,
    image_statistics,
    predict_with_features,
)
from dfrn.models.package import (
    UNCERTAINTY_SINCE,
    ModelPackage,
    load_package,
    scan_content_digest,
)
from dfrn.models.regressor import resolve_device

__all__ = ["PREDICT_COLUMNS", "find_packages", "predict_cohort"]

PREDICT_COLUMNS = ["participant_id", "factor", "prediction", "ensemble_sd", "n_models",
                   "adjusted_for", "prediction_full", "lower", "upper", "ood_score", "ood",
                   "ood_reason"]


def find_packages(path: str | Path) -> list[Path]:
    """The package folders in ``path``: itself, or ``path/models/*`` of a results folder."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return [path]
    models = path / "models"
    found = sorted(p for p in models.iterdir() if (p / "metadata.json").is_file()) \
        if models.is_dir() else []
    if not found:
        raise DfrnInputError(
            f"{path} holds no model package (no metadata.json, no models/<factor>/); run "
            "'dfrn run' to the end first"
        )
    return found


def _load_cohort(source: Path, image_column: str, session: str | None) -> Cohort:
    if source.is_dir():
        return load_bids_cohort(source, [], session=session)
    return load_cohort_table(source, [], image_column)


def _check_grid(cohort: Cohort, package: ModelPackage) -> None:
    inp = package.metadata["input"]
    shape = tuple(inp["shape"])
    affine = np.asarray(inp["affine"], dtype=float)
    bad = []
    for pid, path in zip(cohort.participant_ids, cohort.images, strict=True):
        spec = read_header(path, f"participant {pid}")
        if spec.shape != shape or not np.allclose(spec.affine, affine, atol=AFFINE_ATOL):
            bad.append(f"participant {pid} ({path}, shape {spec.shape})")
    if bad:
        raise DfrnInputError(
            f"{len(bad)} scan(s) are not on the grid of model {package.factor} "
            f"({inp['template']}, shape {shape}): {listed(bad, sep='; ')}; register them "
            "to the template first (dfrn prep)"
        )


def _no_signal(data: np.ndarray, mask: np.ndarray | None) -> bool:
    """Whether ``data`` is constant (e.g. all zero) inside ``mask`` (or overall without one)."""
    values = data[mask] if mask is not None else data.ravel()
    return values.size == 0 or bool(values.min() == values.max())


def _binary_values(package: ModelPackage) -> list[float] | None:
    """The two values of the binary maps a package was trained on, or None.

    A package read as it is (``intensity = "none"``) whose metadata records the training
    scans' distinct values inside the brain mask (``input.values``, at most two, e.g.
    ``[0, 1]`` for lesion maps) was trained on binary maps; any other package was not.
    """
    inp = package.metadata["input"]
    values = inp.get("values")
    if inp["intensity"] != "none" or not values or len(values) > 2:
        return None
    return [float(v) for v in values]


def _off_values(data: np.ndarray, mask: np.ndarray | None, values: list[float]) -> str:
    """How a scan departs from a binary package's values inside ``mask`` ("" when it does
    not): an empty map (all 0) is a binary map."""
    v = data[mask] if mask is not None else data.ravel()
    off = ~np.isclose(v[:, None], np.asarray(values)[None], rtol=1e-5, atol=1e-6).any(axis=1)
    n = int(off.sum())
    return f"{n} voxel(s) such as {float(v[off][0]):g}" if n else ""


def _package_masks(packages: list[ModelPackage]) -> list[np.ndarray | None]:
    """Each package's brain mask (boolean), loaded once; None for a package without one."""
    return [load_volume(pkg.mask_path, f"brain mask of model {pkg.factor}")[0] > 0
            if pkg.mask_path is not None else None for pkg in packages]


def _check_content(cohort: Cohort, packages: list[ModelPackage], allow_training: bool) -> None:
    """Refuse training scans (by content, unless ``allow_training``), scans with no signal
    (packages that normalise intensities), non-binary scans (packages trained on binary
    maps) and NaN or inf voxels inside any package's brain mask (anywhere without one).

    Each scan is decoded once; each package's mask is loaded once.
    """
    masks = _package_masks(packages)
    nan_region = None if any(m is None for m in masks) else np.logical_or.reduce(masks)
    maskless = [pkg.factor for pkg, m in zip(packages, masks, strict=True) if m is None]
    nan_hint = (f"set them to a number (e.g. 0): model {listed(maskless)} was trained without a "
                "brain mask, so it reads every voxel") if maskless else None
    binary = [_binary_values(pkg) for pkg in packages]
    trained = [set(pkg.metadata["training_scans_content_sha256"]) for pkg in packages]
    seen: list[list[str]] = [[] for _ in packages]
    blank: list[list[str]] = [[] for _ in packages]
    mixed: list[list[str]] = [[] for _ in packages]
    for pid, path in zip(cohort.participant_ids, cohort.images, strict=True):
        data, affine = load_volume(path, f"participant {pid}", nan_region, nan_hint=nan_hint)
        digest = scan_content_digest(data, affine)
        for i, pkg in enumerate(packages):
            if digest in trained[i]:
                seen[i].append(pid)
            if pkg.metadata["input"]["intensity"] != "none" and _no_signal(data, masks[i]):
                blank[i].append(f"participant {pid} ({path})")
            off = _off_values(data, masks[i], binary[i]) if binary[i] is not None else ""
            if off:
                mixed[i].append(f"participant {pid} ({path}: {off})")
    _refuse_content(packages, seen, blank, mixed, binary, allow_training)


def _refuse_content(packages: list[ModelPackage], seen: list[list[str]],
                    blank: list[list[str]], mixed: list[list[str]],
                    binary: list[list[float] | None], allow_training: bool) -> None:
    """The one-line refusals of :func:`_check_content`, one package at a time."""
    for package, pids in zip(packages, seen, strict=True):
        if pids and not allow_training:
            raise DfrnInputError(
                f"{len(pids)} scan(s) were used to train model {package.factor}: participant "
                f"{listed(pids)}; their predictions would be in-sample (pass "
                "--allow-training-subjects to predict them anyway)"
            )
    for package, names, values in zip(packages, mixed, binary, strict=True):
        where = "inside the brain mask of" if package.mask_path is not None else "for"
        if names and values is not None:
            words = " and ".join(f"{v:g}" for v in values)
            raise DfrnInputError(
                f"{len(names)} scan(s) are not binary maps {where} model {package.factor}, "
                f"which was trained on binary maps ({words}) used as they are: "
                f"{listed(names, sep='; ')}; give each subject's binary map with the values "
                f"{words} (an empty map is fine)"
            )
    for package, names in zip(packages, blank, strict=True):
        if names:
            where = "inside the brain mask of" if package.mask_path is not None else "for"
            raise DfrnInputError(
                f"{len(names)} scan(s) have no signal {where} model {package.factor} (all zero "
                f"or constant): {listed(names)}; check that each is the subject's T1 scan, "
                "registered to the template"
            )


def predict_cohort(
    model_or_results: str | Path,
    cohort_source: str | Path,
    out: str | Path,
    *,
    image_column: str = "t1",
    session: str | None = None,
    allow_training_subjects: bool = False,
    attention: bool = False,
    regions: bool = False,
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
    coverage: float = 0.9,
    strict: bool = False,
) -> pd.DataFrame:
    """Predict every factor of the packages for every scan of a cohort; write ``out``.

    Raises
    ------
    DfrnInputError
        For a package that fails validation, a scan off the grid, a training scan (without
        ``allow_training_subjects``), a ``coverage`` outside (0, 1), or an ``out`` folder
        that already holds predictions.
    """
    coverage = check_coverage(coverage)
    out = Path(out)
    if (out / "predictions.tsv").exists():
        raise ResultsFolderError(f"{out} already holds predictions.tsv; choose another --out")
    resolve_device(device, option="--device")
    packages = [load_package(p, device=device) for p in find_packages(model_or_results)]
    if regions:
        for package in packages:
            package.regions()  # a package without an atlas: one line, before any work
    region_rows: list[pd.DataFrame] = []
    cohort = _load_cohort(Path(cohort_source), image_column, session)
    for package in packages:
        _check_grid(cohort, package)
    _check_content(cohort, packages, allow_training_subjects)
    digests = [file_digest(p) for p in cohort.images]
    rows = []
    for package in packages:
        volumes = _package_volumes(package, cohort, digests, out, progress, log)
        rows += _package_rows(package, cohort, volumes, log, coverage, strict)
        if attention:
            _write_attention(package, volumes, cohort, out, log)
        if regions:
            region_rows.append(_region_sensitivity(package, volumes, cohort))
    table = pd.DataFrame(rows, columns=PREDICT_COLUMNS)
    atomic_write_tsv(table, out / "predictions.tsv", float_format=None)
    log(f"predicted {len(packages)} factor(s) for {len(cohort)} scan(s): {out / 'predictions.tsv'}")
    if regions:
        atomic_write_tsv(pd.concat(region_rows, ignore_index=True), out / "regions.tsv",
                         float_format=None)
        log(f"per-region sensitivity (individual, not group importance): {out / 'regions.tsv'}")
    return table


def _package_volumes(package: ModelPackage, cohort: Cohort, digests: list[str], out: Path,
                     progress: bool, log: Callable[[str], None]) -> VolumeSet:
    """The cohort's scans as the package's network inputs (its mask and settings)."""
    inp = package.metadata["input"]
    return VolumeCache(out / "cache").prepare(
        cohort.participant_ids, cohort.images, int(inp["downsample"]), package.mask_path,
        progress=progress, intensity=inp["intensity"], digests=digests, log=log,
        allow_constant=True,  # scans without signal were refused above, where it matters
    )


def _package_rows(package: ModelPackage, cohort: Cohort, volumes: VolumeSet,
                  log: Callable[[str], None], coverage: float = 0.9,
                  strict: bool = False) -> list[tuple]:
    """One :data:`PREDICT_COLUMNS` row per subject: the package's ensemble prediction, its
    interval and its out-of-distribution check (flagged subjects left out when ``strict``)."""
    outputs = [predict_with_features(est, volumes) for est in package.estimators]
    preds = np.stack([pred for pred, _ in outputs])
    sd = preds.std(axis=0, ddof=1) if len(preds) > 1 else np.full(preds.shape[1], np.nan)
    adjusted, full = _full_prediction(package, cohort, preds, log)
    if "conformal" not in package.metadata and "ood" not in package.metadata:
        log(f"model {package.factor}: no intervals/OOD check: package made by dfrn < "
            f"{UNCERTAINTY_SINCE}; re-run 'dfrn run' on its results folder to add them")
    elif not package.metadata.get("conformal"):
        log(f"model {package.factor}: no intervals: a refit package holds no fold networks")
    lower, upper = _intervals(package, preds, coverage)
    score, flagged, reasons = _ood_check(package, volumes, [f for _, f in outputs], log)
    rows = []
    for i, pid in enumerate(cohort.participant_ids):
        if strict and flagged[i] is True:
            log(f"--strict: refused participant {pid} for model {package.factor}: out of "
                f"distribution ({reasons[i]}; ood_score {score[i]:.1f})")
            continue
        rows.append((pid, package.factor, float(preds[:, i].mean()), float(sd[i]), len(preds),
                     adjusted, float(full[i]), float(lower[i]), float(upper[i]),
                     float(score[i]), flagged[i], reasons[i]))
    return rows


def _intervals(package: ModelPackage, preds: np.ndarray,
               coverage: float) -> tuple[np.ndarray, np.ndarray]:
    """CV+ bounds per subject from the package's fold networks (NaN without residuals)."""
    conformal = package.metadata.get("conformal")
    if not conformal:
        return np.full(preds.shape[1], np.nan), np.full(preds.shape[1], np.nan)
    folds = conformal["folds"]
    return cv_plus_interval([preds[f["models"]].mean(axis=0) for f in folds],
                            [np.asarray(f["abs_residuals"]) for f in folds], coverage)


def _ood_check(package: ModelPackage, volumes: VolumeSet, features: list[np.ndarray],
               log: Callable[[str], None]) -> tuple[np.ndarray, list, list[str | None]]:
    """``(ood_score, ood, ood_reason)`` per subject (NaN, NA and None without a check), from
    the network inputs and each network's penultimate ``features``."""
    n = len(volumes)
    arrays = package.ood_arrays()
    if arrays is None:
        return np.full(n, np.nan), [pd.NA] * n, [None] * n
    mean = arrays["mean_image"].astype(np.float64)
    region = arrays["region"].astype(bool)
    stats = np.full((n, len(STATISTICS)), np.nan)
    for i in range(n):
        stats[i, :3] = image_statistics(volumes[i], region, mean)
    z = [(FeatureModel(arrays[f"feature_mean-{k}"].astype(np.float64),
                       arrays[f"feature_precision-{k}"].astype(np.float64))
          .log_distance(f) - arrays[f"feature_scale-{k}"][0]) / arrays[f"feature_scale-{k}"][1]
         for k, f in enumerate(features) if f"feature_mean-{k}" in arrays]
    if z:
        stats[:, 3] = np.mean(z, axis=0)
    check = OODCalibration(arrays["calibration"], float(package.metadata["ood"]["percentile"]))
    score, flagged, reasons = check.assess(stats)
    counts = [f"{d} {sum(d in r.split(', ') for r in reasons)}" for d in DETECTORS]
    log(f"out-of-distribution check, model {package.factor}: {int(flagged.sum())} of {n} "
        f"scan(s) flagged ({', '.join(counts)})")
    return score, [bool(f) for f in flagged], reasons


def _full_prediction(package: ModelPackage, cohort: Cohort, preds: np.ndarray,
                     log: Callable[[str], None]) -> tuple[str, np.ndarray]:
    """``(adjusted_for, full prediction per subject)`` of one package's networks.

    For a residualised package the full prediction is the mean over networks of the residual
    prediction plus that network's covariate part; NaN (with a log line naming the column)
    when the cohort's table lacks a covariate.
    """
    from dfrn.data.covariates import CovariateEncoder, describe_covariates
    from dfrn.targets.providers import ConfoundFit

    adjustment = (package.metadata.get("target") or {}).get("adjustment")
    if not adjustment:
        return "", preds.mean(axis=0)
    encoder = CovariateEncoder.from_dict(adjustment["covariates"])
    words = describe_covariates(encoder.columns_)
    absent = [c for c in encoder.columns_ if c not in cohort.table.columns]
    if absent:
        log(f"model {package.factor} predicts the factor residualised on {words}: the cohort "
            f"table has no {absent[0]!r} column, so only the residual prediction is written "
            "(prediction_full is empty)")
        return words, np.full(preds.shape[1], np.nan)
    design = encoder.transform(cohort.table, f"the cohort table {cohort.source}")
    parts = [ConfoundFit.from_dict(m["confound_fit"]).fitted(design)
             for m in package.metadata["models"]]
    return words, (preds + np.stack(parts)).mean(axis=0)


def _region_sensitivity(package: ModelPackage, volumes, cohort: Cohort,
                        chunk: int = 4) -> pd.DataFrame:
    """|Δ ensemble prediction| per subject and region (target units), ``chunk`` scans at a time."""
    import torch

    from dfrn.interpret.ablation import RegionGrid, ablation_changes

    labels, table, baselines = package.regions()
    grid = RegionGrid(labels, table)
    n = len(cohort)
    total = np.zeros((len(table), n))
    for est, base in zip(package.estimators, baselines, strict=True):
        for start in range(0, n, chunk):
            x = np.stack([np.asarray(volumes[i], np.float32)
                          for i in range(start, min(n, start + chunk))])[:, None]
            change = ablation_changes(est.model_, torch.from_numpy(x).to(est.device_), grid, base)
            total[:, start:start + len(x)] += change * float(est.y_std_)
    mean = np.abs(total / len(package.estimators))
    return pd.DataFrame({
        "participant_id": np.tile(cohort.participant_ids, len(table)),
        "factor": package.factor,
        "region": np.repeat(table["name"].astype(str).to_numpy(), n),
        "abs_change": mean.ravel(),
    })


def _write_attention(package: ModelPackage, volumes, cohort: Cohort, out: Path, log) -> None:
    import torch

    from dfrn.interpret.attribution import attribution
    from dfrn.interpret.maps import to_template_space

    inp = package.metadata["input"]
    ref = nib.Nifti1Image(np.zeros(tuple(inp["shape"]), np.uint8), np.asarray(inp["affine"]))
    for i, pid in enumerate(cohort.participant_ids):
        x = torch.from_numpy(np.asarray(volumes[i], dtype=np.float32)[None, None])
        maps = [attribution(est.model_, x.to(est.device_), "guided_backprop")[0, 0]
                .detach().cpu().numpy() for est in package.estimators]
        img = to_template_space(np.mean(maps, axis=0), ref, int(inp["downsample"]))
        atomic_write_nifti(img, out / "attention" / f"{pid}_{package.factor}_fam.nii.gz")
    log(f"attention maps for {package.factor}: {out / 'attention'}")
