"""The attention stage of a study: factor attention maps (FAM) from the trained CV models.

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
overwritten or mistaken for another method's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from dfrn.config import StudyConfig
from dfrn.data.images import VolumeSet
from dfrn.errors import DfrnInputError
from dfrn.evaluation.tasks import plan_tasks, read_task_meta
from dfrn.interpret.maps import (
    FoldTask,
    factor_attention_map,
    localisation_scores,
    plot_fam,
    rank_regions,
    to_template_space,
)
from dfrn.interpret.sanity import cascading_randomization, plot_sanity
from dfrn.io import atomic_write_nifti, atomic_write_tsv
from dfrn.models.regressor import DFRNRegressor, resolve_device
from dfrn.plotting import format_table

__all__ = ["run_attention_stage", "load_atlas_for"]


def load_atlas_for(atlas: str, labels: str, log: Callable[[str], None]):
    """The configured atlas, or AAL3 from nilearn when online; None (with a note) otherwise."""
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


def _factor_tasks(out: Path, plan: pd.DataFrame, factor: str, volumes: VolumeSet, device: str):
    tasks = []
    for t in plan_tasks(plan, [factor]):
        folder = out / "cv" / "tasks" / t.name
        if not folder.is_dir():
            raise DfrnInputError(
                f"task {t.name} has not finished; rerun 'dfrn run' to complete the CV first"
            )
        meta = read_task_meta(folder, t)  # every file checked against the task's manifest

        def loader(p=folder / "model.pt"):
            return DFRNRegressor.load(p, device=device).model_

        tasks.append(FoldTask(loader, volumes.index_of(meta["test_ids"]), t.repeat, t.fold))
    return tasks


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
) -> dict[str, pd.DataFrame]:
    """Compute and write every attention output for a finished CV run in ``out``.

    Called without ``cfg`` (``dfrn attention RESULTS``), it takes the folder's lock and first
    checks that the input files are those the run was made with.
    """
    if cfg is None:
        from dfrn.workflows.study import open_finished_study, prepare_volumes, results_lock

        with results_lock(Path(out), "dfrn attention", log):
            study = open_finished_study(out, progress)
            volumes = prepare_volumes(
                study.cohort, study.cfg, study.out, progress, study.inputs, log
            )
            return run_attention_stage(
                out, study.cfg, volumes, factors, study.plan, progress, log, method, atlas,
                atlas_labels,
            )
    from tqdm.auto import tqdm

    from dfrn.workflows.study import load_study_cohort, prepare_volumes

    out = Path(out)
    a = cfg.attention
    method = method or a.method
    resolve_device(cfg.training.device)
    if volumes is None:
        volumes = prepare_volumes(load_study_cohort(cfg), cfg, out, progress, log=log)
    if plan is None:
        plan = pd.read_csv(out / "cv" / "folds.tsv", sep="\t", dtype={"participant_id": str})
    if factors is None:
        pred = pd.read_csv(out / "cv" / "predictions.tsv", sep="\t")
        factors = list(dict.fromkeys(pred["factor"]))
    device = str(resolve_device(cfg.training.device))
    ref_img = nib.Nifti1Image(
        np.zeros(volumes.input_grid.shape, np.uint8), volumes.input_grid.affine
    )
    # the configured method writes attention/; another one (--method) its own subfolder
    own = method == a.method
    att_dir = out / "attention" if own else out / "attention" / f"method-{method}"
    suffix = "" if own else f"_{method}"
    att_dir.mkdir(parents=True, exist_ok=True)
    maps: dict[str, nib.Nifti1Image] = {}
    for factor in tqdm(factors, desc=f"attention ({method})", disable=not progress):
        signed_path = att_dir / f"{factor}_fam.nii.gz"
        abs_path = att_dir / f"{factor}_fam_abs.nii.gz"
        if not (signed_path.is_file() and abs_path.is_file()):
            tasks = _factor_tasks(out, plan, factor, volumes, device)
            fam = factor_attention_map(tasks, volumes, method, mode=a.mode, device=device)
            signed = to_template_space(fam.signed, ref_img, volumes.downsample)
            absolute = to_template_space(fam.absolute, ref_img, volumes.downsample)
            atomic_write_nifti(signed, signed_path)
            atomic_write_nifti(absolute, abs_path)
        maps[factor] = nib.load(abs_path)
    results: dict[str, pd.DataFrame] = {}

    atlas_obj = load_atlas_for(atlas or a.atlas, atlas_labels or a.atlas_labels, log)
    if atlas_obj is not None:
        regions = pd.concat(
            [rank_regions(img, atlas_obj.img, atlas_obj.labels, f) for f, img in maps.items()],
            ignore_index=True,
        )
        atomic_write_tsv(regions, att_dir / "regions.tsv")
        top = regions[regions["rank"] <= a.top_regions][["factor", "rank", "region", "mean_attention"]]
        log(format_table(top, f"Top {a.top_regions} regions by mean |attention| per factor"))
        results["regions"] = regions

    if a.truth:
        brain = None
        if cfg.cohort.mask:
            brain = np.asarray(nib.load(cfg.cohort.mask).dataobj) > 0
        rows = []
        for f, img in maps.items():
            if f not in a.truth:
                continue
            truth = np.asarray(nib.load(a.truth[f]).dataobj) > 0
            scores = localisation_scores(np.asarray(img.dataobj, dtype=np.float32), truth, brain)
            rows.append({"factor": f, **scores})
        loc = pd.DataFrame(rows)
        atomic_write_tsv(loc, att_dir / "localisation.tsv")
        log(format_table(loc.round(3), "Localisation of |FAM| against the planted regions"))
        results["localisation"] = loc

    template = a.template
    if template:
        template_img = nib.load(template)
    else:
        from nilearn.datasets import load_mni152_template

        template_img = load_mni152_template(resolution=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plot_fam(maps, template_img, out / "figures" / f"fig4_fam{suffix}.png")

    if a.sanity:
        first = _factor_tasks(out, plan, factors[0], volumes, device)[0]
        model = first.model() if callable(first.model) else first.model
        idx = list(first.test_indices)[:4]
        x = np.stack([np.asarray(volumes[i], dtype=np.float32) for i in idx])[:, None]
        import torch

        methods = list(dict.fromkeys([method, "gradient"]))
        sanity = cascading_randomization(model, torch.from_numpy(x).to(device), methods, seed=0)
        sanity.insert(0, "factor", factors[0])
        atomic_write_tsv(sanity, att_dir / "sanity.tsv")
        plot_sanity(sanity, out / "figures" / f"attention_sanity{suffix}.png")
        log(format_table(sanity.round(3), f"Sanity check: cascading randomisation ({factors[0]})"))
        results["sanity"] = sanity
    return results
