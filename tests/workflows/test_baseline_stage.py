"""The baseline stage's files: ROI features, predictions, metrics, permutation table, Figure 3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import roi_cohort

from dfrn.evaluation.folds import make_fold_plan
from dfrn.evaluation.metrics import compute_metrics
from dfrn.evaluation.permutation import PERMUTATION_COLUMNS, permutation_test
from dfrn.evaluation.ridge_cv import cross_validate_ridge
from dfrn.plotting import plot_fig3
from dfrn.workflows.baseline import (
    write_baseline_outputs,
    write_permutation_table,
    write_roi_features,
)
from dfrn.workflows.results import ResultsFolder


def test_baseline_tables_and_figure_are_written_where_the_folder_says(tmp_path: Path) -> None:
    ids, x, targets, _ = roi_cohort(n=30, p=6, seed=3)
    plan = make_fold_plan(ids, n_folds=5, n_repeats=2, seed=1)
    pred = cross_validate_ridge(x, targets, plan)
    metrics = compute_metrics(pred)
    folder = ResultsFolder(tmp_path)

    roi_path = write_roi_features(x, tmp_path)
    assert roi_path == folder.roi_features == tmp_path / "baseline" / "roi_features.tsv"
    back = pd.read_csv(roi_path, sep="\t", dtype={"participant_id": str},
                       float_precision="round_trip")
    assert back.columns[0] == "participant_id" and back.shape == (30, 7)
    np.testing.assert_array_equal(back.set_index("participant_id").to_numpy(), x.to_numpy())

    pred_path, metrics_path = write_baseline_outputs(pred, tmp_path)
    assert pred_path == folder.baseline_predictions == tmp_path / "baseline" / "predictions.tsv"
    assert metrics_path == folder.baseline_metrics
    assert len(pd.read_csv(pred_path, sep="\t")) == len(pred)
    assert list(pd.read_csv(metrics_path, sep="\t")["factor"].unique()) == ["strong", "noise"]
    # full precision: the numbers read back are the numbers computed
    np.testing.assert_array_equal(
        pd.read_csv(pred_path, sep="\t", float_precision="round_trip")["y_pred"], pred["y_pred"])

    perm = permutation_test(x, targets, plan, n_perm=9, seed=0, progress=False)
    path = write_permutation_table(perm, tmp_path)
    assert path == folder.baseline_permutation == tmp_path / "baseline" / "permutation.tsv"
    assert list(pd.read_csv(path, sep="\t").columns) == PERMUTATION_COLUMNS

    fig = plot_fig3(
        metrics,
        metrics.assign(pearson_r=metrics["pearson_r"] * 0.5),
        folder.figure("fig3_rr_vs_dfrn"),
    )
    assert fig == tmp_path / "figures" / "fig3_rr_vs_dfrn.png"
    assert fig.is_file() and fig.stat().st_size > 1000
    alone = plot_fig3(metrics, None, tmp_path / "figures" / "ridge_only.png")
    assert alone.is_file()
    assert not list((tmp_path / "figures").glob(".*tmp*"))  # written atomically


def _baseline_study(cohort_copy, tmp_path: Path, **cohort):
    from conftest import study_config

    from dfrn.data.synth import make_demo_atlases

    atlas = make_demo_atlases(cohort_copy, n_parcels=6)["parcellation"]
    labels = atlas.with_name("parcellation_dseg.tsv")
    cfg = study_config(cohort_copy, cohort=cohort,
                       baseline={"enabled": True, "atlas": str(atlas), "atlas_labels": str(labels),
                                 "n_permutations": 0})
    plan = make_fold_plan([f"sub-{i:04d}" for i in range(1, 13)], n_folds=2, n_repeats=1, seed=1)
    return cfg, plan, atlas


def test_roi_features_are_named_after_their_column(cohort_copy, tmp_path: Path) -> None:
    from dfrn.workflows.baseline import run_baseline_stage

    table = pd.read_csv(cohort_copy.table, sep="\t")
    table["lesion"] = table["gm"]
    table.to_csv(cohort_copy.table, sep="\t", index=False)
    cfg, plan, _ = _baseline_study(cohort_copy, tmp_path, gm_column="lesion")
    logs: list[str] = []
    run_baseline_stage(tmp_path / "out", cfg, plan=plan, progress=False, log=logs.append)
    line = next(x for x in logs if x.startswith("ROI features"))
    assert "sum of 'lesion'" in line and "gray-matter" not in line, line


def test_an_atlas_off_the_images_grid_names_the_atlas_and_its_key(cohort_copy, tmp_path) -> None:
    import nibabel as nib

    from dfrn.errors import DfrnInputError
    from dfrn.workflows.baseline import run_baseline_stage

    cfg, plan, atlas = _baseline_study(cohort_copy, tmp_path)
    img = nib.load(atlas)
    affine = img.affine.copy()
    affine[:3, 3] += 8.0  # one voxel off: another space, not another resolution
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), atlas)
    with pytest.raises(DfrnInputError, match=rf"^atlas {atlas} is not on the grid of the images"
                       r".*fix \[baseline\] atlas"):
        run_baseline_stage(tmp_path / "out", cfg, plan=plan, progress=False, log=lambda s: None)


def test_combat_and_site_reach_the_ridge_stage(cohort_copy, tmp_path) -> None:
    """[cohort] site + [baseline] harmonize = "combat": ComBat inside each fold changes the
    ridge's predictions; a plan that leaves a site out of a training fold is refused by name."""
    from dfrn.errors import DfrnInputError
    from dfrn.workflows.baseline import run_baseline_stage

    table = pd.read_csv(cohort_copy.table, sep="\t")
    table["scanner"] = ["S0", "S1"] * 6
    table.to_csv(cohort_copy.table, sep="\t", index=False)
    quiet = {"progress": False, "log": lambda s: None}
    cfg, plan, _ = _baseline_study(cohort_copy, tmp_path, covariates=["age"], site="scanner")
    plain = run_baseline_stage(tmp_path / "a", cfg, plan=plan, **quiet)["predictions"]
    cfg, plan, _ = _baseline_study(cohort_copy, tmp_path, covariates=["age"], site="scanner")
    cfg.baseline.harmonize = "combat"
    harmonised = run_baseline_stage(tmp_path / "b", cfg, plan=plan, **quiet)["predictions"]
    assert len(harmonised) == len(plain)
    assert not np.allclose(harmonised["y_pred"], plain["y_pred"])
    by_site = make_fold_plan(table["participant_id"].tolist(), n_folds=2, n_repeats=1,
                             groups=table["scanner"].tolist())
    with pytest.raises(DfrnInputError, match=r"repeat 0 fold \d: site 'S\d' of 6 test subject"):
        run_baseline_stage(tmp_path / "c", cfg, plan=by_site, **quiet)


