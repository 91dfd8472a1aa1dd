"""Region ablation in a study: one task per trained network of a factor, then the ranking.

Each task loads its fold's model (one seed's; a joint network's output for the factor), takes that fold's *test* subjects, replaces one atlas
region at a time by the neutral value (the fold's training subjects' mean input, or 0) and
records how each prediction changes (:func:`dfrn.interpret.ablation.ablation_changes`). A
task writes ``attention/ablation/<task>/`` (``changes.tsv``, ``task.json``, ``manifest.json``)
under a temporary name and renames it into place when complete, so an interrupted stage
resumes; a folder whose files or settings (atlas, baseline) differ is redone. With several
seeds, a subject's prediction changes are averaged over the seeds, as its predictions are. Tasks run
through the study's executor (in this process, or as Ray tasks).

The pooled result (:func:`dfrn.interpret.ablation.region_importance`) is written to
``attention/region_ablation.tsv`` and, per factor, ``attention/<factor>_ablation_dseg.nii.gz``:
the atlas on the images' grid, each region filled with its ``delta_r``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dfrn.config import StudyConfig
from dfrn.data.atlas import Atlas, labels_on_grid
from dfrn.data.images import VolumeSet
from dfrn.evaluation.tasks import FactorNetwork, factor_networks, network_factors
from dfrn.executors import Executor, LocalExecutor
from dfrn.interpret.ablation import (
    RegionGrid,
    ablation_changes,
    region_importance,
    regions_on_grid,
    train_mean_baseline,
    truth_ranks,
)
from dfrn.io import (
    atomic_write_json,
    atomic_write_nifti,
    atomic_write_tsv,
    make_temp_dir,
    place_folder,
    verify_manifest,
    write_manifest,
)
from dfrn.plotting import format_table
from dfrn.workflows.results import ResultsFolder

__all__ = ["AblationJob", "run_ablation_task", "run_region_ablation", "region_grid_for"]

_FILES = ("changes.tsv", "task.json")


@dataclass(frozen=True)
class AblationJob:
    """What every ablation task of a study shares (picklable: paths and small arrays)."""

    volumes: VolumeSet
    grid: RegionGrid
    baseline: str
    cv_tasks: Path
    ablation_tasks: Path
    device: str
    key: str
    """Digest of the region grid and the baseline: a task folder made with others is redone."""


def region_grid_for(atlas: Atlas, volumes: VolumeSet, atlas_option: str) -> RegionGrid:
    """The atlas on the network's input grid (one-line errors naming ``atlas_option``)."""
    grid = volumes.input_grid
    labels = labels_on_grid(atlas, grid.shape, grid.affine, atlas_option)
    return regions_on_grid(labels, atlas.labels, volumes.downsample, volumes.shape,
                           atlas_name=f"atlas {atlas.source} ({atlas_option})")


def _job_key(grid: RegionGrid, baseline: str) -> str:
    h = hashlib.sha256(grid.labels.astype(np.int64).tobytes())
    h.update(json.dumps([grid.table["name"].tolist(), baseline]).encode())
    return h.hexdigest()[:16]


def _verified(folder: Path, net: FactorNetwork, key: str) -> bool:
    if not folder.is_dir() or verify_manifest(folder, required=_FILES):
        return False
    meta = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    return meta.get("key") == key and meta.get("task") == net.name


def run_ablation_task(job: AblationJob, net: FactorNetwork) -> str:
    """Ablate every region for one network's test subjects; write its folder (idempotent)."""
    final = job.ablation_tasks / net.name
    if _verified(final, net, job.key):
        return net.name
    import torch

    task = net.task
    meta = net.meta(job.cv_tasks)
    est = net.load(job.cv_tasks, device=job.device)
    ids = [str(p) for p in meta["test_ids"]]
    x = np.stack([np.asarray(job.volumes[i], np.float32) for i in job.volumes.index_of(ids)])
    baseline: float | np.ndarray = 0.0
    if job.baseline == "train_mean":
        baseline = train_mean_baseline(job.volumes.__getitem__,
                                       job.volumes.index_of(list(task.train_ids)))
    changes = ablation_changes(est.model_, torch.from_numpy(x[:, None]).to(est.device_),
                               job.grid, baseline) * float(est.y_std_)
    table = pd.DataFrame(changes.T, columns=[str(i) for i in job.grid.table["index"]])
    table.insert(0, "participant_id", ids)
    tmp = make_temp_dir(job.ablation_tasks, net.name)
    try:
        atomic_write_tsv(table, tmp / "changes.tsv", float_format=None)
        atomic_write_json(tmp / "task.json", {"task": net.name, "key": job.key,
                                              "baseline": job.baseline})
        write_manifest(tmp)
        place_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return net.name


