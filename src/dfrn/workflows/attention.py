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

    Called without ``cfg`` (``dfrn attention RESULTS``), it takes the folder's lock and first
    checks that the input files are those the run was made with.

    Parameters
    ----------
    out : str or Path
        The results folder.
    cfg : StudyConfig, optional
        The study's config; None opens the finished study in ``out``.
    volumes : VolumeSet, optional
        The cached training volumes; prepared from the cohort when None.
    factors : list of str, optional
        Factors to map; by default those of ``cv/predictions.tsv``.
    plan : pd.DataFrame, optional
        The fold plan; read from ``cv/folds.tsv`` when None.
    progress : bool, default True
        Show progress bars.
    log : callable, default print
        Receives the printed tables and notes.
    method : str, optional
        Attribution method; the configured one by default.
    atlas, atlas_labels : str, optional
        Override the configured atlas and its label table.
    ablation : bool, optional
        Override ``[attention] ablation`` (region ablation importance; it does not depend on
        ``method`` and runs with any).
    executor : Executor, optional
        Runs the region-ablation tasks (default: in this process).

    Returns
    -------
    dict of str to pd.DataFrame
        ``regions``, ``localisation``, ``sanity`` and ``ablation`` tables, for those that
        were made.
    """
    if cfg is None:
        from dfrn.workflows.study import open_study, results_lock

        with results_lock(Path(out), "dfrn attention", log):
            study = open_study(out, progress, log, executor)
            return run_attention_stage(
                out, study.cfg, study.volumes, factors, study.plan, progress, log, method, atlas,
                atlas_labels, ablation, executor,
            )
    from tqdm.auto import tqdm

    from dfrn.workflows.study import load_study_cohort, prepare_volumes

    folder = ResultsFolder(Path(out))
    a = cfg.attention
    method = method or a.method
    resolve_device(cfg.training.device)
    if volumes is None:
        volumes = prepare_volumes(load_study_cohort(cfg, folder.root), cfg, folder.root, progress, log=log)
    if plan is None:
        plan = folder.read_folds(volumes.participant_ids)
    trained = network_factors(folder.tasks, plan, list(dict.fromkeys(
        folder.read_predictions()["factor"])), cfg.model.heads)  # in the networks' order
    factors = trained if factors is None else factors

    def networks(factor: str) -> list[FactorNetwork]:
        return factor_networks(plan, factor, trained, cfg.model.heads, cfg.training.n_seeds)

    device = str(resolve_device(cfg.training.device))
    ref_img = nib.Nifti1Image(
        np.zeros(volumes.input_grid.shape, np.uint8), volumes.input_grid.affine
    )
    atlas_obj, atlas_option = _checked_atlas(atlas, atlas_labels, cfg, ablation, volumes, log)
    # the configured method writes attention/; another one (--method) its own subfolder
    files = _AttentionFiles(folder, method, own=method == a.method)
    maps: dict[str, nib.spatialimages.SpatialImage] = {}
    for factor in tqdm(factors, desc=f"attention ({method})", disable=not progress):
        signed_path, abs_path = files.fam(factor, False), files.fam(factor, True)
        if not (signed_path.is_file() and abs_path.is_file()):
            tasks = _factor_tasks(files, networks(factor), volumes, device)
            fam = factor_attention_map(tasks, volumes, method, mode=a.mode, device=device)
            signed = to_template_space(fam.signed, ref_img, volumes.downsample)
            absolute = to_template_space(fam.absolute, ref_img, volumes.downsample)
            atomic_write_nifti(signed, signed_path)
            atomic_write_nifti(absolute, abs_path)
        maps[factor] = load_img(abs_path, f"attention map of {factor}")
    results: dict[str, pd.DataFrame] = {}
    if a.sanity:
        first = _factor_tasks(files, networks(factors[0]), volumes, device)[0]
        model = first.model if isinstance(first.model, nn.Module) else first.model()
        idx = list(first.test_indices)[:4]
        x = np.stack([np.asarray(volumes[i], dtype=np.float32) for i in idx])[:, None]
        methods = list(dict.fromkeys([method, "gradient"]))
        sanity = cascading_randomization(model, torch.from_numpy(x).to(device), methods, seed=0)
        sanity.insert(0, "factor", factors[0])
        atomic_write_tsv(sanity, files.table("sanity"))
        plot_sanity(sanity, files.figure("attention_sanity"))
        log(format_table(sanity.round(3), f"Sanity check: cascading randomisation ({factors[0]})"))
        results["sanity"] = sanity

    if atlas_obj is not None:
        regions = pd.concat(
            [rank_regions(img, atlas_obj.img, atlas_obj.labels, f, atlas_name=atlas_obj.source,
                          atlas_option=atlas_option) for f, img in maps.items()],
            ignore_index=True,
        )
        atomic_write_tsv(regions, files.table("regions"))
        top = regions[regions["rank"] <= a.top_regions][["factor", "rank", "region", "mean_attention"]]
        log(format_table(top, _voxel_table_title(method, results.get("sanity"), a.top_regions)))
        results["regions"] = regions

    if a.truth:
        brain = None
        if cfg.cohort.mask:
            brain = np.asarray(load_img(cfg.cohort.mask, "brain mask").dataobj) > 0
        rows = []
        for f, img in maps.items():
            if f not in a.truth:
                continue
            truth = np.asarray(load_img(a.truth[f], f"truth mask of {f}").dataobj) > 0
            scores = localisation_scores(np.asarray(img.dataobj, dtype=np.float32), truth, brain)
            rows.append({"factor": f, **scores})
        loc = pd.DataFrame(rows)
        atomic_write_tsv(loc, files.table("localisation"))
        log(format_table(loc.round(3), "Localisation of |FAM| against the planted regions"))
        results["localisation"] = loc

    if a.template:
        template_img = load_img(a.template, "attention template")
    else:
        from nilearn.datasets import load_mni152_template

        template_img = load_mni152_template(resolution=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plot_fam(maps, template_img, files.figure("fig4_fam"))

    if atlas_obj is not None and (a.ablation if ablation is None else ablation):
        from dfrn.workflows.ablation import run_region_ablation

        results["ablation"] = run_region_ablation(
            out, cfg, volumes, factors, plan, atlas_obj, atlas_option, device, progress, log,
            executor,
        )
    return results
