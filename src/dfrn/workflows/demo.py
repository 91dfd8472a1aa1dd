"""``dfrn demo``: the whole pipeline on a synthetic cohort with planted effects.

The default demo is shrunk to finish in a few minutes on a 2-core laptop CPU and says
so in its output. ``full=True`` runs the paper's protocol at full resolution (for a GPU):
116 subjects at 1 mm, 10 folds × 5 repeats, 50 epochs with early stopping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dfrn.config import StudyConfig, config_from_dict
from dfrn.data.synth import FACTORS, make_demo_atlases, make_synthetic_cohort
from dfrn.workflows.results import ResultsFolder, read_run_info
from dfrn.workflows.run import StudyResult, run_study

__all__ = ["DemoSettings", "QUICK", "FULL", "run_demo", "demo_config", "synth_cohort"]


@dataclass(frozen=True)
class DemoSettings:
    n_subjects: int
    voxel_size: float
    downsample: int
    n_folds: int
    n_repeats: int
    epochs: int
    val_fraction: float
    effect: float
    radius: float
    n_permutations: int
    age_effect: float = 0.15
    asymmetry: float = 0.0
    """Fixed darkening of the planted regions' left spheres (0: the demo's symmetric brain)."""

    def describe(self) -> str:
        shape = "×".join(
            str(int(-(-n // (self.voxel_size * self.downsample)))) for n in (182, 218, 182)
        )
        return (
            f"{self.n_subjects} subjects; images on a {self.voxel_size:g} mm grid, network input "
            f"{shape} ({self.voxel_size * self.downsample:g} mm voxels); {self.n_repeats} × "
            f"{self.n_folds}-fold CV; {self.epochs} epochs"
            + ("" if self.val_fraction else " without early stopping")
            + f"; planted effect {self.effect:g} per SD in {self.radius:g} mm spheres; "
            f"{self.n_permutations} baseline permutations; age drives a broad gray-matter "
            f"atrophy ({self.age_effect:g} per SD) and {AGE_ONLY} is age plus noise"
        )


QUICK = DemoSettings(
    n_subjects=72,
    voxel_size=4.0,
    downsample=2,
    n_folds=3,
    n_repeats=1,
    epochs=5,
    val_fraction=0.0,
    effect=0.4,
    radius=14.0,
    n_permutations=200,
)
FULL = DemoSettings(
    n_subjects=116,
    voxel_size=1.0,
    downsample=1,
    n_folds=10,
    n_repeats=5,
    epochs=50,
    val_fraction=0.1,
    effect=0.4,
    radius=14.0,
    n_permutations=1000,
)
#: The demo's factor that is related to age only (no planted region).
AGE_ONLY = "sleep"
PAPER = "116 subjects at 1 mm (182×218×182), 10 × 5-fold CV, up to 50 epochs"


def demo_config(synth_dir: Path, s: DemoSettings, seed: int = 0) -> StudyConfig:
    """The study config the demo runs (written to the results folder as config.toml)."""
    raw = {
        "cohort": {
            "table": str(synth_dir / "participants.tsv"),
            "image_column": "t1",
            "targets": list(FACTORS),
            "covariates": ["age", "sex"],
            "gm_column": "gm",
            "mask": str(synth_dir / "brain_mask.nii.gz"),
            "downsample": s.downsample,
        },
        "training": {"epochs": s.epochs, "val_fraction": s.val_fraction, "seed": seed},
        "cv": {"n_folds": s.n_folds, "n_repeats": s.n_repeats, "seed": seed},
        "baseline": {
            "n_permutations": s.n_permutations,
            "atlas": str(synth_dir / "parcellation_dseg.nii.gz"),
            "atlas_labels": str(synth_dir / "parcellation_dseg.tsv"),
        },
        "attention": {
            "template": str(synth_dir / "template_T1w.nii.gz"),
            "atlas": str(synth_dir / "regions_dseg.nii.gz"),
            "atlas_labels": str(synth_dir / "regions_dseg.tsv"),
            "truth": {f: str(synth_dir / f"truth_{f}.nii.gz") for f in FACTORS if f != AGE_ONLY},
        },
    }
    return config_from_dict(raw, synth_dir)


def run_demo(
    out: str | Path = "dfrn-demo",
    full: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    settings: DemoSettings | None = None,
) -> StudyResult:
    """Generate the planted cohort into ``out/synth`` and run the pipeline into ``out``."""
    s = settings or (FULL if full else QUICK)
    out = Path(out)
    synth_dir = ResultsFolder(out).synth
    t0 = time.perf_counter()
    if full:
        log(f"dfrn demo --full: the paper's protocol ({PAPER}); use a GPU.")
    else:
        log(
            f"dfrn demo (CPU-sized). Shrunk from the paper's protocol ({PAPER}) to: {s.describe()}."
        )
    if read_run_info(out) is None and not (synth_dir / "participants.tsv").is_file():
        _write_synthetic_cohort(out, synth_dir, s, seed, progress, log)
    log(
        "atlases (built offline): the baseline uses 60 k-means parcels of the brain mask "
        "(synth/parcellation_dseg), which do not follow the planted regions; attention maps and "
        "region ablation are ranked on 30 coarser parcels with the planted structures named "
        "(synth/regions_dseg)"
    )
    cfg = demo_config(synth_dir.resolve(), s, seed)
    shrunk = (f"dfrn demo --full: the paper's protocol ({PAPER})." if full else
              f"CPU-sized demo on a synthetic cohort with planted effects. Shrunk from the "
              f"paper's protocol ({PAPER}) to: {s.describe()}.")
    result = run_study(cfg, out, progress=progress, log=log, allow_existing=("synth",),
                       notes=(shrunk,))
    mean_r = result.metrics.groupby("factor", sort=False)["pearson_r"].mean()
    log(
        "Table 1 mean r per factor: "
        + ", ".join(f"{f} {r:.2f}" for f, r in mean_r.items())
        + f" ({AGE_ONLY} has no planted region: its r comes from age, and 'Beyond the "
        "covariates' says so)"
    )
    log(f"demo finished in {time.perf_counter() - t0:.0f} s; results in {out}")
    log(f"open the report: {result.report}")
    return result


def _write_synthetic_cohort(out: Path, synth_dir: Path, s: DemoSettings, seed: int,
                            progress: bool, log: Callable[[str], None]) -> None:
    """The planted cohort and its atlases, into ``synth_dir`` of a new results folder."""
    if out.exists() and any(p.name != "synth" for p in out.iterdir()):
        from dfrn.errors import ResultsFolderError

        raise ResultsFolderError(
            f"results folder {out} is not empty and holds no dfrn run; choose another --out"
        )
    log(f"writing the synthetic cohort to {synth_dir} ...")
    synth = make_synthetic_cohort(
        synth_dir,
        n_subjects=s.n_subjects,
        voxel_size=s.voxel_size,
        effect=s.effect,
        radius=s.radius,
        seed=seed,
        progress=progress,
        age_effect=s.age_effect,
        age_only=AGE_ONLY,
        asymmetry=s.asymmetry,
    )
    make_demo_atlases(synth, seed=seed, n_region_parcels=30)


def synth_cohort(out: str | Path, n_subjects: int, seed: int, full: bool = False,
                 settings: DemoSettings | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> Path:
    """``dfrn synth``: new subjects from the demo's generative model; the cohort table.

    The planted regions, effect sizes, age effect and grid are the demo's (``settings``,
    else :data:`FULL` or :data:`QUICK`), so a package of ``dfrn demo`` applies to them;
    only the subjects (scores, ages, sexes, head size, bias field, noise) are drawn by
    ``seed``. ``out`` gets the images, ``cohort.tsv`` (participant_id, t1, gm, age, sex and
    the true scores) and the truth masks ``truth_<factor>.nii.gz``.
    """
    from dfrn.errors import DfrnInputError

    if n_subjects < 1:
        raise DfrnInputError(f"--subjects must be at least 1, got {n_subjects}")
    s = settings or (FULL if full else QUICK)
    out = Path(out)
    if (out / "cohort.tsv").exists():
        raise DfrnInputError(f"{out} already holds cohort.tsv; choose another folder")
    synth = make_synthetic_cohort(
        out, n_subjects=n_subjects, voxel_size=s.voxel_size, effect=s.effect, radius=s.radius,
        seed=seed, progress=progress, age_effect=s.age_effect, age_only=AGE_ONLY,
        asymmetry=s.asymmetry, table_name="cohort.tsv",
    )
    log(f"{n_subjects} synthetic subject(s) (seed {seed}, {s.voxel_size:g} mm grid, the demo's "
        f"planted regions and effects; {AGE_ONLY} is age plus noise): {synth.table}")
    return synth.table
