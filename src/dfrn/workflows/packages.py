"""Write a finished study's model packages, ``models/<factor>/`` (see :mod:`dfrn.models.package`)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dfrn.config import StudyConfig
from dfrn.data.covariates import CovariateSelection
from dfrn.data.images import VolumeSet, few_distinct_values, load_volume
from dfrn.evaluation.metrics import mean_r
from dfrn.evaluation.tasks import FactorNetwork, factor_networks
from dfrn.io import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    file_digest,
    make_temp_dir,
    place_folder,
    write_manifest,
)
from dfrn.models.package import (
    INTENDED_USE,
    OOD_FILE,
    SCHEMA_VERSION,
    dfrn_version,
    hash_participant_id,
    load_package,
    package_readme,
    scan_content_digest,
    validate_metadata,
)
from dfrn.models.regressor import DFRNRegressor
from dfrn.targets.providers import fit_confounds
from dfrn.workflows.results import InputFile, ResultsFolder

__all__ = ["write_model_packages", "template_name"]

FSL_MNI_SHAPE = (182, 218, 182)


def template_name(shape: tuple[int, ...], affine: np.ndarray) -> str:
    """A name for the input grid: the FSL MNI152 1 mm grid when it is that, else "custom"."""
    if tuple(shape) == FSL_MNI_SHAPE and np.allclose(np.abs(np.diag(affine)[:3]), 1.0):
        return "MNI152NLin6Asym res-1 (FSL grid, 182x218x182)"
    return "custom grid (see shape and affine)"


def _save_weights(est: DFRNRegressor, path: Path) -> str:
    """Write the network's weights as safetensors (mode 0666 less the umask); their SHA-256."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in est.model_.state_dict().items()}
    data = save(state)  # bytes: safetensors' save_file would create the file with mode 0600
    atomic_write(path, lambda p: p.write_bytes(data), size_hint=len(data))
    return file_digest(path)


def _training_scans(inputs: dict[str, InputFile], participants: pd.Index,
                    known: dict[str, tuple[str, list[float] | None]], mask: np.ndarray | None,
                    intensity: str, log: Callable[[str], None],
                    ) -> tuple[list[str], list[float] | None]:
    """The sorted content digests of the participants' scans, and their values.

    Each scan is decoded at most once (``known`` keeps what was read, across factors), as
    ``dfrn predict`` decodes it: NaN or inf voxels outside ``mask`` are set to 0, so both
    compute the same digest. The values are the sorted distinct values of all the scans
    inside ``mask`` (the whole image without one) when the study reads them as they are
    (``intensity = "none"``) and there are at most two (binary maps, e.g. ``[0.0, 1.0]``):
    ``input.values`` of the metadata, which predict checks new scans against. None otherwise.
    """
    todo = [p for p in participants if p not in known]
    if todo:
        log(f"hashing the content of {len(todo)} training scan(s) for the leakage check")
    for pid in todo:
        data, affine = load_volume(inputs[f"t1/{pid}"].path, f"participant {pid}", mask)
        few = None
        if intensity == "none":
            few = few_distinct_values(data[mask] if mask is not None else data)
        known[pid] = (scan_content_digest(data, affine), few)
    digests = sorted({known[p][0] for p in participants})
    found = [known[p][1] for p in participants]
    if intensity != "none" or any(f is None for f in found):
        return digests, None
    values = sorted({v for f in found for v in f or []})
    return digests, values if 0 < len(values) <= 2 else None


def _refit(cfg: StudyConfig, volumes: VolumeSet, y: pd.Series, epochs: int, seed: int,
           progress: bool) -> DFRNRegressor:
    from dfrn.workflows.study import make_estimator_factory, network_voxel_mm

    est = make_estimator_factory(cfg, progress, network_voxel_mm(volumes))(seed, f"refit {y.name}")
    est.set_params(epochs=max(1, epochs), val_fraction=0.0, schedule_epochs=cfg.training.epochs)
    idx = volumes.index_of(list(y.index))
    return est.fit([volumes[i] for i in idx], y.to_numpy(float))


