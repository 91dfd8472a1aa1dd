"""Model packages and ``dfrn predict``: round trip, new subjects, and one-line refusals."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import NARROW, study_config

from dfrn.cli import main
from dfrn.config import config_from_dict
from dfrn.data.synth import make_synthetic_cohort
from dfrn.errors import DfrnInputError
from dfrn.evaluation.tasks import plan_tasks
from dfrn.io import file_digest, write_manifest
from dfrn.models.package import SCHEMA_VERSION, load_package
from dfrn.models.regressor import DFRNRegressor
from dfrn.workflows.predict import predict_cohort
from dfrn.workflows.run import run_study


@pytest.fixture(scope="module")
def study(tiny_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "res"
    cfg = study_config(tiny_cohort, final={"enabled": True})
    old = os.umask(0o022)  # the packages are written under a known umask
    try:
        res = run_study(cfg, out, progress=False, log=lambda s: None)
    finally:
        os.umask(old)
    return out, res


def test_packages_describe_themselves(study) -> None:
    out, res = study
    for factor in ("anhedonia", "sleep"):
        folder = out / "models" / factor
        meta = json.loads((folder / "metadata.json").read_text())
        assert meta["mode"] == "ensemble" and len(meta["models"]) == 2  # first repeat's folds
        assert meta["input"]["shape"] == list(res.study.volumes.input_grid.shape)
        assert meta["input"]["intensity"] == "zscore" and meta["input"]["mask"] is not None
        assert "values" not in meta["input"]  # recorded for binary maps read as they are only
        assert len(meta["training_scans_sha256"]) == 12
        r = res.metrics.set_index("factor").at[factor, "pearson_r"]
        assert meta["performance"]["mean_r"] == pytest.approx(r)
        assert "Intended use" in (folder / "README.md").read_text()
        assert sorted(p.name for p in folder.iterdir()) == [
            "README.md", "brain_mask.nii.gz", "manifest.json", "metadata.json",
            "model-0.safetensors", "model-1.safetensors", "ood.safetensors"]
        assert len(meta["training_scans_content_sha256"]) == 12


def test_package_files_follow_the_umask(study) -> None:
    out, _ = study
    modes = {p.name: p.stat().st_mode & 0o777 for p in (out / "models" / "sleep").iterdir()}
    assert modes == dict.fromkeys(modes, 0o644)  # the weights too, not mkstemp's 0600


def test_round_trip_equals_the_cv_models(study, tiny_cohort, tmp_path: Path, capsys) -> None:
    out, res = study
    pred_dir = tmp_path / "p"
    assert main(["predict", str(out), "--cohort", str(tiny_cohort.table), "--out", str(pred_dir),
                 "--allow-training-subjects", "--no-progress"]) == 0
    pred = pd.read_csv(pred_dir / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    assert list(pred.columns) == ["participant_id", "factor", "prediction", "ensemble_sd",
                                  "n_models", "adjusted_for", "prediction_full", "lower",
                                  "upper", "ood_score", "ood", "ood_reason"]
    # an unadjusted package: the full prediction is the prediction, adjusted for nothing
    np.testing.assert_array_equal(pred["prediction_full"], pred["prediction"])
    assert pred["adjusted_for"].isna().all()
    volumes = res.study.volumes
    for factor in ("anhedonia", "sleep"):
        models = [DFRNRegressor.load(out / "cv/tasks" / t.name / "model.pt")
                  for t in plan_tasks(res.plan, [factor])]
        expected = np.stack([m.predict(volumes) for m in models])
        got = pred[pred.factor == factor].set_index("participant_id").loc[volumes.participant_ids]
        np.testing.assert_allclose(got["prediction"], expected.mean(axis=0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["ensemble_sd"], expected.std(axis=0, ddof=1), atol=1e-6)
        assert (got["n_models"] == 2).all()


def test_new_subjects_get_predictions(study, tmp_path: Path) -> None:
    out, _ = study
    new = make_synthetic_cohort(tmp_path / "new", n_subjects=4, voxel_size=8.0, effect=0.4,
                                radius=14.0, seed=99)
    table = pd.read_csv(new.table, sep="\t")[["participant_id", "t1"]]
    table["participant_id"] = [f"new-{i}" for i in range(4)]
    table.to_csv(new.root / "new.tsv", sep="\t", index=False)
    pred_dir = tmp_path / "p"
    assert main(["predict", str(out / "models" / "sleep"), "--cohort", str(new.root / "new.tsv"),
                 "--out", str(pred_dir), "--attention", "--no-progress"]) == 0
    pred = pd.read_csv(pred_dir / "predictions.tsv", sep="\t")
    assert sorted(pred["participant_id"]) == [f"new-{i}" for i in range(4)]
    assert np.isfinite(pred["prediction"]).all() and (pred["factor"] == "sleep").all()
    fam = nib.load(pred_dir / "attention" / "new-0_sleep_fam.nii.gz")
    np.testing.assert_allclose(fam.affine, nib.load(new.root / table["t1"][0]).affine)


def test_old_package_predicts_with_empty_columns_and_one_note(study, tiny_cohort,
                                                              tmp_path: Path) -> None:
    """A package of schema 2 (no residuals, no OOD statistics) still predicts."""
    out, _ = study
    pkg = tmp_path / "pkg"
    shutil.copytree(out / "models" / "sleep", pkg)
    meta = json.loads((pkg / "metadata.json").read_text())
    del meta["conformal"], meta["ood"]
    meta["schema_version"] = 2
    (pkg / "metadata.json").write_text(json.dumps(meta))
    (pkg / "ood.safetensors").unlink()
    write_manifest(pkg)
    lines: list[str] = []
    pred = predict_cohort(pkg, tiny_cohort.table, tmp_path / "p", allow_training_subjects=True,
                          progress=False, log=lines.append)
    assert np.isfinite(pred["prediction"]).all()
    assert pred[["lower", "upper", "ood_score"]].isna().all().all()
    assert pred["ood"].isna().all() and pred["ood_reason"].isna().all()
    notes = [line for line in lines if "no intervals/OOD check" in line]
    assert len(notes) == 1
    assert notes[0].startswith("model sleep: no intervals/OOD check: package made by dfrn < 0.2.0")
    written = pd.read_csv(tmp_path / "p" / "predictions.tsv", sep="\t")
    assert written[["lower", "upper", "ood", "ood_reason"]].isna().all().all()


@pytest.mark.parametrize("coverage", ["0", "1.5"])
def test_coverage_outside_zero_one_is_one_line(study, tiny_cohort, tmp_path: Path, capsys,
                                               coverage: str) -> None:
    out, _ = study
    assert main(["predict", str(out), "--cohort", str(tiny_cohort.table), "--out",
                 str(tmp_path / "p"), "--coverage", coverage, "--no-progress"]) == 2
    assert "--coverage must be between 0 and 1" in _one_line_error(capsys)


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dfrn: error")]
    assert len(err) == 1
    return err[0]


def test_training_scans_are_refused(study, tiny_cohort, tmp_path: Path, capsys) -> None:
    out, _ = study
    assert main(["predict", str(out), "--cohort", str(tiny_cohort.table), "--out",
                 str(tmp_path / "p"), "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert "12 scan(s) were used to train model" in line and "--allow-training-subjects" in line


def test_off_grid_scan_is_refused(study, tmp_path: Path, capsys) -> None:
    out, _ = study
    img = nib.Nifti1Image(np.ones((10, 10, 10), np.float32), np.diag([8.0, 8.0, 8.0, 1.0]))
    nib.save(img, tmp_path / "odd.nii.gz")
    pd.DataFrame({"participant_id": ["odd"], "t1": ["odd.nii.gz"]}).to_csv(
        tmp_path / "c.tsv", sep="\t", index=False)
    assert main(["predict", str(out), "--cohort", str(tmp_path / "c.tsv"), "--out",
                 str(tmp_path / "p"), "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert "participant odd" in line and "not on the grid" in line and "dfrn prep" in line


@pytest.mark.parametrize("tamper", ["schema", "weights", "newer"])
def test_tampered_package_is_refused(study, tmp_path: Path, capsys, tamper: str) -> None:
    """Also with a manifest rewritten to match: the schema and version checks stand alone."""
    out, _ = study
    pkg = tmp_path / "pkg"
    shutil.copytree(out / "models" / "sleep", pkg)
    meta = json.loads((pkg / "metadata.json").read_text())
    if tamper == "schema":
        meta["network"]["block_strides"] = [1, 2, "two", 2]
    elif tamper == "newer":
        meta["dfrn_version"] = "99.0.0"
    else:
        data = bytearray((pkg / "model-1.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (pkg / "model-1.safetensors").write_bytes(bytes(data))
    (pkg / "metadata.json").write_text(json.dumps(meta))
    write_manifest(pkg)  # a consistent manifest: the checks behind it still hold
    if tamper != "weights":
        write_manifest(pkg)
    with pytest.raises(Exception) as info:
        load_package(pkg)
    text = str(info.value)
    assert "\n" not in text
    expected = {"schema": "fails validation at network/block_strides/2",
                "weights": "SHA-256 differs", "newer": "newer than this dfrn"}[tamper]
    assert expected in text


def test_refit_mode_trains_one_network_for_the_folds_epochs(tiny_cohort, tmp_path: Path) -> None:
    cfg = study_config(tiny_cohort, final={"enabled": True, "mode": "refit"},
                       cohort={"targets": ["sleep"]}, training={"epochs": 2})
    out = tmp_path / "res"
    run_study(cfg, out, progress=False, log=lambda s: None)
    package = load_package(out / "models" / "sleep")
    assert package.metadata["mode"] == "refit" and len(package.estimators) == 1
    assert package.metadata["models"][0]["epochs"] == 2  # median of the folds' best epochs + 1
    table = pd.read_csv(tiny_cohort.table, sep="\t")
    y = table["sleep"]
    assert package.estimators[0].y_mean_ == pytest.approx(y.mean())
    pred_dir = tmp_path / "p"
    assert main(["predict", str(out), "--cohort", str(tiny_cohort.table), "--out",
                 str(pred_dir), "--allow-training-subjects", "--no-progress"]) == 0
    pred = pd.read_csv(pred_dir / "predictions.tsv", sep="\t")
    # one network: its spread is undefined, not 0
    assert (pred["n_models"] == 1).all() and pred["ensemble_sd"].isna().all()


def _cohort_of(tmp_path: Path, scans: dict[str, Path]) -> Path:
    path = tmp_path / "scans.tsv"
    pd.DataFrame({"participant_id": list(scans), "t1": [str(p) for p in scans.values()]}).to_csv(
        path, sep="\t", index=False)
    return path


def _first_scan(tiny_cohort) -> Path:
    table = pd.read_csv(tiny_cohort.table, sep="\t", dtype={"participant_id": str})
    return tiny_cohort.root / table["t1"][0]


def _resave(src: Path, tmp_path: Path, how: str) -> Path:
    """The same scan written again: as .nii, re-gzipped, or reoriented to LPI and back."""
    img = nib.load(src)
    if how == "nii":
        dst = tmp_path / "again.nii"
        nib.save(img, dst)
    elif how == "regzip":
        dst = tmp_path / "again.nii.gz"
        dst.write_bytes(gzip.compress(gzip.decompress(src.read_bytes()), compresslevel=1,
                                      mtime=123456))
    else:
        orig = nib.orientations.io_orientation(img.affine)
        lpi = nib.orientations.axcodes2ornt(("L", "P", "I"))
        flipped = img.as_reoriented(nib.orientations.ornt_transform(orig, lpi))
        nib.save(flipped, tmp_path / "lpi.nii.gz")
        back = nib.load(tmp_path / "lpi.nii.gz")
        dst = tmp_path / "again.nii.gz"
        again = back.as_reoriented(nib.orientations.ornt_transform(lpi, orig))
        again.header["descrip"] = b"reoriented to LPI and back"  # as a tool leaves its mark
        nib.save(again, dst)
    return dst


@pytest.mark.parametrize("how", ["nii", "regzip", "reorient"])
def test_resaved_training_scan_is_refused(study, tiny_cohort, tmp_path: Path, capsys,
                                          how: str) -> None:
    out, _ = study
    src = _first_scan(tiny_cohort)
    dst = _resave(src, tmp_path, how)
    assert file_digest(dst) != file_digest(src)  # other bytes, same scan
    cohort = _cohort_of(tmp_path, {"again": dst})
    assert main(["predict", str(out), "--cohort", str(cohort), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert "1 scan(s) were used to train model" in line and "participant again" in line


def _edit(pkg: Path, edit: str) -> str:
    """Edit a copied package; return the file name the refusal must name."""
    if edit == "y_mean":  # within the schema: every prediction would move by 10
        meta = json.loads((pkg / "metadata.json").read_text())
        for model in meta["models"]:
            model["y_mean"] += 10
        (pkg / "metadata.json").write_text(json.dumps(meta, indent=2))
        return "metadata.json"
    if edit == "readme":
        with open(pkg / "README.md", "a") as fh:
            fh.write("edited\n")
        return "README.md"
    if edit == "added":
        (pkg / "notes.txt").write_text("mine\n")
        return "notes.txt"
    if edit == "removed":
        (pkg / "model-1.safetensors").unlink()
        return "model-1.safetensors"
    (pkg / "manifest.json").unlink()
    return "manifest.json"


@pytest.mark.parametrize("edit", ["y_mean", "readme", "added", "removed", "no_manifest"])
def test_edited_package_is_refused_naming_the_file(study, tiny_cohort, tmp_path: Path, capsys,
                                                   edit: str) -> None:
    out, _ = study
    pkg = tmp_path / "pkg"
    shutil.copytree(out / "models" / "sleep", pkg)
    name = _edit(pkg, edit)
    assert main(["predict", str(pkg), "--cohort", str(tiny_cohort.table), "--out",
                 str(tmp_path / "p"), "--allow-training-subjects", "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert name in line and str(pkg) in line
    assert not (tmp_path / "p" / "predictions.tsv").exists()


def _make_old(pkg: Path) -> None:
    """Turn a package into one written before manifests and content digests (schema 1)."""
    meta = json.loads((pkg / "metadata.json").read_text())
    meta["schema_version"] = 1
    meta.pop("training_scans_content_sha256", None)
    (pkg / "metadata.json").write_text(json.dumps(meta, indent=2))
    (pkg / "manifest.json").unlink(missing_ok=True)


def test_old_package_is_refused_with_a_rebuild_hint(study, tmp_path: Path) -> None:
    out, _ = study
    pkg = tmp_path / "pkg"
    shutil.copytree(out / "models" / "sleep", pkg)
    _make_old(pkg)
    with pytest.raises(DfrnInputError) as info:
        load_package(pkg)
    text = str(info.value)
    assert "\n" not in text and str(pkg) in text and "schema 1" in text and "dfrn run" in text


def test_rerun_rebuilds_packages_with_the_umask(study, tiny_cohort, tmp_path: Path) -> None:
    """A re-run rebuilds a missing and an old package; every file follows the umask."""
    out, _ = study
    copy = tmp_path / "res"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "models" / "sleep")
    _make_old(copy / "models" / "anhedonia")
    old = os.umask(0o022)
    try:
        run_study(study_config(tiny_cohort, final={"enabled": True}), copy, progress=False,
                  log=lambda s: None)
    finally:
        os.umask(old)
    for factor in ("sleep", "anhedonia"):
        folder = copy / "models" / factor
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
        assert set(modes.values()) == {"0o644"}, modes
        assert load_package(folder).metadata["schema_version"] == SCHEMA_VERSION == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_error_names_the_predict_option(study, tiny_cohort, tmp_path: Path,
                                               capsys) -> None:
    out, _ = study
    assert main(["predict", str(out), "--cohort", str(tiny_cohort.table), "--out",
                 str(tmp_path / "p"), "--device", "cuda", "--allow-training-subjects",
                 "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert "--device 'cuda'" in line and "CUDA is not available" in line
    assert "config" not in line and "[training]" not in line


def test_all_zero_scan_is_named_with_its_file(study, tiny_cohort, tmp_path: Path,
                                              capsys) -> None:
    out, _ = study
    ref = nib.load(_first_scan(tiny_cohort))
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.float32), ref.affine), blank)
    new = make_synthetic_cohort(tmp_path / "new", n_subjects=2, voxel_size=8.0, effect=0.4,
                                radius=14.0, seed=98)
    table = pd.read_csv(new.table, sep="\t")
    scans = {"new-0": new.root / table["t1"][0], "blank": blank}
    assert main(["predict", str(out), "--cohort", str(_cohort_of(tmp_path, scans)), "--out",
                 str(tmp_path / "p"), "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert "participant blank" in line and str(blank) in line and "all zero" in line
    assert "[cohort]" not in line and "new-0" not in line


def test_regions_need_a_package_with_an_atlas(study, tiny_cohort, tmp_path: Path, capsys) -> None:
    out, _ = study  # its study ran without an attention atlas
    assert main(["predict", str(out), "--cohort", str(tiny_cohort.table), "--out",
                 str(tmp_path / "p"), "--allow-training-subjects", "--regions",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no region atlas" in err[0], err
    assert not (tmp_path / "p").exists()


def test_a_binary_package_refuses_non_binary_and_nan_maps(study, tiny_cohort, tmp_path: Path,
                                                          capsys) -> None:
    """Issue 26.9: a package that reads binary maps as they are (intensity "none", training
    values 0 and 1) takes an empty map, but names a non-binary map and an all-NaN map."""
    out, _ = study
    pkg = tmp_path / "pkg"
    shutil.copytree(out / "models" / "sleep", pkg)
    meta = json.loads((pkg / "metadata.json").read_text())
    meta["input"].update(intensity="none", values=[0.0, 1.0])
    (pkg / "metadata.json").write_text(json.dumps(meta, indent=2))
    write_manifest(pkg)
    ref = nib.load(_first_scan(tiny_cohort))
    mask = np.asarray(nib.load(tiny_cohort.brain_mask).dataobj) > 0
    rng = np.random.default_rng(0)
    maps = {"lesion": (rng.random(ref.shape) > 0.8) & mask, "empty": np.zeros(ref.shape),
            "prob": rng.random(ref.shape) * mask, "nan": np.full(ref.shape, np.nan)}
    scans = {}
    for name, data in maps.items():
        scans[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), ref.affine), scans[name])
    lines = {}
    for names, bad in ((["lesion", "empty", "prob"], "prob"), (["lesion", "nan"], "nan")):
        cohort = _cohort_of(tmp_path, {n: scans[n] for n in names})
        assert main(["predict", str(pkg), "--cohort", str(cohort), "--out",
                     str(tmp_path / "p"), "--no-progress"]) == 2
        lines[bad] = line = _one_line_error(capsys)
        assert f"participant {bad} ({scans[bad]}" in line or f"participant {bad}: {scans[bad]}" \
            in line, line
        assert "[cohort]" not in line and "participant lesion" not in line, line
        assert "participant empty" not in line
    assert "1 scan(s) are not binary maps inside the brain mask of model sleep" in lines["prob"]
    assert "binary maps (0 and 1)" in lines["prob"]
    assert "NaN or inf voxels inside the brain mask" in lines["nan"]
    cohort = _cohort_of(tmp_path, {n: scans[n] for n in ("lesion", "empty")})
    assert main(["predict", str(pkg), "--cohort", str(cohort), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 0
    pred = pd.read_csv(tmp_path / "p" / "predictions.tsv", sep="\t")
    assert sorted(pred["participant_id"]) == ["empty", "lesion"]
    assert np.isfinite(pred["prediction"]).all()


LESION_AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
LESION_SIZE = 12


def _lesion_cohort(root: Path, n: int = 8, size: int = LESION_SIZE) -> Path:
    """Binary lesion maps in a spherical brain mask, 4 mm voxels; sub-00's scan has NaN
    outside the mask (harmless to training, and so to packaging)."""
    rng = np.random.default_rng(5)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    mid = (size - 1) / 2
    brain = ((zz - mid) ** 2 + (yy - mid) ** 2 + (xx - mid) ** 2) < mid**2
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), LESION_AFFINE), root / "mask.nii.gz")
    rows = []
    for i in range(n):
        c, radius = rng.uniform(mid - 2, mid + 2, size=3), rng.uniform(1.0, 3.0)
        lesion = (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < radius**2) & brain
        data = lesion.astype(np.float32)
        if i == 0:
            data[0, 0, :3] = np.nan
        nib.save(nib.Nifti1Image(data, LESION_AFFINE), root / f"sub-{i:02d}.nii.gz")
        rows.append({"participant_id": f"sub-{i:02d}", "t1": f"sub-{i:02d}.nii.gz",
                     "load": float(lesion.sum()) / 100 + 0.1 * rng.standard_normal()})
    pd.DataFrame(rows).to_csv(root / "cohort.tsv", sep="\t", index=False)
    return root



@pytest.fixture(scope="module")
def lesion_study(tmp_path_factory) -> Path:
    """A finished tiny lesion study (intensity "none", 8 subjects, 12³) with its package."""
    root = _lesion_cohort(tmp_path_factory.mktemp("lesions"))
    raw = {"cohort": {"table": str(root / "cohort.tsv"), "targets": ["load"],
                      "mask": str(root / "mask.nii.gz"), "intensity": "none"},
           "model": {"widen_factor": NARROW},
           "training": {"epochs": 1, "val_fraction": 0.0},
           "cv": {"n_folds": 2, "n_repeats": 1, "seed": 1},
           "baseline": {"enabled": False}, "attention": {"enabled": False},
           "final": {"enabled": True}}
    run_study(config_from_dict(raw, root), root / "res", progress=False, log=lambda s: None)
    return root


def test_a_lesion_run_records_its_binary_values(lesion_study: Path) -> None:
    """Issue 26.9: the package of an intensity-none study on 0/1 maps records the values
    that predict checks new scans against (a training scan's NaN outside the mask is 0)."""
    package = load_package(lesion_study / "res" / "models" / "load")
    assert package.metadata["input"]["intensity"] == "none"
    assert package.metadata["input"]["values"] == [0.0, 1.0]
    assert "binary maps with the values 0 and 1" in (package.folder / "README.md").read_text()


def test_a_lesion_package_takes_an_empty_map_and_refuses_a_half(lesion_study: Path,
                                                                tmp_path: Path, capsys) -> None:
    """Issue 26.9: one empty map alone is predicted; a 0.5 inside the mask is named in one
    line; a training scan with NaN outside the mask is still known by its content."""
    model = lesion_study / "res" / "models" / "load"
    empty = np.zeros((LESION_SIZE,) * 3, np.float32)
    scans = {"empty": tmp_path / "empty.nii.gz", "half": tmp_path / "half.nii.gz"}
    nib.save(nib.Nifti1Image(empty, LESION_AFFINE), scans["empty"])
    empty[6, 6, 6] = 0.5  # the centre of the brain mask
    nib.save(nib.Nifti1Image(empty, LESION_AFFINE), scans["half"])
    assert main(["predict", str(model), "--cohort",
                 str(_cohort_of(tmp_path, {"empty": scans["empty"]})), "--out",
                 str(tmp_path / "p"), "--no-progress"]) == 0
    pred = pd.read_csv(tmp_path / "p" / "predictions.tsv", sep="\t")
    assert list(pred["participant_id"]) == ["empty"] and np.isfinite(pred["prediction"]).all()
    capsys.readouterr()
    for name, scan, expected in (
            ("half", scans["half"], f"participant half ({scans['half']}: 1 voxel(s) such as 0.5)"),
            ("sub-00", lesion_study / "sub-00.nii.gz", "were used to train model load")):
        assert main(["predict", str(model), "--cohort", str(_cohort_of(tmp_path, {name: scan})),
                     "--out", str(tmp_path / name), "--no-progress"]) == 2
        line = _one_line_error(capsys)
        assert expected in line and name in line, line


def test_nan_for_a_maskless_package_says_what_the_predict_user_can_do(
        study, tiny_cohort, tmp_path: Path, capsys) -> None:
    """Issue 26.9: the package's mask is not the user's to set: no "[cohort] mask" hint."""
    out, _ = study
    pkg = tmp_path / "pkg"
    shutil.copytree(out / "models" / "sleep", pkg)
    meta = json.loads((pkg / "metadata.json").read_text())
    meta["input"]["mask"] = None
    (pkg / "metadata.json").write_text(json.dumps(meta, indent=2))
    (pkg / "brain_mask.nii.gz").unlink()
    write_manifest(pkg)
    ref = nib.load(_first_scan(tiny_cohort))
    data = np.asarray(ref.dataobj, dtype=np.float32).copy()
    data[0, 0, 0] = np.nan
    scan = tmp_path / "holes.nii.gz"
    nib.save(nib.Nifti1Image(data, ref.affine), scan)
    assert main(["predict", str(pkg), "--cohort", str(_cohort_of(tmp_path, {"holes": scan})),
                 "--out", str(tmp_path / "p"), "--no-progress"]) == 2
    line = _one_line_error(capsys)
    assert f"participant holes: {scan} has 1 NaN or inf voxels" in line, line
    assert "model sleep was trained without a brain mask" in line and "[cohort]" not in line
