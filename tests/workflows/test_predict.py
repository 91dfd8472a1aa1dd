"""Model packages and ``dfrn predict``: round trip, new subjects, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import study_config

from dfrn.cli import main
from dfrn.data.synth import make_synthetic_cohort
from dfrn.evaluation.tasks import plan_tasks
from dfrn.models.package import load_package
from dfrn.models.regressor import DFRNRegressor
from dfrn.workflows.run import run_study


@pytest.fixture(scope="module")
def study(tiny_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "res"
    cfg = study_config(tiny_cohort, final={"enabled": True})
    res = run_study(cfg, out, progress=False, log=lambda s: None)
    return out, res


def test_packages_describe_themselves(study) -> None:
    out, res = study
    for factor in ("anhedonia", "sleep"):
        folder = out / "models" / factor
        meta = json.loads((folder / "metadata.json").read_text())
        assert meta["mode"] == "ensemble" and len(meta["models"]) == 2  # first repeat's folds
        assert meta["input"]["shape"] == list(res.extra["volumes"].input_grid.shape)
        assert meta["input"]["intensity"] == "zscore" and meta["input"]["mask"] is not None
        assert len(meta["training_scans_sha256"]) == 12
        r = res.metrics.set_index("factor").at[factor, "pearson_r"]
        assert meta["performance"]["mean_r"] == pytest.approx(r)
        assert "Intended use" in (folder / "README.md").read_text()
        assert sorted(p.name for p in folder.iterdir()) == [
            "README.md", "brain_mask.nii.gz", "metadata.json", "model-0.safetensors",
            "model-1.safetensors"]


def test_round_trip_equals_the_cv_models(study, tiny_cohort, tmp_path: Path, capsys) -> None:
    out, res = study
    pred_dir = tmp_path / "p"
    assert main(["predict", str(out), "--cohort", str(tiny_cohort.table), "--out", str(pred_dir),
                 "--allow-training-subjects", "--no-progress"]) == 0
    pred = pd.read_csv(pred_dir / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    assert list(pred.columns) == ["participant_id", "factor", "prediction", "ensemble_sd",
                                  "n_models"]
    volumes = res.extra["volumes"]
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
    import shutil

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
    assert (pred["n_models"] == 1).all() and (pred["ensemble_sd"] == 0).all()