def _write_weights(tmp: Path, folder: ResultsFolder, cfg: StudyConfig, volumes: VolumeSet,
                   y: pd.Series, networks: list[FactorNetwork], progress: bool,
                   design: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """Write a factor's networks into ``tmp``; their ``models`` entries of the metadata.

    With ``design`` (residualised targets), each entry carries the covariate fit its network's
    target was the residual of: the fold's (ensemble), or one fitted on all subjects (refit).
    """
    models: list[dict[str, Any]] = []
    if cfg.final.mode == "ensemble":
        for k, net in enumerate(networks):
            meta = net.meta(folder.tasks)
            est = net.load(folder.tasks)  # a joint network's output for this factor
            name = f"model-{k}.safetensors"
            models.append({"file": name, "sha256": _save_weights(est, tmp / name),
                           "y_mean": est.y_mean_, "y_std": est.y_std_,
                           "repeat": net.task.repeat, "fold": net.task.fold,
                           "seed_index": net.task.seed_index,
                           "best_epoch": int(meta["best_epoch"]),
                           "confound_fit": meta.get("confound_fit")})
        return models
    epochs = int(np.median([net.meta(folder.tasks)["best_epoch"] + 1 for net in networks]))
    y, fit = y.dropna(), None
    if design is not None:
        fit = fit_confounds(y, design)
        y = y - fit.fitted(design.loc[list(y.index)])
    for s in range(cfg.training.n_seeds):  # one network per seed, as in the CV
        est = _refit(cfg, volumes, y, epochs, cfg.training.seed + s, progress)
        name = f"model-{s}.safetensors"
        models.append({"file": name, "sha256": _save_weights(est, tmp / name),
                       "y_mean": est.y_mean_, "y_std": est.y_std_, "epochs": epochs,
                       "seed_index": s, "confound_fit": None if fit is None else fit.to_dict()})
    return models


def _region_entry(tmp: Path, grid: Any, baseline: str, volumes: VolumeSet,
                  train_ids: list[list[str]]) -> dict[str, Any]:
    """Write ``regions.safetensors`` (the atlas on the input grid and, with the train-mean
    baseline, each network's neutral input) for ``dfrn predict --regions``."""
    from safetensors.numpy import save

    from dfrn.interpret.ablation import train_mean_baseline

    arrays = {"labels": np.ascontiguousarray(grid.labels, dtype=np.int32)}  # safetensors
    # writes an array's buffer as it lies: a Fortran-ordered one would come back transposed
    if baseline == "train_mean":
        for k, ids in enumerate(train_ids):
            arrays[f"baseline-{k}"] = train_mean_baseline(
                volumes.__getitem__, volumes.index_of(ids)).astype(np.float16)
    data = save(arrays)
    atomic_write(tmp / "regions.safetensors", lambda p: p.write_bytes(data),
                 size_hint=len(data))
    return {"file": "regions.safetensors", "sha256": file_digest(tmp / "regions.safetensors"),
            "indices": [int(i) for i in grid.table["index"]],
            "names": grid.table["name"].astype(str).tolist(), "baseline": baseline}


def _input_entry(cfg: StudyConfig, volumes: VolumeSet, mask: dict[str, str] | None,
                 values: list[float] | None) -> dict[str, Any]:
    """The metadata's ``input``: grid, downsampling, intensity mode, mask and, for binary
    maps read as they are, the training values (see :func:`_training_scans`)."""
    grid = volumes.input_grid
    entry = {
        "template": template_name(grid.shape, grid.affine),
        "shape": list(grid.shape),
        "affine": np.asarray(grid.affine, dtype=float).round(6).tolist(),
        "downsample": int(volumes.downsample),
        "intensity": cfg.cohort.intensity,
        "mask": mask,
    }
    return entry if values is None else {**entry, "values": values}


def _package_grid(cfg: StudyConfig, volumes: VolumeSet, log: Callable[[str], None]) -> Any:
    """The attention atlas on the input grid, when region ablation is configured."""
    a = cfg.attention
    if not (a.enabled and a.ablation):
        return None
    from dfrn.workflows.ablation import region_grid_for
    from dfrn.workflows.attention import load_atlas_for

    atlas = load_atlas_for(a.atlas, a.atlas_labels, log)
    return None if atlas is None else region_grid_for(atlas, volumes, "[attention] atlas")


@dataclass(frozen=True)
class _PackageJob:
    """What every factor's package is built from (see :func:`write_model_packages`)."""

    folder: ResultsFolder
    cfg: StudyConfig
    volumes: VolumeSet
    targets: pd.DataFrame
    first: pd.DataFrame  # the first repeat's rows of the fold plan
    inputs: dict[str, InputFile]
    progress: bool
    log: Callable[[str], None]
    design: pd.DataFrame | None  # the covariates' design, with residualised targets
    adjustment: dict[str, Any] | None
    region_grid: Any
    perm: pd.DataFrame | None  # the networks' permutation tests, by factor
    summary: pd.DataFrame  # mean_r of the CV metrics
    mask_data: np.ndarray | None
    content: dict[str, tuple[str, list[float] | None]]  # see _training_scans' ``known``


def _package_job(out: Path, cfg: StudyConfig, volumes: VolumeSet, targets: pd.DataFrame,
                 plan: pd.DataFrame, metrics: pd.DataFrame, inputs: dict[str, InputFile],
                 progress: bool, log: Callable[[str], None],
                 covariates: CovariateSelection | None) -> _PackageJob:
    """Check the arguments and read what all factors' packages share."""
    residualized = cfg.confounds.target == "residualize"
    if residualized and covariates is None:
        raise ValueError("residualised targets need the study's covariates")
    design = covariates.design() if residualized and covariates is not None else None
    adjustment = None if design is None or covariates is None else {
        "method": "residualize", "covariates": covariates.encoder().to_dict()}
    folder = ResultsFolder(out)
    region_grid = _package_grid(cfg, volumes, log)
    perm = None
    if folder.network_permutation.is_file():
        perm = pd.read_csv(folder.network_permutation, sep="\t").set_index("factor")
    summary = mean_r(metrics)
    first = plan[plan["repeat"] == plan["repeat"].min()]
    mask = cfg.cohort.mask
    mask_data = None if not mask else load_volume(mask, "brain mask")[0] > 0
    return _PackageJob(folder, cfg, volumes, targets, first, inputs, progress, log, design,
                       adjustment, region_grid, perm, summary, mask_data, {})


def _is_complete(final: Path, factor: str, log: Callable[[str], None]) -> bool:
    """Whether ``final`` holds a package to keep; says why an existing one is rebuilt."""
    if not final.is_dir():
        return False
    try:
        version = load_package(final).metadata["schema_version"]
    except Exception as exc:  # an incomplete, damaged or old package is rebuilt
        log(f"rebuilding model package {factor}: {exc}")
        return False
    if version < SCHEMA_VERSION:  # e.g. schema 2: no intervals, no OOD statistics
        log(f"rebuilding model package {factor}: schema {version}, this dfrn writes "
            f"{SCHEMA_VERSION} (intervals and the out-of-distribution check)")
        return False
    return True


def _copy_mask(tmp: Path, mask: str | None) -> dict[str, str] | None:
    """Copy the brain mask into ``tmp``; the metadata's ``input.mask`` (None without one)."""
    if not mask:
        return None
    atomic_write(tmp / "brain_mask.nii.gz", lambda p: shutil.copyfile(mask, p))
    return {"file": "brain_mask.nii.gz", "sha256": file_digest(Path(mask))}


def _performance(job: _PackageJob, factor: str) -> dict[str, Any]:
    """The metadata's ``performance``: the CV's r over repeats and the permutation p."""
    summary, perm = job.summary, job.perm
    return {
        "mean_r": float(summary.at[factor, "mean_r"]),
        "sd_r": _finite_or_none(summary.at[factor, "sd_r"]),
        "n_repeats": int(summary.at[factor, "n_repeats"]),
        "permutation_p": None if perm is None or factor not in perm.index
        else float(perm.at[factor, "p_permutation"]),
    }


def _build_package(job: _PackageJob, factor: str, tmp: Path) -> None:
    """Write ``factor``'s package into ``tmp``: weights, regions, mask, metadata and README."""
    cfg, volumes = job.cfg, job.volumes
    networks = factor_networks(job.first, factor, list(job.targets.columns), cfg.model.heads,
                               cfg.training.n_seeds)
    models = _write_weights(tmp, job.folder, cfg, volumes, job.targets[factor], networks,
                            job.progress, job.design)
    regions = None if job.region_grid is None else _region_entry(
        tmp, job.region_grid, cfg.attention.ablation_baseline, volumes,
        [list(n.task.train_ids) for n in networks] if cfg.final.mode == "ensemble"
        else [list(volumes.participant_ids)])
    mask_entry = _copy_mask(tmp, cfg.cohort.mask)
    trained_on = job.targets[factor].dropna().index
    ensemble = cfg.final.mode == "ensemble"
    conformal = _conformal_entry(job, factor, networks) if ensemble else None
    ood = _ood_entry(job, list(trained_on), networks if ensemble else None, tmp)
    digests, values = _training_scans(job.inputs, trained_on, job.content, job.mask_data,
                                      cfg.cohort.intensity, job.log)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "dfrn_version": dfrn_version(),
        "versions": _versions(),
        "factor": factor,
        "mode": cfg.final.mode,
        "network": {"name": "DFRN", "block_strides": list(cfg.model.block_strides),
                    "widen_factor": float(cfg.model.widen_factor), "in_channels": 1},
        "input": _input_entry(cfg, volumes, mask_entry, values),
        "target": {"name": factor, "units": "factor score (the training cohort's scale)",
                   "adjustment": job.adjustment},
        "models": models,
        "regions": regions,
        "conformal": conformal,
        "ood": ood,
        "preprocessing": {"kind": "user-registered"},
        "init": _init_entry(cfg),
        "training_scans_sha256": sorted({job.inputs[f"t1/{p}"].digest for p in trained_on}),
        "training_scans_content_sha256": digests,
        "performance": _performance(job, factor),
        "intended_use": INTENDED_USE,
    }
    validate_metadata(meta)
    atomic_write_json(tmp / "metadata.json", meta)
    atomic_write_text(tmp / "README.md", package_readme(meta))
    write_manifest(tmp)


