"""Shared fixtures: real-data location and tiny synthetic cohorts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return Path(os.environ.get("DFRN_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data folder; tests using it skip when it is absent."""
    d = data_dir()
    if not d.is_dir():
        pytest.skip(f"shared test data not found at {d} (set DFRN_TEST_DATA)")
    return d


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory):
    """12 synthetic subjects on an 8 mm grid (23×28×23) with planted effects."""
    from dfrn.data.synth import make_synthetic_cohort

    return make_synthetic_cohort(
        tmp_path_factory.mktemp("tiny_cohort"), n_subjects=12, voxel_size=8.0, effect=0.4,
        radius=14.0, seed=3,
    )


@pytest.fixture
def cohort_copy(tiny_cohort, tmp_path: Path):
    """A private copy of the tiny cohort (its files may be changed by the test)."""
    import dataclasses
    import shutil

    root = tmp_path / "cohort"
    shutil.copytree(tiny_cohort.root, root)
    return dataclasses.replace(
        tiny_cohort,
        root=root,
        table=root / tiny_cohort.table.name,
        brain_mask=root / tiny_cohort.brain_mask.name,
    )


#: The tests' network width (channels 8 … 64, 0.9 MiB per saved network; the paper's: 1.0)
NARROW = 0.125


def study_config(synth, **over):
    """A fast study config on a synthetic cohort: 2 factors, 2 folds, 1 epoch, no stages,
    PyTorch's running BatchNorm statistics."""
    from dfrn.config import config_from_dict

    raw = {
        "cohort": {
            "table": str(synth.table),
            "targets": ["anhedonia", "sleep"],
            "mask": str(synth.brain_mask),
        },
        "model": {"widen_factor": NARROW},
        # running BatchNorm statistics: no extra passes over the training subjects after
        # each 1-epoch fit (the suite's time); the default "recompute" is tested where it
        # matters (tests/models/test_recipe.py, tests/workflows/test_learning_stage.py)
        "training": {"epochs": 1, "val_fraction": 0.0, "bn_stats": "running"},
        "cv": {"n_folds": 2, "n_repeats": 1, "seed": 1},
        "baseline": {"enabled": False},
        "attention": {"enabled": False},
        "final": {"enabled": False},
    }
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw, synth.root)


