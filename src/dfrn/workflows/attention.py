"""The attention stage of a study: computes and writes factor attention maps and their tables.

For each factor it loads the (repeat, fold) checkpoints of ``cv/tasks`` one at a time,
computes each test subject's map with the model of the fold in which that subject was a
*test* subject (``[attention] mode = "oof"``; ``"all"`` uses every model), and averages over
subjects, folds and repeats (Eq. 4). Outputs, in the results folder:

* ``attention/<factor>_fam.nii.gz`` (signed, Eq. 4) and ``<factor>_fam_abs.nii.gz`` (mean of
  |map|), upsampled to the input grid and carrying the input images' affine;
* ``attention/regions.tsv``: atlas regions ranked by mean |attention| per factor;
* ``attention/localisation.tsv`` when ground-truth masks are known (the demo);
* ``attention/sanity.tsv`` and ``figures/attention_sanity.png``: cascading model
  randomisation (Adebayo et al. 2018) for the configured method and the plain gradient;
* ``figures/fig4_fam.png``: the template with one |FAM| overlay per factor. The figure shows
  the absolute map: it answers *where* the networks read a factor from, and signed
  guided-backprop maps largely cancel across subjects.

Another method than the configured one (``dfrn attention --method``) writes into
``attention/method-<method>/`` and ``figures/*_<method>.png`` instead, so no map is
overwritten or mistaken for another method's. The region ablation does not depend on the map
method: it runs (``attention/region_ablation.tsv``) with any ``--method``. An atlas that is
neither on the images' grid nor another resolution of it (another space) is refused before
any map is computed. Every folder comes from
:class:`dfrn.workflows.results.ResultsFolder`; the file names inside them are spelled once,
in :class:`_AttentionFiles`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn

from dfrn.config import StudyConfig
from dfrn.data.atlas import Atlas, check_atlas_grid
from dfrn.data.images import VolumeSet, load_img
from dfrn.errors import DfrnInputError
from dfrn.evaluation.tasks import FactorNetwork, factor_networks, network_factors
from dfrn.executors import Executor
from dfrn.interpret.maps import (
    FoldTask,
    factor_attention_map,
    localisation_scores,
    to_template_space,
)
from dfrn.interpret.regions import rank_regions
from dfrn.interpret.sanity import cascading_randomization
from dfrn.io import atomic_write_nifti, atomic_write_tsv
from dfrn.models.regressor import resolve_device
from dfrn.plotting import format_table, plot_fam, plot_sanity
from dfrn.workflows.results import ResultsFolder

__all__ = ["run_attention_stage", "load_atlas_for"]


@dataclass(frozen=True)
class _AttentionFiles:
    """The attention stage's files in a results folder, for one attribution method.

    ``own`` is True for the configured method (``attention/``, ``figures/<name>.png``);
    another method gets ``attention/method-<m>/`` and ``figures/<name>_<m>.png``.
    """

    folder: ResultsFolder
    method: str
    own: bool

    @property
    def _method(self) -> str | None:
        return None if self.own else self.method

    @property
    def dir(self) -> Path:
        return self.folder.attention(self._method)

    def fam(self, factor: str, absolute: bool) -> Path:
        return self.folder.fam(factor, self._method, absolute)

    def table(self, name: str) -> Path:
        """``regions``, ``localisation`` or ``sanity``."""
        return self.folder.attention_table(name, self._method)

    def figure(self, name: str) -> Path:
        return self.folder.figure(name if self.own else f"{name}_{self.method}")

    def task_dir(self, task_name: str) -> Path:
        return self.folder.task_dir(task_name)



def load_atlas_for(atlas: str, labels: str, log: Callable[[str], None]) -> Atlas | None:
    """The configured atlas, or AAL3 from nilearn when online.

    Parameters
    ----------
    atlas : str
        Path of a label image, or ``""`` for AAL3 from nilearn.
    labels : str
        Path of its ``index``/``name`` TSV (required with ``atlas``).
    log : callable
        Receives a note when no atlas is available.

    Returns
    -------
    Atlas or None
        None (with a note) when no atlas was given and AAL3 cannot be downloaded.

    Raises
    ------
    DfrnInputError
        For an atlas without its label table, or an unreadable atlas.
    """
    from dfrn.data.atlas import fetch_aal3_atlas, load_atlas

    if atlas:
        if not labels:
            raise DfrnInputError("an atlas needs its label table too (atlas_labels / --atlas-labels)")
        return load_atlas(atlas, labels)
    try:
        return fetch_aal3_atlas()
    except DfrnInputError as exc:
        log(f"note: no atlas available ({exc}); region tables are skipped")
        return None


def _checked_atlas(atlas: str | None, atlas_labels: str | None, cfg: StudyConfig,
                   ablation: bool | None, volumes: VolumeSet, log: Callable[[str], None]
                   ) -> tuple[Atlas | None, str]:
    """The stage's atlas and the option that names it, checked before any map is computed:
    on the images' grid or another resolution of it (not another space), and present when
    ``--ablation`` asks for one."""
    option = "--atlas" if atlas else "[attention] atlas"
    found = load_atlas_for(atlas or cfg.attention.atlas,
                           atlas_labels or cfg.attention.atlas_labels, log)
    if found is None and ablation:
        raise DfrnInputError("--ablation needs an atlas: --atlas/--atlas-labels or [attention] atlas")
    if found is not None:
        check_atlas_grid(found, volumes.input_grid.shape, volumes.input_grid.affine, option)
    return found, option


def _factor_tasks(
    files: _AttentionFiles, networks: list[FactorNetwork], volumes: VolumeSet, device: str
) -> list[FoldTask]:
    """One attribution task per trained network of a factor (every fold and seed; a joint
    network's output for the factor). A subject's out-of-fold map is the mean over the
    networks that did not see it, so several seeds average as their predictions do."""
    tasks = []
    for net in networks:
        if not files.task_dir(net.task.name).is_dir():
            raise DfrnInputError(
                f"task {net.task.name} has not finished; rerun 'dfrn run' to complete the CV first"
            )
        meta = net.meta(files.task_dir(net.task.name).parent)  # checked against its manifest

        def loader(n: FactorNetwork = net) -> nn.Module:
            return n.load(files.task_dir(n.task.name).parent, device=device).model_

        tasks.append(FoldTask(loader, volumes.index_of(meta["test_ids"]), net.task.repeat,
                              net.task.fold))
    return tasks


def _voxel_table_title(method: str, sanity: pd.DataFrame | None, top: int) -> str:
    """The voxel-map region table's title: labelled image-driven when the map fails."""
    from dfrn.interpret.sanity import fails_sanity

    title = f"Top {top} regions by mean |attention| ({method}) per factor"
    if sanity is not None and fails_sanity(sanity, method):
        return (f"{title}: an image-driven map ({method} fails the sanity check), not a ranking "
                "of what the networks use; see the region ablation for that")
    return title


@dataclass(frozen=True)
class _AttentionRun:
    """What every part of one attention stage reads: the study's networks and inputs."""

    cfg: StudyConfig
    volumes: VolumeSet
    plan: pd.DataFrame
    files: _AttentionFiles
    trained: list[str]
    device: str
    progress: bool
    log: Callable[[str], None]

    @classmethod
    def open(cls, out: str | Path, cfg: StudyConfig, volumes: VolumeSet | None,
             plan: pd.DataFrame | None, method: str, progress: bool,
             log: Callable[[str], None]) -> _AttentionRun:
        """Check the device; read the volumes and plan (when not given) and the factors the
        networks were trained for (in their order)."""
        from dfrn.workflows.study import load_study_cohort, prepare_volumes

        folder = ResultsFolder(Path(out))
        resolve_device(cfg.training.device)
        if volumes is None:
            volumes = prepare_volumes(load_study_cohort(cfg, folder.root), cfg, folder.root,
                                      progress, log=log)
        if plan is None:
            plan = folder.read_folds(volumes.participant_ids)
        trained = network_factors(folder.tasks, plan, list(dict.fromkeys(
            folder.read_predictions()["factor"])), cfg.model.heads)
        # the configured method writes attention/; another one (--method) its own subfolder
        files = _AttentionFiles(folder, method, own=method == cfg.attention.method)
        return cls(cfg, volumes, plan, files, trained, str(resolve_device(cfg.training.device)),
                   progress, log)

    def tasks(self, factor: str) -> list[FoldTask]:
        """One attribution task per network of ``factor`` (every fold and seed)."""
        networks = factor_networks(self.plan, factor, self.trained, self.cfg.model.heads,
                                   self.cfg.training.n_seeds)
        return _factor_tasks(self.files, networks, self.volumes, self.device)


def _write_maps(run: _AttentionRun, factors: list[str]) -> dict[str, nib.spatialimages.SpatialImage]:
    """Each factor's signed and absolute map on the input grid (kept when already written);
    returns the absolute maps."""
    from tqdm.auto import tqdm

    method = run.files.method
    ref_img = nib.Nifti1Image(
        np.zeros(run.volumes.input_grid.shape, np.uint8), run.volumes.input_grid.affine
    )
    maps: dict[str, nib.spatialimages.SpatialImage] = {}
    for factor in tqdm(factors, desc=f"attention ({method})", disable=not run.progress):
        signed_path, abs_path = run.files.fam(factor, False), run.files.fam(factor, True)
        if not (signed_path.is_file() and abs_path.is_file()):
            fam = factor_attention_map(run.tasks(factor), run.volumes, method,
                                       mode=run.cfg.attention.mode, device=run.device)
            signed = to_template_space(fam.signed, ref_img, run.volumes.downsample)
            absolute = to_template_space(fam.absolute, ref_img, run.volumes.downsample)
            atomic_write_nifti(signed, signed_path)
            atomic_write_nifti(absolute, abs_path)
        maps[factor] = load_img(abs_path, f"attention map of {factor}")
    return maps


def _sanity_table(run: _AttentionRun, factor: str) -> pd.DataFrame:
    """Cascading randomisation of the first network of ``factor`` (4 of its test subjects),
    for the map's method and the plain gradient."""
    first = run.tasks(factor)[0]
    model = first.model if isinstance(first.model, nn.Module) else first.model()
    idx = list(first.test_indices)[:4]
    x = np.stack([np.asarray(run.volumes[i], dtype=np.float32) for i in idx])[:, None]
    methods = list(dict.fromkeys([run.files.method, "gradient"]))
    sanity = cascading_randomization(model, torch.from_numpy(x).to(run.device), methods, seed=0)
    sanity.insert(0, "factor", factor)
    atomic_write_tsv(sanity, run.files.table("sanity"))
    plot_sanity(sanity, run.files.figure("attention_sanity"))
    run.log(format_table(sanity.round(3), f"Sanity check: cascading randomisation ({factor})"))
    return sanity


def _region_table(run: _AttentionRun, maps: dict, atlas: Atlas, option: str,
                  sanity: pd.DataFrame | None) -> pd.DataFrame:
    """Atlas regions ranked by mean |attention| per factor (labelled image-driven when the
    map fails its sanity check)."""
    a = run.cfg.attention
    regions = pd.concat(
        [rank_regions(img, atlas.img, atlas.labels, f, atlas_name=atlas.source,
                      atlas_option=option) for f, img in maps.items()],
        ignore_index=True,
    )
    atomic_write_tsv(regions, run.files.table("regions"))
    top = regions[regions["rank"] <= a.top_regions][["factor", "rank", "region", "mean_attention"]]
    run.log(format_table(top, _voxel_table_title(run.files.method, sanity, a.top_regions)))
    return regions


def _localisation_table(run: _AttentionRun, maps: dict) -> pd.DataFrame:
    """|FAM| against the planted regions (``[attention] truth``), inside the brain mask."""
    brain = None
    if run.cfg.cohort.mask:
        brain = np.asarray(load_img(run.cfg.cohort.mask, "brain mask").dataobj) > 0
    rows = []
    for f, img in maps.items():
        if f not in run.cfg.attention.truth:
            continue
        truth = np.asarray(load_img(run.cfg.attention.truth[f], f"truth mask of {f}").dataobj) > 0
        scores = localisation_scores(np.asarray(img.dataobj, dtype=np.float32), truth, brain)
        rows.append({"factor": f, **scores})
    loc = pd.DataFrame(rows)
    atomic_write_tsv(loc, run.files.table("localisation"))
    run.log(format_table(loc.round(3), "Localisation of |FAM| against the planted regions"))
    return loc


def _plot_maps(run: _AttentionRun, maps: dict) -> None:
    """Figure 4: the template (``[attention] template``, else nilearn's MNI152) with each
    factor's |FAM|."""
    if run.cfg.attention.template:
        template_img = load_img(run.cfg.attention.template, "attention template")
    else:
        from nilearn.datasets import load_mni152_template

        template_img = load_mni152_template(resolution=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plot_fam(maps, template_img, run.files.figure("fig4_fam"))


def run_attention_stage(
    out: str | Path,
    cfg: StudyConfig | None = None,
    volumes: VolumeSet | None = None,
    factors: list[str] | None = None,
    plan: pd.DataFrame | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    method: str | None = None,
    atlas: str | None = None,
    atlas_labels: str | None = None,
    ablation: bool | None = None,
    executor: Executor | None = None,
) -> dict[str, pd.DataFrame]:
    """Compute and write every attention output for a finished CV run in ``out``.

    Without ``cfg`` (``dfrn attention RESULTS``) it takes the folder's lock and reopens the
    study (:func:`dfrn.workflows.study.open_study`: the input files must be the run's).
    ``volumes`` (the cached inputs), ``factors`` (default: those of ``cv/predictions.tsv``)
    and ``plan`` are read from the study when None. ``method``, ``atlas``/``atlas_labels``
    and ``ablation`` override ``[attention]``; the region ablation does not depend on
    ``method`` and runs with any. ``executor`` runs the region-ablation tasks (default: in
    this process). Returns the ``regions``, ``localisation``, ``sanity`` and ``ablation``
    tables that were made.
    """
    if cfg is None:
        from dfrn.workflows.study import open_study, results_lock

        with results_lock(Path(out), "dfrn attention", log):
            study = open_study(out, progress, log, executor)
            return run_attention_stage(
                out, study.cfg, study.volumes, factors, study.plan, progress, log, method, atlas,
                atlas_labels, ablation, executor,
            )
    a = cfg.attention
    run = _AttentionRun.open(out, cfg, volumes, plan, method or a.method, progress, log)
    factors = run.trained if factors is None else factors
    atlas_obj, option = _checked_atlas(atlas, atlas_labels, cfg, ablation, run.volumes, log)
    maps = _write_maps(run, factors)
    results: dict[str, pd.DataFrame] = {}
    if a.sanity:
        results["sanity"] = _sanity_table(run, factors[0])
    if atlas_obj is not None:
        results["regions"] = _region_table(run, maps, atlas_obj, option, results.get("sanity"))
    if a.truth:
        results["localisation"] = _localisation_table(run, maps)
    _plot_maps(run, maps)
    if atlas_obj is not None and (a.ablation if ablation is None else ablation):
        from dfrn.workflows.ablation import run_region_ablation

        results["ablation"] = run_region_ablation(
            out, cfg, run.volumes, factors, run.plan, atlas_obj, option, run.device, progress,
            log, executor,
        )
    return results