def test_a_model_missing_from_a_finished_folder_is_added_without_redoing_the_other(
        cohort_copy, tmp_path: Path) -> None:
    """[baseline] models grows from the ROI ridge to both: the voxel ridge's tables are
    added (predictions, metrics, permutation test on the network's folds); the ROI
    ridge's files are read back, not rewritten."""
    from dfrn.workflows.baseline import run_baseline_stage

    cfg, plan, _ = _baseline_study(cohort_copy, tmp_path)
    cfg.baseline.n_permutations, cfg.baseline.models = 19, ["roi_ridge"]
    out, base = tmp_path / "out", tmp_path / "out" / "baseline"
    first = run_baseline_stage(out, cfg, plan=plan, progress=False, log=lambda s: None)
    assert not list(base.glob("voxel_ridge_*"))
    roi_files = ("predictions.tsv", "metrics.tsv", "permutation.tsv")
    written = {name: (base / name).stat().st_mtime_ns for name in roi_files}

    cfg.baseline.models = ["roi_ridge", "voxel_ridge"]
    logs: list[str] = []
    second = run_baseline_stage(out, cfg, plan=plan, progress=False, log=logs.append)
    assert {name: (base / name).stat().st_mtime_ns for name in roi_files} == written
    assert "Ridge baseline (ROI volumes): read back from baseline/predictions.tsv" in logs
    pd.testing.assert_frame_equal(second["predictions"], first["predictions"], atol=1e-12)
    key = ["participant_id", "repeat", "fold", "factor"]
    voxel = pd.read_csv(base / "voxel_ridge_predictions.tsv", sep="\t")
    roi = pd.read_csv(base / "predictions.tsv", sep="\t")
    assert voxel[key].values.tolist() == roi[key].values.tolist()  # same folds and subjects
    np.testing.assert_allclose(voxel["y_true"], roi["y_true"], atol=1e-12)
    assert not np.allclose(voxel["y_pred"], roi["y_pred"])  # another model
    assert list(pd.read_csv(base / "voxel_ridge_metrics.tsv", sep="\t")["factor"].unique()) == [
        "anhedonia", "sleep"]
    perm = pd.read_csv(base / "voxel_ridge_permutation.tsv", sep="\t")
    assert list(perm.columns) == PERMUTATION_COLUMNS and set(perm["n_perm"]) == {19}
    k = perm["p_permutation"].to_numpy() * 20
    np.testing.assert_allclose(k, np.round(k), atol=1e-9)
    pd.testing.assert_frame_equal(second["voxel_ridge_permutation"], perm, atol=1e-12)
    assert list(second["summary"].columns) == ["ridge_r", "voxel_ridge_r"]
    assert any(line.startswith("Voxel ridge (network inputs): permutation test (19 perm")
               for line in logs)
    assert (out / "figures" / "fig3_rr_vs_dfrn.png").is_file()