def _init_entry(cfg: StudyConfig) -> dict[str, str] | None:
    """Provenance: the pretrained weights ``[model] init`` started the networks from."""
    from dfrn.models.pretrained import cached_init
    from dfrn.workflows.pretrained import init_provenance

    m = cfg.model
    return init_provenance(cached_init(m.init, m.init_member)) if m.init else None


def _task_predictions(job: _PackageJob, net: FactorNetwork, factor: str) -> pd.DataFrame:
    """A network's out-of-fold ``y_true`` and ``y_pred`` for ``factor``, by participant."""
    df = pd.read_csv(job.folder.tasks / net.task.name / "predictions.tsv", sep="\t",
                     dtype={"participant_id": str})
    return df[df["factor"] == factor].set_index("participant_id")[["y_true", "y_pred"]]


def _conformal_entry(job: _PackageJob, factor: str,
                     networks: list[FactorNetwork]) -> dict[str, Any]:
    """The metadata's ``conformal``: per fold of the packaged repeat, its networks (by
    index in ``models``) and the absolute out-of-fold residuals of its held-out subjects
    (the mean over seeds' predictions; in the networks' target units), IDs hashed."""
    folds: dict[int, list[int]] = {}
    for k, net in enumerate(networks):
        folds.setdefault(int(net.task.fold), []).append(k)
    entries = []
    for fold, ks in folds.items():
        tables = [_task_predictions(job, networks[k], factor) for k in ks]
        y_pred = sum(t["y_pred"] for t in tables) / len(tables)
        residual = (tables[0]["y_true"] - y_pred).abs()
        entries.append({"fold": fold, "models": ks,
                        "ids_sha256": [hash_participant_id(p) for p in residual.index],
                        "abs_residuals": [float(r) for r in residual.to_numpy()]})
    return {"method": "cv+", "repeat": int(networks[0].task.repeat), "folds": entries}