def one_thread_run(cfg, out: Path) -> Path:
    """``run_study`` with 1 torch thread, as each Ray task or SLURM job gets: the reference
    the executors' predictions are compared with (the thread count changes float sums)."""
    from dfrn.workflows.run import run_study

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(cfg, out, progress=False, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    return out


def roi_cohort(n: int = 40, p: int = 12, seed: int = 0, signal: float = 1.0):
    """ROI features, targets (a strong one and noise) and covariates for ridge tests."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    ids = [f"sub-{i:03d}" for i in range(n)]
    index = pd.Index(ids, name="participant_id")
    x = pd.DataFrame(rng.normal(size=(n, p)), index=index, columns=[f"roi_{j}" for j in range(p)])
    strong = x.iloc[:, :3].sum(axis=1) * signal + 0.1 * rng.normal(size=n)
    targets = pd.DataFrame({"strong": strong, "noise": rng.normal(size=n)}, index=index)
    cov = pd.DataFrame(
        {"age": rng.normal(50, 10, n), "sex": rng.choice(["F", "M"], n)}, index=index
    )
    return ids, x, targets, cov


def mni_template(shared: Path, folder: Path, mm: int) -> tuple[Path, Path]:
    """The shared 1 mm MNI152NLin6Asym template and mask resampled to ``mm`` mm, named as
    TemplateFlow names them (``tpl-MNI152NLin6Asym_res-0<mm>_…``: dfrn prep reads the space
    label from that name)."""
    import nibabel as nib
    import numpy as np
    from nilearn.image import resample_img

    stem = f"tpl-MNI152NLin6Asym_res-{mm:02d}"
    t1_path, mask_path = folder / f"{stem}_T1w.nii.gz", folder / f"{stem}_desc-brain_mask.nii.gz"
    if t1_path.is_file() and mask_path.is_file():
        return t1_path, mask_path
    src = nib.load(shared / "mni152" / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz")
    msk = nib.load(shared / "mni152" / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz")
    affine = src.affine.copy()
    affine[:3, :3] *= mm
    shape = tuple(-(-n // mm) for n in src.shape[:3])  # 91×109×91 at 2 mm, 46×55×46 at 4 mm
    kw = {"target_affine": affine, "target_shape": shape, "force_resample": True,
          "copy_header": True}
    t1 = resample_img(src, interpolation="continuous", **kw)
    nib.Nifti1Image(t1.get_fdata(dtype=np.float32), affine).to_filename(t1_path)
    m = resample_img(msk, interpolation="nearest", **kw)
    nib.Nifti1Image((m.get_fdata() > 0.5).astype(np.uint8), affine).to_filename(mask_path)
    return t1_path, mask_path


def template_2mm(shared: Path, folder: Path) -> tuple[Path, Path]:
    """The MNI152NLin6Asym template and mask at 2 mm (91×109×91); see :func:`mni_template`."""
    return mni_template(shared, folder, 2)


@pytest.fixture(scope="session")
def template_4mm(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """MNI152NLin6Asym at 4 mm (46×55×46), shared by the prep tests: the registration and
    every template-space file cost a quarter of 2 mm's, and the QC properties hold on it."""
    return mni_template(shared_data, tmp_path_factory.mktemp("template_4mm"), 4)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) for the in-process Ray tests of the session: executors join it
    (``RayExecutor`` never shuts down a Ray it did not start), so its start, its stop and its
    workers' imports are paid once."""
    import shutil
    import tempfile

    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="dfrnray", dir="/tmp")  # short: Ray's socket paths
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tmp)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def _resample_ixi(src: Path, dst: Path) -> None:
    """One IXI scan from 2 mm to 4 mm voxels over the same field of view."""
    import nibabel as nib
    import numpy as np
    from nilearn.image import resample_img

    img = nib.load(src)
    affine = img.affine.copy()
    affine[:3, :3] *= 2
    shape = tuple(-(-n // 2) for n in img.shape[:3])
    small = resample_img(img, target_affine=affine, target_shape=shape,
                         interpolation="continuous", force_resample=True, copy_header=True)
    nib.save(nib.Nifti1Image(small.get_fdata(dtype=np.float32), affine), dst)


#: The IXI scans the prep and BIDS tests run
IXI3 = ["sub-IXI012", "sub-IXI013", "sub-IXI014"]


@pytest.fixture(scope="session")
def ixi_4mm(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared IXI folder for :data:`IXI3` (participants.tsv, ``<id>_T1w.nii.gz``) with
    each real scan resampled from 2 mm to 4 mm voxels: an eighth of the voxels to correct,
    segment and register (a quarter of the time per subject), and the QC properties the
    tests assert hold on it. The 2 mm scans run in ``benchmarks/bench_prep_ixi10.py``."""
    import pandas as pd

    folder = tmp_path_factory.mktemp("ixi_4mm")
    table = pd.read_csv(shared_data / "ixi" / "participants.tsv", sep="\t", dtype=str)
    table[table.participant_id.isin(IXI3)].to_csv(folder / "participants.tsv", sep="\t",
                                                  index=False)
    for pid in IXI3:
        _resample_ixi(shared_data / "ixi" / f"{pid}_T1w.nii.gz", folder / f"{pid}_T1w.nii.gz")
    return folder


def confound_cohort(root: Path, n: int = 48, size: int = 16, seed: int = 0) -> Path:
    """Images in which age shrinks the whole brain (a broad atrophy) and a local score
    darkens one blob; targets ``age_only`` (age plus noise: nothing beyond the covariates)
    and ``local`` (the local score plus an age confound). Columns age, sex, site, true_local.
    """
    import nibabel as nib
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    zz, yy, xx = np.mgrid[:size, :size, :size].astype(np.float32)
    d = np.sqrt((zz - 7.5) ** 2 + (yy - 7.5) ** 2 + (xx - 7.5) ** 2)
    blob = np.exp(-((zz - 5) ** 2 + (yy - 5) ** 2 + (xx - 10) ** 2) / (2 * 2.5**2))
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    age = rng.uniform(20, 80, n)
    z_age = (age - age.mean()) / age.std()
    local = rng.standard_normal(n)
    rows = []
    for i in range(n):
        brain = 1.0 / (1.0 + np.exp((d - (6.5 - 0.9 * z_age[i])) / 0.5))
        img = brain * (1.0 - 0.3 * np.clip(local[i], -2.5, 2.5) * blob)
        img = img + 0.03 * rng.standard_normal(img.shape) * (brain > 0.05)
        name = f"sub-{i:02d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), root / name)
        rows.append({"participant_id": f"sub-{i:02d}", "t1": name, "age": round(age[i], 1),
                     "sex": rng.choice(["F", "M"]), "site": f"S{i % 3}",
                     "age_only": 0.8 * z_age[i] + 0.6 * rng.standard_normal(),
                     "local": local[i] + 0.6 * z_age[i] + 0.4 * rng.standard_normal(),
                     "true_local": local[i]})
    pd.DataFrame(rows).to_csv(root / "cohort.tsv", sep="\t", index=False)
    return root / "cohort.tsv"