def test_figure3_legend_covers_no_bar_and_stays_inside_the_figure(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Issue 26.13: the legend was drawn over the bars. With the four bars of a study with
    covariates (one factor, or five with rotated names), every bar's box is clear of the
    legend's, and the legend lies inside the saved figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    figures: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda self, *a, **k: (figures.append(self), save(self, *a, **k))[1])

    def metrics(factors: list[str], r: float) -> pd.DataFrame:
        rows = [{"repeat": rep, "factor": f, "n": 40, "pearson_r": r + 0.02 * rep,
                 "p_value": 1e-3} for rep in range(2) for f in factors]
        return pd.DataFrame(rows)

    for factors in (["anhedonia"], ["anhedonia", "appetite", "sleep", "suicidality", "anxiety"]):
        path = plot_fig3(metrics(factors, 0.85), metrics(factors, 0.9),
                         tmp_path / f"fig3_{len(factors)}.png", metrics(factors, 0.8),
                         "Covariates only (age, sex and site)", " (residualised target)",
                         voxel_ridge_metrics=metrics(factors, 0.88))
        fig = figures[-1]
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        assert len(legends) == 1
        box = legends[0].get_window_extent(renderer)
        bars = [p.get_window_extent(renderer) for p in fig.axes[0].patches]
        assert len(bars) == 4 * len(factors)
        assert not [b for b in bars if box.overlaps(b)], (box, bars)
        inside = fig.bbox
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1, (box, inside)
        assert inside.y0 <= box.y0 and box.y1 <= inside.y1, (box, inside)
        texts = [t.get_text().replace("\n", " ") for t in legends[0].get_texts()]
        assert texts == ["Covariates only (age, sex and site)",
                         "Ridge regression (ROI volumes) (residualised target)",
                         "Ridge regression (network input voxels) (residualised target)",
                         "DFRN (residualised target)"]
        with Image.open(path) as png:  # the saved figure is this one, uncropped
            assert png.size == tuple(round(v * 150) for v in fig.get_size_inches())


def test_covariates_do_not_change_the_roi_ridge_raw_r(cohort_copy, tmp_path: Path) -> None:
    """Like for like: the network sees raw images, so the ROI ridge sees raw ROI features.
    With covariates and raw targets its predictions equal those without covariates. A folder
    whose ROI ridge an older dfrn adjusted for covariates (no features note) is redone."""
    from dfrn.workflows.baseline import run_baseline_stage

    quiet = {"progress": False, "log": lambda s: None}
    cfg, plan, _ = _baseline_study(cohort_copy, tmp_path)
    cfg.baseline.models = ["roi_ridge"]
    plain = run_baseline_stage(tmp_path / "a", cfg, plan=plan, **quiet)
    cfg, plan, _ = _baseline_study(cohort_copy, tmp_path, covariates=["age"])
    cfg.baseline.models = ["roi_ridge"]
    out = tmp_path / "b"
    adjusted = run_baseline_stage(out, cfg, plan=plan, **quiet)
    np.testing.assert_allclose(adjusted["predictions"]["y_pred"], plain["predictions"]["y_pred"],
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(adjusted["metrics"]["pearson_r"], plain["metrics"]["pearson_r"],
                               rtol=0, atol=1e-9)
    assert {"ci_low", "ci_high"} <= set(pd.read_csv(out / "baseline/metrics.tsv", sep="\t"))
    note = out / "baseline/roi_ridge_features.json"
    assert note.is_file()
    logs: list[str] = []
    run_baseline_stage(out, cfg, plan=plan, progress=False, log=logs.append)
    assert not any("older dfrn" in line for line in logs)  # read back
    note.unlink()  # as an older dfrn left it
    written = (out / "baseline/predictions.tsv").stat().st_mtime_ns
    run_baseline_stage(out, cfg, plan=plan, progress=False, log=logs.append)
    assert any(line.startswith("ROI ridge: redone: its tables were made by an older dfrn")
               for line in logs)
    assert (out / "baseline/predictions.tsv").stat().st_mtime_ns != written and note.is_file()
