"""dfrn prep end to end: real IXI scans on a 4 mm template, derivatives input, resume and
failure, and raw scans → dfrn prep → dfrn run with the ridge baseline on modulated GM.

One prepared cohort (3 IXI scans at 4 mm through the dfrn prep command, SyN) is shared by every test
that only reads one; tests that change a prep folder work on a copy. The 10-scan run at 2 mm
with the same QC assertions is ``benchmarks/bench_prep_ixi10.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import IXI3

from dfrn.io import verify_manifest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SPACE = "space-MNI152NLin6Asym_res-4"


def _dfrn(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg", **(env or {})}
    code = "import sys; from dfrn.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=1500)


def _dfrn_here(capfd: pytest.CaptureFixture, *args: str) -> SimpleNamespace:
    """``dfrn ARGS`` in this process (torch is imported already: seconds less than a new
    process), with what it printed; for tests that are not about processes."""
    from dfrn.cli import main

    capfd.readouterr()
    rc = main(list(args))
    printed = capfd.readouterr()
    return SimpleNamespace(returncode=rc, stdout=printed.out, stderr=printed.err)


def _ixi_table(ixi_dir: Path, folder: Path, ids: list[str] | None = None) -> Path:
    """The IXI participants table with a t1 column of paths relative to the table's folder."""
    ixi = pd.read_csv(ixi_dir / "participants.tsv", sep="\t", dtype=str)
    if ids is not None:
        ixi = ixi[ixi.participant_id.isin(ids)]
    ixi["t1"] = [os.path.relpath(ixi_dir / f"{p}_T1w.nii.gz", folder)
                 for p in ixi.participant_id]
    table = folder / "participants.tsv"
    ixi.to_csv(table, sep="\t", index=False)
    return table


def _tpl_args(tpl: tuple[Path, Path]) -> list[str]:
    return ["--template", str(tpl[0]), "--template-mask", str(tpl[1])]


@pytest.fixture(scope="session")
def ixi_prep(ixi_4mm: Path, template_4mm, tmp_path_factory):
    """3 raw IXI scans through the dfrn prep command (SyN, 4 mm template, 2 jobs), with
    $TMPDIR pointing at an empty folder of its own."""
    pytest.importorskip("ants")
    folder = tmp_path_factory.mktemp("ixi_prep")
    table = _ixi_table(ixi_4mm, folder, IXI3)
    out = folder / "prep"
    tmpdir = folder / "tmpdir"
    tmpdir.mkdir()
    proc = _dfrn("prep", str(table), "--out", str(out), *_tpl_args(template_4mm), "--jobs", "2",
                 "--no-progress", env={"TMPDIR": str(tmpdir)})
    assert proc.returncode == 0, proc.stderr
    return out, table, proc, tmpdir


def test_registration_quality_on_the_ixi_scans(ixi_prep) -> None:
    """Every IXI subject: brain-mask Dice >= 0.90 with the template's, T1 r >= 0.40, status ok."""
    out, _, _, _ = ixi_prep
    qc = pd.read_csv(out / "qc.tsv", sep="\t")
    print("\n" + qc[["participant_id", "dice", "corr", "gm_ml", "runtime_s", "status"]].to_string())
    assert len(qc) == 3
    assert (qc["dice"] >= 0.90).all(), qc[["participant_id", "dice"]]
    assert (qc["corr"] >= 0.40).all(), qc[["participant_id", "corr"]]
    assert (qc["status"] == "ok").all()
    # adult GM volumes, in ml
    assert qc["gm_ml"].between(350, 1100).all(), qc["gm_ml"]
    assert qc["gm_fraction"].between(0.25, 0.6).all(), qc["gm_fraction"]


def test_no_temporary_files_are_left(ixi_prep) -> None:
    """ANTs' intermediates (antsr*prob*.nii.gz, …) went into private folders, since removed:
    the $TMPDIR of the run is as empty as before it."""
    _, _, _, tmpdir = ixi_prep
    assert sorted(p.name for p in tmpdir.iterdir()) == []


def test_gm_is_the_middle_intensity_class(ixi_prep) -> None:
    """Recomputed from the written native dseg and N4 T1: mean T1 CSF < GM < WM, per subject."""
    out, _, _, _ = ixi_prep
    for sub in sorted(out.glob("sub-*")):
        anat = sub / "anat"
        t1 = nib.load(anat / f"{sub.name}_desc-preproc_T1w.nii.gz").get_fdata()
        dseg = np.asarray(nib.load(anat / f"{sub.name}_dseg.nii.gz").dataobj)
        means = [t1[dseg == k].mean() for k in (1, 2, 3)]
        assert means[0] < means[1] < means[2], (sub.name, means)
        qc = json.loads((sub / "qc.json").read_text())
        assert qc["t1_mean_csf"] < qc["t1_mean_gm"] < qc["t1_mean_wm"]
    assert (out / "desc-dseg.tsv").read_text().splitlines()[1:] == ["1\tCSF", "2\tGM", "3\tWM"]