def _ood_entry(job: _PackageJob, trained_on: list[str], networks: list[FactorNetwork] | None,
               tmp: Path) -> dict[str, Any]:
    """Write ``ood.safetensors`` (see :mod:`dfrn.models.ood`): the training subjects' mean
    input, the input region, each fold network's feature model, and the calibration
    statistics (leave-one-out image statistics; out-of-fold feature distances, NaN for a
    refit package); return the metadata's ``ood``."""
    from safetensors.numpy import save

    from dfrn.interpret.ablation import train_mean_baseline
    from dfrn.models.ood import STATISTICS, image_statistics, input_region

    volumes = job.volumes
    idx = volumes.index_of(trained_on)
    mean16 = train_mean_baseline(volumes.__getitem__, idx).astype(np.float16)
    mean = mean16.astype(np.float64)  # the mean predict reads back
    region = input_region(job.mask_data, mean, volumes.downsample)
    n = len(idx)
    stats = np.full((n, len(STATISTICS)), np.nan)
    for row, i in enumerate(idx):  # each subject against the mean of the others
        x = np.asarray(volumes[i], dtype=np.float64)
        stats[row, :3] = image_statistics(x, region, (n * mean - x) / max(n - 1, 1))
    arrays = {"mean_image": mean16, "region": region.astype(np.uint8)}
    if networks is not None:
        z = _feature_calibration(job, trained_on, networks, arrays)
        stats[:, 3] = [z.get(p, np.nan) for p in trained_on]
    arrays["calibration"] = stats
    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})  # not F-ordered
    atomic_write(tmp / OOD_FILE, lambda p: p.write_bytes(data), size_hint=len(data))
    return {"file": OOD_FILE, "sha256": file_digest(tmp / OOD_FILE), "n_calibration": n,
            "statistics": list(STATISTICS), "percentile": 99.0}