def _records(folder: ResultsFolder, networks: list[FactorNetwork],
             grid: RegionGrid) -> pd.DataFrame:
    """Intact and ablated predictions per (repeat, factor, subject), from the task folders;
    a subject's changes are averaged over the seeds of its fold."""
    pred = folder.read_predictions().set_index(
        ["repeat", "fold", "factor", "participant_id"]).sort_index()
    regions = [str(i) for i in grid.table["index"]]
    changes = []
    for net in networks:
        ch = pd.read_csv(folder.ablation_tasks / net.name / "changes.tsv", sep="\t",
                         dtype={"participant_id": str})
        ch.insert(1, "repeat", net.task.repeat)
        ch.insert(2, "fold", net.task.fold)
        ch.insert(3, "factor", net.factor)
        changes.append(ch)
    keys = ["participant_id", "repeat", "fold", "factor"]
    mean = pd.concat(changes, ignore_index=True).groupby(keys, sort=False)[regions].mean()
    p = pred.loc[[(r, f, fa, pid) for pid, r, f, fa in mean.index]]
    ablated = p["y_pred"].to_numpy()[:, None] - mean.to_numpy(float)
    df = pd.DataFrame(ablated, columns=[int(i) for i in regions])
    df.insert(0, "participant_id", mean.index.get_level_values("participant_id").to_numpy())
    df.insert(1, "repeat", mean.index.get_level_values("repeat").to_numpy())
    df.insert(2, "factor", mean.index.get_level_values("factor").to_numpy())
    df.insert(3, "y_true", p["y_true"].to_numpy())
    df.insert(4, "y_pred", p["y_pred"].to_numpy())
    return df


def run_region_ablation(
    out: str | Path,
    cfg: StudyConfig,
    volumes: VolumeSet,
    factors: list[str],
    plan: pd.DataFrame,
    atlas: Atlas,
    atlas_option: str,
    device: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Run (or resume) every ablation task, then write the ranking and the maps."""
    from tqdm.auto import tqdm

    folder = ResultsFolder(Path(out))
    a = cfg.attention
    grid = region_grid_for(atlas, volumes, atlas_option)
    if grid.skipped:
        log(f"region ablation: {len(grid.skipped)} region(s) have fewer than 2 voxels on the "
            f"network's input grid and are skipped: {', '.join(grid.skipped[:10])}")
    trained = network_factors(folder.tasks, plan, list(dict.fromkeys(
        folder.read_predictions()["factor"])), cfg.model.heads)  # in the networks' order
    tasks = [net for f in factors for net in factor_networks(
        plan, f, trained, cfg.model.heads, cfg.training.n_seeds)]
    job = AblationJob(volumes, grid, a.ablation_baseline, folder.tasks, folder.ablation_tasks,
                      device, _job_key(grid, a.ablation_baseline))
    folder.ablation_tasks.mkdir(parents=True, exist_ok=True)
    todo = [t for t in tasks if not _verified(folder.ablation_tasks / t.name, t, job.key)]
    if len(todo) < len(tasks):
        log(f"region ablation: resuming, {len(tasks) - len(todo)} of {len(tasks)} tasks done")
    runner = executor or LocalExecutor()
    with tqdm(total=len(todo), desc="region ablation", unit="task", disable=not progress) as bar:
        for _ in runner.map(run_ablation_task, job, todo):
            bar.update()
    table = region_importance(_records(folder, tasks, grid), grid.table, a.bootstrap,
                              cfg.cv.seed)
    atomic_write_tsv(table, folder.region_ablation)
    labels = _write_maps(folder, table, atlas, volumes, atlas_option)
    top = table[table["rank"] <= a.top_regions]
    log(format_table(
        top[["factor", "rank", "region", "delta_r", "ci_low", "ci_high", "mean_abs_change"]]
        .round(3),
        f"Where is the signal: region ablation, out of fold (fall in r when the region is "
        f"replaced by the {'training mean' if a.ablation_baseline == 'train_mean' else 'zero'}"
        f"; 95% bootstrap CI over subjects, {a.bootstrap} resamples)",
    ))
    if a.truth:
        _log_truth(folder, table, labels, a.truth, log)
    return table


def _log_truth(folder: ResultsFolder, table: pd.DataFrame, labels: np.ndarray,
               truth: dict[str, str], log: Callable[[str], None]) -> None:
    """With ground-truth masks (the demo): the rank of each known region, in the log and in
    ``attention/ablation_truth.tsv``."""
    from dfrn.data.images import load_img

    masks = {f: np.asarray(load_img(p, f"truth mask of {f}").dataobj) > 0
             for f, p in truth.items() if f in set(table["factor"])}
    ranks = truth_ranks(table, labels, masks)
    atomic_write_tsv(ranks, folder.attention_table("ablation_truth"))
    first = int((ranks["rank"] == 1).sum())
    log(f"region ablation ranks the ground-truth region first for {first} of {len(ranks)} "
        "factors: " + "; ".join(f"{r.factor} {r.region} {r.rank}/{r.n_regions}"
                                for r in ranks.itertuples()))


def _write_maps(folder: ResultsFolder, table: pd.DataFrame, atlas: Atlas, volumes: VolumeSet,
                atlas_option: str) -> np.ndarray:
    """Each factor's ``delta_r`` map on the images' grid; returns the atlas on that grid."""
    grid = volumes.input_grid
    labels = labels_on_grid(atlas, grid.shape, grid.affine, atlas_option)
    for factor, g in table.groupby("factor", sort=False):
        lookup = np.zeros(int(labels.max()) + 1, dtype=np.float32)
        idx = g["index"].to_numpy(dtype=np.int64)
        lookup[idx[idx < len(lookup)]] = g["delta_r"].to_numpy(np.float32)[idx < len(lookup)]
        img = nib.Nifti1Image(lookup[labels], np.asarray(grid.affine, dtype=float))
        atomic_write_nifti(img, folder.ablation_map(str(factor)))
    return labels