def test_outputs_are_bids_derivatives_with_the_right_affines(ixi_prep, template_4mm,
                                                             ixi_4mm) -> None:
    out, table, _, _ = ixi_prep
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "dfrn" and desc["GeneratedBy"][0]["Version"]
    assert json.loads((out / "prep.json").read_text())["identity"]["space"] == "MNI152NLin6Asym"
    tpl = nib.load(template_4mm[0])
    for pid in pd.read_csv(table, sep="\t").participant_id:
        sub = out / pid
        assert verify_manifest(sub, required=("qc.json",)) is None
        anat = sub / "anat"
        for suffix in ("desc-preproc_T1w", "desc-brain_mask", "label-GM_probseg",
                       "label-GM_desc-modulated_probseg"):
            img = nib.load(anat / f"{pid}_{SPACE}_{suffix}.nii.gz")
            assert img.shape == tpl.shape
            np.testing.assert_array_equal(img.affine, tpl.affine)
        for suffix in ("xfm.mat", "desc-warp_xfm.nii.gz"):
            assert (anat / f"{pid}_from-T1w_to-MNI152NLin6Asym_mode-image_{suffix}").is_file()
        assert (anat / f"{pid}_from-MNI152NLin6Asym_to-T1w_mode-image_desc-warp_xfm.nii.gz").is_file()
        png = sub / "figures" / f"{pid}_space-MNI152NLin6Asym_desc-qc_T1w.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # native outputs: RAS, and the same world box as the raw scan
        raw = nib.load(ixi_4mm / f"{pid}_T1w.nii.gz")
        native = nib.load(anat / f"{pid}_desc-preproc_T1w.nii.gz")
        assert nib.aff2axcodes(native.affine) == ("R", "A", "S")
        from dfrn.data.templates import same_world_grid

        assert same_world_grid(native, raw)
    cohort = pd.read_csv(out / "cohort.tsv", sep="\t")
    assert cohort["gm"].str.endswith("label-GM_desc-modulated_probseg.nii.gz").all()


def test_cohort_tsv_keeps_the_table_and_documents_the_new_columns(ixi_prep, ixi_4mm) -> None:
    """cohort.tsv: the table's own columns with their values as they were, then source_t1 (the
    raw scan, absolute) and the outputs; t1 is the preprocessed T1 (what dfrn run trains on),
    as the README says."""
    out, table, _, _ = ixi_prep
    given = pd.read_csv(table, sep="\t", dtype=str)
    cohort = pd.read_csv(out / "cohort.tsv", sep="\t", dtype=str)
    assert list(cohort.columns) == ["participant_id", "ixi_id", "age", "sex", "source_t1", "t1",
                                    "gm", "gm_unmodulated", "mask", "prep_status"]
    pd.testing.assert_frame_equal(cohort[["participant_id", "ixi_id", "age", "sex"]],
                                  given[["participant_id", "ixi_id", "age", "sex"]])
    for row in cohort.itertuples():
        assert row.source_t1 == str((ixi_4mm / f"{row.participant_id}_T1w.nii.gz").resolve())
        assert row.t1 == f"{row.participant_id}/anat/{row.participant_id}_{SPACE}_desc-preproc_T1w.nii.gz"
        assert (out / row.t1).is_file() and (out / row.mask).is_file()
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "`source_t1`" in readme and "`gm_unmodulated`" in readme


def test_a_table_column_named_like_an_output_is_refused(ixi_4mm, template_4mm,
                                                        tmp_path) -> None:
    """A column of the participants table that cohort.tsv would overwrite is refused, naming it
    (the image column itself becomes source_t1)."""
    table = _ixi_table(ixi_4mm, tmp_path, IXI3)
    df = pd.read_csv(table, sep="\t", dtype=str).rename(columns={"t1": "scan"})
    df["scan"] = [str((table.parent / p).resolve()) for p in df["scan"]]
    df["gm"] = "0.5"
    bad = tmp_path / "t.tsv"
    df.to_csv(bad, sep="\t", index=False)
    proc = _dfrn("prep", str(bad), "--image-column", "scan", "--out", str(tmp_path / "o"),
                 *_tpl_args(template_4mm), "--no-progress")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "column 'gm'" in line and "rename it" in line