def _feature_calibration(job: _PackageJob, trained_on: list[str],
                         networks: list[FactorNetwork],
                         arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Fit each network's feature model on its training subjects (into ``arrays``); the
    held-out subjects' standardised log-distances (mean over a fold's seeds), by ID."""
    from dfrn.models.ood import FeatureModel, penultimate_features, robust_scale

    volumes, known = job.volumes, set(trained_on)
    z: dict[str, list[float]] = {}
    for k, net in enumerate(networks):
        est = net.load(job.folder.tasks, device=job.cfg.training.device)
        train = [p for p in net.task.train_ids if p in known]
        test = [p for p in net.task.test_ids if p in known]
        model = FeatureModel.fit(penultimate_features(
            est, [volumes[i] for i in volumes.index_of(train)]))
        dist = model.log_distance(penultimate_features(
            est, [volumes[i] for i in volumes.index_of(test)]))
        centre, scale = robust_scale(dist)
        arrays[f"feature_mean-{k}"] = model.mean.astype(np.float32)
        arrays[f"feature_precision-{k}"] = model.precision.astype(np.float32)
        arrays[f"feature_scale-{k}"] = np.array([centre, scale])
        for p, v in zip(test, (dist - centre) / scale, strict=True):
            z.setdefault(p, []).append(float(v))
    return {p: float(np.mean(v)) for p, v in z.items()}


def write_model_packages(
    out: Path,
    cfg: StudyConfig,
    volumes: VolumeSet,
    targets: pd.DataFrame,
    plan: pd.DataFrame,
    metrics: pd.DataFrame,
    inputs: dict[str, InputFile],
    progress: bool = False,
    log: Callable[[str], None] = print,
    covariates: CovariateSelection | None = None,
) -> dict[str, Path]:
    """Write (or keep, when already complete) one package per factor; return their folders.

    ``ensemble`` packages the first repeat's fold models; ``refit`` trains one network on all
    subjects with a value, for the median of the folds' chosen epoch counts. With
    ``[confounds] target = "residualize"`` the packages record the covariates' coding and
    each network's covariate fit (``covariates`` is then required).
    """
    job = _package_job(out, cfg, volumes, targets, plan, metrics, inputs, progress, log,
                       covariates)
    written: dict[str, Path] = {}
    for factor in targets.columns:
        final = job.folder.model_package(factor)
        if not _is_complete(final, factor, log):
            tmp = make_temp_dir(final.parent, factor)
            try:
                _build_package(job, factor, tmp)
                place_folder(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        written[factor] = final
    log(f"model packages ({cfg.final.mode}): {', '.join(str(p) for p in written.values())}")
    return written


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("dfrn", "torch", "numpy", "nibabel"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _finite_or_none(value: float) -> float | None:
    """A JSON-safe number: None where it is undefined (an sd over one repeat)."""
    value = float(value)
    return value if np.isfinite(value) else None