@pytest.fixture(scope="session")
def ixi_redo(ixi_prep, ixi_4mm, template_4mm, tmp_path_factory):
    """A copy of the prepared cohort without sub-IXI013, whose scan is now truncated: dfrn prep
    (same settings) fails on it alone; then, with the scan restored, it redoes only it.

    Returns the folder, the two runs, and what the folder held between them.
    """
    pytest.importorskip("ants")
    root = tmp_path_factory.mktemp("ixi_redo")
    src_out, _, _, _ = ixi_prep
    out = root / "prep"
    shutil.copytree(src_out, out)
    (out / ".dfrn.lock").unlink(missing_ok=True)
    shutil.rmtree(out / "sub-IXI013")
    scans = root / "scans"
    scans.mkdir()
    for pid in IXI3:
        shutil.copy(ixi_4mm / f"{pid}_T1w.nii.gz", scans / f"{pid}_T1w.nii.gz")
    bad = scans / "sub-IXI013_T1w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:5000])  # a truncated download
    table = root / "t.tsv"
    pd.DataFrame({"participant_id": IXI3, "scan": [f"scans/{p}_T1w.nii.gz" for p in IXI3],
                  "score": [1.0, 2.0, 3.0]}).to_csv(table, sep="\t", index=False)
    args = ["prep", str(table), "--image-column", "scan", "--out", str(out),
            *_tpl_args(template_4mm), "--jobs", "2", "--no-progress"]
    failed = _dfrn(*args)
    between = root / "between"
    between.mkdir()
    for name in ("qc.tsv", "cohort.tsv"):
        shutil.copy(out / name, between / name)
    leftovers = sorted(p.name for p in out.glob(".prep-*")) + sorted(
        p.name for p in out.glob("sub-IXI013"))
    done = {p: p.stat().st_mtime_ns for p in out.glob("sub-*/anat/*")}
    # what dfrn run would say about this cohort
    from dfrn.data.cohort import load_cohort_table
    from dfrn.workflows.study import warn_prep_qc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_prep_qc(load_cohort_table(out / "cohort.tsv", ["score"]))
    shutil.copy(ixi_4mm / "sub-IXI013_T1w.nii.gz", bad)  # fixed
    redone = _dfrn(*args)
    return {"out": out, "failed": failed, "redone": redone, "between": between,
            "leftovers": leftovers, "done": done, "warnings": [str(w.message) for w in caught]}


def test_a_rerun_repeats_nothing_and_a_subject_repeats_exactly(ixi_prep, ixi_redo,
                                                               template_4mm) -> None:
    out, table, _, _ = ixi_prep
    before = {p: p.stat().st_mtime_ns for p in out.glob("sub-*/anat/*")}
    proc = _dfrn("prep", str(table), "--out", str(out), *_tpl_args(template_4mm), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "3 of 3 subject(s) already done; 0 to do" in proc.stdout
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("sub-*/anat/*")}
    # deterministic mode: the same subject, run again in another folder and process, gives
    # the same bytes
    assert ixi_redo["redone"].returncode == 0, ixi_redo["redone"].stderr
    for f in sorted((out / "sub-IXI013" / "anat").iterdir()):
        twin = ixi_redo["out"] / "sub-IXI013" / "anat" / f.name
        if f.name.endswith(".nii.gz"):
            np.testing.assert_array_equal(nib.load(f).get_fdata(), nib.load(twin).get_fdata())
        else:
            assert f.read_bytes() == twin.read_bytes(), f.name


def test_other_settings_in_the_same_folder_are_refused(ixi_prep, template_4mm) -> None:
    out, table, _, _ = ixi_prep
    proc = _dfrn("prep", str(table), "--out", str(out), *_tpl_args(template_4mm),
                 "--transform", "affine", "--no-progress")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "other settings (transform)" in line


def test_a_corrupt_scan_fails_alone_and_a_rerun_does_only_it(ixi_redo) -> None:
    out, failed, redone = ixi_redo["out"], ixi_redo["failed"], ixi_redo["redone"]
    assert failed.returncode == 2
    err = failed.stderr.strip().splitlines()
    assert len(err) == 1 and "1 of 3 subject(s) failed" in err[0] and "sub-IXI013" in err[0]
    qc = pd.read_csv(ixi_redo["between"] / "qc.tsv", sep="\t").set_index("participant_id")
    assert qc.loc["sub-IXI013", "status"] == "failed"
    assert "cannot read" in qc.loc["sub-IXI013", "note"]
    assert (qc.loc[["sub-IXI012", "sub-IXI014"], "status"] == "ok").all()
    cohort = pd.read_csv(ixi_redo["between"] / "cohort.tsv", sep="\t")
    assert cohort.participant_id.tolist() == ["sub-IXI012", "sub-IXI014"]
    # an image column of another name (--image-column scan) also becomes source_t1
    assert list(cohort.columns) == ["participant_id", "score", "source_t1", "t1", "gm",
                                    "gm_unmodulated", "mask", "prep_status"]
    assert cohort.source_t1.tolist() == [
        str((out.parent / "scans" / f"{p}_T1w.nii.gz").resolve()) for p in cohort.participant_id]
    assert ixi_redo["leftovers"] == []  # no temporary folder, no half-written sub-IXI013
    # dfrn run on this cohort warned that a subject failed
    assert any(re.search("1 subject.s. failed dfrn prep and are not in the cohort: sub-IXI013", w)
               for w in ixi_redo["warnings"]), ixi_redo["warnings"]
    assert redone.returncode == 0, redone.stderr
    assert "2 of 3 subject(s) already done; 1 to do" in redone.stdout
    assert ixi_redo["done"] == {p: p.stat().st_mtime_ns for p in out.glob("sub-*/anat/*")
                                if "IXI013" not in p.name}
    qc = pd.read_csv(out / "qc.tsv", sep="\t")
    assert (qc.status == "ok").all() and len(qc) == 3


def test_fmriprep_derivatives_are_resampled_by_world_coordinates(shared_data, template_4mm,
                                                                tmp_path) -> None:
    """An fMRIPrep-style tree (one subject at res-2, one on colin27's 1 mm grid) imported onto
    the template (4 mm here): each volume equals nilearn's resample_to_img."""
    from nilearn.image import resample_img, resample_to_img

    from dfrn.workflows.prep import run_prep

    tpl, mask = template_4mm
    tpl_img = nib.load(tpl)
    mask_img = nib.load(shared_data / "mni152" / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz")
    one_mm = nib.load(shared_data / "mni152" / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz")
    deriv = tmp_path / "fmriprep"
    aff2 = one_mm.affine.copy()
    aff2[:3, :3] *= 2
    kw = {"force_resample": True, "copy_header": True}
    colin = nib.load(shared_data / "colin27" / "ch2.nii.gz")
    sources = {
        "sub-01": ("res-2", resample_img(one_mm, aff2, (91, 109, 91), "continuous", **kw),
                   resample_img(mask_img, aff2, (91, 109, 91), "nearest", **kw)),
        "sub-02": ("res-1", colin, resample_to_img(mask_img, colin, "nearest", **kw)),
    }
    written = {}
    for sub, (res, t1, m) in sources.items():
        anat = deriv / sub / "anat"
        anat.mkdir(parents=True)
        gm = nib.Nifti1Image(np.clip(t1.get_fdata() / t1.get_fdata().max(), 0, 1).astype(np.float32),
                             t1.affine)
        base = f"{sub}_space-MNI152NLin6Asym_{res}"
        for suffix, img in (("desc-preproc_T1w", t1), ("desc-brain_mask", m), ("label-GM_probseg", gm)):
            nib.save(img, anat / f"{base}_{suffix}.nii.gz")
        written[sub] = (anat / f"{base}_desc-preproc_T1w.nii.gz", anat / f"{base}_label-GM_probseg.nii.gz",
                        anat / f"{base}_desc-brain_mask.nii.gz")
        # a distractor in another space must be ignored
        nib.save(t1, anat / f"{sub}_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz")
    out = tmp_path / "prep"
    summary = run_prep(None, out, derivatives=deriv, template=tpl, template_mask=mask,
                       progress=False, log=lambda m: None)
    assert summary.failed == []
    for sub, (t1_src, gm_src, mask_src) in written.items():
        anat = out / sub / "anat"
        name = f"{sub}_space-MNI152NLin6Asym_res-4"
        got = nib.load(anat / f"{name}_desc-preproc_T1w.nii.gz")
        np.testing.assert_array_equal(got.affine, tpl_img.affine)
        want = resample_to_img(nib.load(t1_src), tpl_img, interpolation="continuous", **kw)
        np.testing.assert_allclose(got.get_fdata(), want.get_fdata(), rtol=1e-5, atol=1e-3)
        want_gm = resample_to_img(nib.load(gm_src), tpl_img, interpolation="continuous", **kw)
        got_gm = nib.load(anat / f"{name}_label-GM_probseg.nii.gz").get_fdata()
        np.testing.assert_allclose(got_gm, want_gm.get_fdata(), rtol=1e-5, atol=1e-5)
        want_m = resample_to_img(nib.load(mask_src), tpl_img, interpolation="nearest", **kw)
        got_m = nib.load(anat / f"{name}_desc-brain_mask.nii.gz").get_fdata()
        np.testing.assert_array_equal(got_m > 0.5, want_m.get_fdata() > 0.5)
    qc = summary.qc.set_index("participant_id")
    assert qc.loc["sub-01", "dice"] > 0.95
    assert qc["note"].str.contains("not modulated").all()
    cohort = pd.read_csv(out / "cohort.tsv", sep="\t")
    assert cohort["gm"].str.endswith("label-GM_probseg.nii.gz").all()


def _study_toml(folder: Path, cohort_table: Path, tpl: Path, shared: Path,
                extra: str = "", baseline: bool = True) -> Path:
    atlas = shared / "atlas" / "tpl-MNI152NLin6Asym_res-01_atlas-AAL3v1_dseg.nii.gz"
    labels = shared / "atlas" / "tpl-MNI152NLin6Asym_res-01_atlas-AAL3v1_dseg.tsv"
    toml = folder / "study.toml"
    toml.write_text(f"""
[cohort]
table = "{cohort_table}"
targets = ["age"]
downsample = 2

[model]
widen_factor = 0.125

[training]
epochs = 1
val_fraction = 0.0

[cv]
n_folds = 3
n_repeats = 1

[baseline]
enabled = {str(baseline).lower()}
atlas = "{atlas}"
atlas_labels = "{labels}"
n_permutations = 9

[attention]
enabled = false

[final]
enabled = false
{extra}
""")
    return toml


def test_raw_scans_to_dfrn_run_with_the_baseline_on_modulated_gm(ixi_prep, shared_data,
                                                                   tmp_path, capfd) -> None:
    """cohort.tsv from dfrn prep is a [cohort] table; the baseline reads its modulated GM maps
    with the shared AAL3 atlas (1 mm, resampled onto the 4 mm grid). The ridge's 5-fold inner
    CV needs 5 training subjects per fold: each of the 3 prepared subjects is listed 3 times
    under its own ID (paths made absolute); the columns are cohort.tsv's as they are."""
    out, _, _, _ = ixi_prep
    cohort = pd.read_csv(out / "cohort.tsv", sep="\t", dtype=str)
    for col in ("t1", "gm", "gm_unmodulated", "mask"):
        cohort[col] = [str(out / p) for p in cohort[col]]
    nine = pd.concat([cohort.assign(participant_id=cohort.participant_id + f"r{k}")
                      for k in range(3)], ignore_index=True)
    nine.to_csv(tmp_path / "cohort9.tsv", sep="\t", index=False)
    toml = _study_toml(tmp_path, tmp_path / "cohort9.tsv", out, shared_data)
    results = tmp_path / "results"
    proc = _dfrn_here(capfd, "run", str(toml), "--out", str(results), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    preds = pd.read_csv(results / "cv" / "predictions.tsv", sep="\t")
    assert sorted(preds.participant_id.unique()) == sorted(nine.participant_id)
    features = pd.read_csv(results / "baseline" / "roi_features.tsv", sep="\t",
                           index_col="participant_id")
    # ROI volumes of the modulated maps: total GM over AAL3 regions, in a plausible range (ml)
    total_ml = features.sum(axis=1) / 1000.0 if features.to_numpy().max() > 100 else features.sum(axis=1)
    assert (total_ml > 100).all() and (total_ml < 1200).all(), total_ml
    run_info = json.loads((results / "run.json").read_text())
    assert sum(k.startswith("gm/") for k in run_info["inputs"]) == 9


def test_prep_section_runs_inside_dfrn_run_and_reuses_finished_subjects(
        ixi_prep, shared_data, template_4mm, tmp_path, capfd) -> None:
    """[prep] in the study: the raw table goes through <results>/prep/ first; a results folder
    that already holds those subjects (an interrupted study) reuses them all."""
    out, table, _, _ = ixi_prep
    tpl2 = template_4mm
    results = tmp_path / "results"
    results.mkdir()
    shutil.copytree(out, results / "prep")
    (results / "prep" / ".dfrn.lock").unlink(missing_ok=True)
    extra = f'\n[prep]\ntemplate = "{tpl2[0]}"\ntemplate_mask = "{tpl2[1]}"\njobs = 2\n'
    toml = _study_toml(tmp_path, table, tpl2[0], shared_data, extra, baseline=False)
    proc = _dfrn_here(capfd, "run", str(toml), "--out", str(results), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 of 3 subject(s) already done; 0 to do" in proc.stdout
    preds = pd.read_csv(results / "cv" / "predictions.tsv", sep="\t")
    assert preds.participant_id.nunique() == 3
    cfg = (results / "config.toml").read_text()
    assert "[prep]" in cfg
    # a resume of the finished study is accepted and reuses everything
    proc = _dfrn_here(capfd, "run", str(toml), "--out", str(results), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cohort_derivatives_in_a_study_feed_its_cohort(template_4mm, tmp_path) -> None:
    """[cohort] derivatives: the study's prep stage imports them into <results>/prep/ and the
    study's cohort is that cohort.tsv, with the scores of the participants table."""
    from dfrn.config import config_from_dict
    from dfrn.errors import ResultsFolderError
    from dfrn.workflows.results import check_results_dir
    from dfrn.workflows.study import collect_inputs, load_study_cohort, run_study_prep

    tpl2 = template_4mm
    tpl_img = nib.load(tpl2[0])
    deriv = tmp_path / "fmriprep"
    ids = ["sub-a1", "sub-a2", "sub-a3"]
    for i, sub in enumerate(ids):
        anat = deriv / sub / "anat"
        anat.mkdir(parents=True)
        base = f"{sub}_space-MNI152NLin6Asym_res-4"
        data = tpl_img.get_fdata() * (1 + 0.1 * i)
        nib.save(nib.Nifti1Image(data.astype(np.float32), tpl_img.affine),
                 anat / f"{base}_desc-preproc_T1w.nii.gz")
        nib.save(nib.load(tpl2[1]), anat / f"{base}_desc-brain_mask.nii.gz")
        nib.save(nib.Nifti1Image((data / data.max()).astype(np.float32), tpl_img.affine),
                 anat / f"{base}_label-GM_probseg.nii.gz")
    table = tmp_path / "scores.tsv"
    pd.DataFrame({"participant_id": ids, "score": [1.0, 2.0, 3.0]}).to_csv(table, sep="\t", index=False)
    cfg = config_from_dict({
        "cohort": {"table": str(table), "targets": ["score"], "derivatives": str(deriv)},
        "prep": {"template": str(tpl2[0]), "template_mask": str(tpl2[1])},
    }, tmp_path)
    out = tmp_path / "results"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ResultsFolderError, match="not empty and holds no dfrn run"):
        check_results_dir(foreign, cfg, None, ("prep",))
    run_study_prep(cfg, out, progress=False, log=lambda m: None, resumed=False)
    cohort = load_study_cohort(cfg, out)
    assert cohort.participant_ids == ids
    assert cohort.targets["score"].tolist() == [1.0, 2.0, 3.0]
    assert all(str(p).startswith(str(out / "prep")) for p in cohort.images)
    for i, p in enumerate(cohort.images):
        np.testing.assert_allclose(nib.load(p).get_fdata(), tpl_img.get_fdata() * (1 + 0.1 * i),
                                   rtol=1e-5)
    inputs = collect_inputs(cfg, cohort)
    assert inputs["cohort_table"].path == out / "prep" / "cohort.tsv"
    assert {f"gm/{s}" for s in ids} <= set(inputs)


@pytest.mark.parametrize("kind", ["ray", "slurm"])
def test_prep_subjects_as_executor_tasks_match_local_processes(ixi_prep, ixi_4mm, template_4mm,
                                                               tmp_path, kind, request) -> None:
    """--executor ray or slurm: each subject is a Ray task or a SLURM job (submitit's local
    cluster); a corrupt scan fails alone, and the good subject's files are byte-identical to
    the local processes' (deterministic ANTs). The local run goes into a copy of the prepared
    cohort, where the good subject is already done; so does the SLURM run (Ray's registers
    it anew: the two executors run the same prep_task)."""
    pytest.importorskip("ants")
    pytest.importorskip("ray" if kind == "ray" else "submitit")
    from dfrn.config import ExecutorConfig
    from dfrn.executors import make_executor
    from dfrn.workflows.prep import run_prep

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(ixi_4mm / "sub-IXI014_T1w.nii.gz", scans / "a.nii.gz")
    (scans / "b.nii.gz").write_bytes(b"not a scan")
    table = tmp_path / "t.tsv"
    pd.DataFrame({"participant_id": ["sub-IXI014", "sub-bad"],
                  "t1": ["scans/a.nii.gz", "scans/b.nii.gz"]}).to_csv(table, sep="\t", index=False)
    kw = {"transform": "syn", "template": template_4mm[0], "template_mask": template_4mm[1],
          "progress": False, "log": lambda m: None, "raise_on_failure": False}
    if kind == "slurm":  # the good subject is already done (as for the local run below):
        shutil.copytree(ixi_prep[0], tmp_path / "ray")  # one job, the corrupt scan's
        (tmp_path / "ray" / ".dfrn.lock").unlink(missing_ok=True)
    if kind == "ray":  # the session's local Ray (2 CPUs), which the executor joins
        request.getfixturevalue("ray_session")
    runner = make_executor(kind, ExecutorConfig(kind=kind, num_cpus=2, cluster="local"))
    try:
        on_ray = run_prep(table, tmp_path / "ray", executor=runner, **kw)
    finally:
        runner.close()
    shutil.copytree(ixi_prep[0], tmp_path / "local")
    (tmp_path / "local" / ".dfrn.lock").unlink(missing_ok=True)
    local = run_prep(table, tmp_path / "local", jobs=2, **kw)
    done_before = ["sub-IXI014"] if kind == "slurm" else []
    assert on_ray.skipped == done_before and local.skipped == ["sub-IXI014"]
    assert on_ray.processed == [p for p in ["sub-IXI014", "sub-bad"] if p not in done_before]
    for summary in (on_ray, local):
        assert summary.failed == ["sub-bad"]
        assert "participant sub-bad: cannot read" in summary.qc.set_index("participant_id").at["sub-bad", "note"]
    assert not (tmp_path / "ray" / ".storage-check").exists()
    if kind == "slurm":  # one job per subject to do, logged in the prep folder
        jobs = pd.read_csv(tmp_path / "ray" / "logs" / "slurm" / "jobs.tsv", sep="\t")
        assert list(jobs["item"]) == ["sub-bad"]
    files = sorted((tmp_path / "local" / "sub-IXI014" / "anat").iterdir())
    assert len(files) >= 8
    for f in files:
        twin = tmp_path / "ray" / "sub-IXI014" / "anat" / f.name
        if f.name.endswith(".nii.gz"):
            np.testing.assert_array_equal(nib.load(f).get_fdata(), nib.load(twin).get_fdata())
        else:
            assert f.read_bytes() == twin.read_bytes(), f.name


def test_ray_address_errors_name_the_prep_option(tmp_path, monkeypatch, capsys) -> None:
    """dfrn prep --ray-address that cannot be joined: the one-line error names --ray-address,
    the option of this command, not the study config's [executor] address."""
    ray = pytest.importorskip("ray")
    from dfrn.cli import main

    def refuse(**kwargs):
        raise ConnectionError(f"no Ray cluster at {kwargs.get('address')}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    code = main(["prep", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "o"), "--executor",
                 "ray", "--ray-address", "ray://head:10001", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "--ray-address" in err and "[executor]" not in err and "ray://head:10001" in err


def test_a_custom_template_names_its_space_and_never_mni(template_4mm, tmp_path) -> None:
    """A template that is not MNI152NLin6Asym: its space label (--template-space, required when
    the file name does not carry it) names every output, the derivatives are looked up in it,
    and a folder made in another space is refused."""
    from dfrn.cli import main

    tpl_img = nib.load(template_4mm[0])
    custom = tmp_path / "colin_4mm.nii.gz"
    custom_mask = tmp_path / "colin_4mm_mask.nii.gz"
    nib.save(tpl_img, custom)
    nib.save(nib.load(template_4mm[1]), custom_mask)
    anat = tmp_path / "deriv" / "sub-c1" / "anat"
    anat.mkdir(parents=True)
    base = anat / "sub-c1_space-Colin27_res-4"
    nib.save(tpl_img, Path(f"{base}_desc-preproc_T1w.nii.gz"))
    nib.save(nib.load(template_4mm[1]), Path(f"{base}_desc-brain_mask.nii.gz"))
    gm = tpl_img.get_fdata() / tpl_img.get_fdata().max()
    nib.save(nib.Nifti1Image(gm.astype(np.float32), tpl_img.affine), Path(f"{base}_label-GM_probseg.nii.gz"))
    out = tmp_path / "prep"
    args = ["prep", "--from-derivatives", str(tmp_path / "deriv"), "--out", str(out),
            "--template", str(custom), "--template-mask", str(custom_mask), "--no-progress"]
    proc = _dfrn(*args)
    assert proc.returncode == 2 and not out.exists()
    assert "\n" not in proc.stderr.strip() and "--template-space NAME" in proc.stderr
    assert main([*args, "--template-space", "Colin27"]) == 0
    names = [p.name for p in out.rglob("*") if p.is_file()]
    assert "sub-c1_space-Colin27_res-4_desc-preproc_T1w.nii.gz" in names
    assert "sub-c1_space-Colin27_desc-qc_T1w.png" in names
    assert not [n for n in names if "MNI152" in n]
    assert json.loads((out / "prep.json").read_text())["identity"]["space"] == "Colin27"
    proc = _dfrn(*args, "--template-space", "Colin")
    assert proc.returncode == 2 and "other settings (space)" in proc.stderr


def test_a_changed_input_is_rerun_standalone_and_refused_in_a_resumed_study(template_4mm,
                                                                           tmp_path) -> None:
    """dfrn prep alone re-runs a subject whose input changed; inside a resumed study
    (changed_input="refuse") the same change is refused, naming the subject."""
    from dfrn.errors import ResultsFolderError
    from dfrn.workflows.prep import run_prep

    tpl2 = template_4mm
    tpl_img = nib.load(tpl2[0])
    deriv = tmp_path / "fmriprep"
    anat = deriv / "sub-c1" / "anat"
    anat.mkdir(parents=True)
    base = anat / "sub-c1_space-MNI152NLin6Asym_res-4"
    t1 = Path(f"{base}_desc-preproc_T1w.nii.gz")
    nib.save(tpl_img, t1)
    nib.save(nib.load(tpl2[1]), Path(f"{base}_desc-brain_mask.nii.gz"))
    gm = tpl_img.get_fdata() / tpl_img.get_fdata().max()
    nib.save(nib.Nifti1Image(gm.astype(np.float32), tpl_img.affine),
             Path(f"{base}_label-GM_probseg.nii.gz"))
    out = tmp_path / "prep"
    kw = {"derivatives": deriv, "template": tpl2[0], "template_mask": tpl2[1],
          "progress": False}
    run_prep(None, out, log=lambda m: None, **kw)
    name = out / "sub-c1" / "anat" / "sub-c1_space-MNI152NLin6Asym_res-4_desc-preproc_T1w.nii.gz"
    nib.save(nib.Nifti1Image(tpl_img.get_fdata() * 2, tpl_img.affine), t1)  # the scan changes
    with pytest.raises(ResultsFolderError, match="participant sub-c1: .*input changed"):
        run_prep(None, out, log=lambda m: None, changed_input="refuse", **kw)
    np.testing.assert_allclose(nib.load(name).get_fdata(), tpl_img.get_fdata(), rtol=1e-5)
    lines: list[str] = []
    run_prep(None, out, log=lines.append, **kw)
    assert any("input changed" in line for line in lines)
    np.testing.assert_allclose(nib.load(name).get_fdata(), tpl_img.get_fdata() * 2, rtol=1e-5)


def test_template_space_of_a_study_reaches_its_prep_stage(template_4mm, tmp_path) -> None:
    """[prep] template_space names the study's prep outputs; left empty, it does not enter the
    study's fingerprint (studies made before the key keep their identity)."""
    from dfrn.config import config_from_dict
    from dfrn.workflows.study import load_study_cohort, run_study_prep

    tpl_img = nib.load(template_4mm[0])
    custom = tmp_path / "colin.nii.gz"
    nib.save(tpl_img, custom)
    anat = tmp_path / "deriv" / "sub-c1" / "anat"
    anat.mkdir(parents=True)
    base = f"{anat}/sub-c1_space-Colin27_res-4"
    nib.save(tpl_img, f"{base}_desc-preproc_T1w.nii.gz")
    nib.save(nib.load(template_4mm[1]), f"{base}_desc-brain_mask.nii.gz")
    gm = (tpl_img.get_fdata() / tpl_img.get_fdata().max()).astype(np.float32)
    nib.save(nib.Nifti1Image(gm, tpl_img.affine), f"{base}_label-GM_probseg.nii.gz")
    scores = tmp_path / "scores.tsv"
    pd.DataFrame({"participant_id": ["sub-c1"], "score": [1.0]}).to_csv(scores, sep="\t", index=False)
    raw = {"cohort": {"table": str(scores), "targets": ["score"],
                      "derivatives": str(tmp_path / "deriv")},
           "prep": {"template": str(custom), "template_mask": str(template_4mm[1])}}
    plain = config_from_dict(raw, tmp_path)
    raw["prep"]["template_space"] = "Colin27"
    cfg = config_from_dict(raw, tmp_path)
    assert plain.fingerprint() != cfg.fingerprint()
    assert plain.fingerprint() == config_from_dict(
        {**raw, "prep": {**raw["prep"], "template_space": ""}}, tmp_path).fingerprint()
    run_study_prep(cfg, tmp_path / "results", progress=False, log=lambda m: None, resumed=False)
    cohort = load_study_cohort(cfg, tmp_path / "results")
    assert [Path(p).name for p in cohort.images] == ["sub-c1_space-Colin27_res-4_desc-preproc_T1w.nii.gz"]
