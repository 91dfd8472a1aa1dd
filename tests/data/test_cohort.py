"""Cohort and image validation: every bad input gets a one-line error naming the culprit."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dfrn.cli import main
from dfrn.data.cohort import load_bids_cohort, load_cohort_table
from dfrn.data.images import (
    VolumeCache,
    block_downsample,
    check_common_grid,
    downsampled_affine,
    load_volume,
)
from dfrn.errors import DfrnInputError

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _img(path: Path, data: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> Path:
    if data is None:
        rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
        data = rng.uniform(1, 2, (8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _cohort(tmp: Path, n: int = 4, **cols) -> Path:
    rows = []
    for i in range(n):
        pid = f"sub-{i:02d}"
        _img(tmp / f"{pid}.nii.gz")
        rows.append({"participant_id": pid, "t1": f"{pid}.nii.gz", "score": float(i), **{
            k: v[i] for k, v in cols.items()}})
    path = tmp / "cohort.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def _edit(path: Path, fn) -> None:
    df = pd.read_csv(path, sep="\t", dtype=str)
    fn(df)
    df.to_csv(path, sep="\t", index=False)


def test_good_table_loads(tmp_path: Path) -> None:
    c = load_cohort_table(_cohort(tmp_path), ["score"])
    assert c.participant_ids == ["sub-00", "sub-01", "sub-02", "sub-03"]
    assert c.images[0] == tmp_path / "sub-00.nii.gz"
    assert c.targets["score"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_missing_image_file(tmp_path: Path) -> None:
    t = _cohort(tmp_path)
    (tmp_path / "sub-02.nii.gz").unlink()
    with pytest.raises(DfrnInputError, match=r"participant sub-02: image file not found"):
        load_cohort_table(t, ["score"])


def test_not_nifti(tmp_path: Path) -> None:
    p = tmp_path / "bad.nii.gz"
    p.write_text("this is not an image")
    with pytest.raises(DfrnInputError, match=r"bad.nii.gz is not a readable NIfTI"):
        load_volume(p, "participant sub-09")


def test_truncated_nifti(tmp_path: Path) -> None:
    p = _img(tmp_path / "full.nii.gz", np.ones((16, 16, 16), np.float32))
    raw = gzip.decompress(p.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DfrnInputError, match=r"participant sub-05: .*cut.nii.gz is truncated"):
        load_volume(cut, "participant sub-05")


def test_4d_image(tmp_path: Path) -> None:
    p = _img(tmp_path / "four.nii.gz", np.ones((8, 8, 8, 3), np.float32))
    with pytest.raises(DfrnInputError, match=r"four.nii.gz has shape \(8, 8, 8, 3\); a 3D"):
        load_volume(p, "participant sub-01")


def test_singleton_4th_axis_is_accepted(tmp_path: Path) -> None:
    p = _img(tmp_path / "one.nii.gz", np.ones((8, 8, 8, 1), np.float32))
    data, _ = load_volume(p)
    assert data.shape == (8, 8, 8)


def test_different_grid_lists_offending_files(tmp_path: Path) -> None:
    paths = [_img(tmp_path / f"s{i}.nii.gz") for i in range(3)]
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    paths.append(_img(tmp_path / "odd.nii.gz", affine=shifted))
    with pytest.raises(DfrnInputError, match=r"1 image\(s\) are not on the common grid.*odd.nii.gz.*register"):
        check_common_grid(paths, [f"participant {p.stem}" for p in paths])


def test_nan_voxels(tmp_path: Path) -> None:
    data = np.ones((8, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    p = _img(tmp_path / "nan.nii.gz", data)
    with pytest.raises(DfrnInputError, match=r"nan.nii.gz has 2 NaN or inf voxels"):
        load_volume(p, "participant sub-03")


def test_duplicate_participant(tmp_path: Path) -> None:
    t = _cohort(tmp_path)
    _edit(t, lambda df: df.__setitem__("participant_id", ["a", "b", "a", "c"]))
    with pytest.raises(DfrnInputError, match=r"duplicate participant_id a"):
        load_cohort_table(t, ["score"])


@pytest.mark.parametrize("bad", ["../etc", "sub/01", "..", "sub-01/../x", ".hidden"])
def test_unsafe_participant_id(tmp_path: Path, bad: str) -> None:
    t = _cohort(tmp_path)
    _edit(t, lambda df: df.__setitem__("participant_id", [bad, "b", "c", "d"]))
    with pytest.raises(DfrnInputError, match=r"unsafe as a file name"):
        load_cohort_table(t, ["score"])


def test_missing_target_column_lists_available(tmp_path: Path) -> None:
    with pytest.raises(DfrnInputError, match=r"target column 'anhedonia' is not in .*available: t1, score"):
        load_cohort_table(_cohort(tmp_path), ["anhedonia"])


def test_non_numeric_target(tmp_path: Path) -> None:
    t = _cohort(tmp_path)
    _edit(t, lambda df: df.__setitem__("score", ["1", "2", "high", "4"]))
    with pytest.raises(DfrnInputError, match=r"non-numeric value 'high' for participant sub-02"):
        load_cohort_table(t, ["score"])


def test_missing_targets_warn_with_count(tmp_path: Path) -> None:
    t = _cohort(tmp_path)
    _edit(t, lambda df: df.__setitem__("score", ["1", "", "", "4"]))
    with pytest.warns(UserWarning, match=r"target 'score': 2 of 4 subjects have no value"):
        c = load_cohort_table(t, ["score"])
    assert c.targets["score"].isna().sum() == 2


def test_bids_cohort(tmp_path: Path) -> None:
    pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "score": [1.0, 2.0]}).to_csv(
        tmp_path / "participants.tsv", sep="\t", index=False
    )
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    (tmp_path / "sub-02" / "ses-1" / "anat").mkdir(parents=True)
    _img(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    _img(tmp_path / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz")
    c = load_bids_cohort(tmp_path, ["score"])
    assert [p.name for p in c.images] == ["sub-01_T1w.nii.gz", "sub-02_ses-1_T1w.nii.gz"]
    shutil.rmtree(tmp_path / "sub-02")
    with pytest.raises(DfrnInputError, match=r"participant sub-02: BIDS folder"):
        load_bids_cohort(tmp_path, ["score"])


def test_cache_decodes_once_and_downsamples(tmp_path: Path, monkeypatch) -> None:
    paths = [_img(tmp_path / f"s{i}.nii.gz") for i in range(3)]
    calls = []
    import dfrn.data.images as images

    real = images.load_volume
    monkeypatch.setattr(images, "load_volume", lambda *a, **k: calls.append(a) or real(*a, **k))
    cache = VolumeCache(tmp_path / "cache")
    vs = cache.prepare(["a", "b", "c"], paths, downsample=3, progress=False)
    assert vs.shape == (3, 3, 3) and len(calls) == 3
    vs2 = cache.prepare(["a", "b", "c"], paths, downsample=3, progress=False)
    assert len(calls) == 3  # served from the cache: nothing decoded again
    assert vs2.files == vs.files
    assert vs[0].dtype == np.float16
    full = cache.prepare(["a", "b", "c"], paths, downsample=1, progress=False)
    assert full.shape == (8, 8, 8) and len(calls) == 6  # other parameters, other key
    z = np.asarray(full[1], dtype=np.float32)
    assert abs(z.mean()) < 1e-2 and abs(z.std() - 1) < 1e-2


def test_block_downsample_and_affine() -> None:
    data = np.arange(5 * 4 * 4, dtype=np.float32).reshape(5, 4, 4)
    d = block_downsample(data, 2)
    assert d.shape == (3, 2, 2)
    assert d[0, 0, 0] == pytest.approx(data[:2, :2, :2].mean())
    assert d[2, 0, 0] == pytest.approx(data[4:, :2, :2].sum() / 8)  # zero padded at the end
    aff = downsampled_affine(AFFINE, 2)
    # the centre of downsampled voxel 0 is the centre of input voxels 0 and 1
    np.testing.assert_allclose(aff @ [0, 0, 0, 1], AFFINE @ [0.5, 0.5, 0.5, 1])


def test_cli_prints_one_line_error(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "study.toml"
    cfg.write_text('[cohort]\ntable = "cohort.tsv"\ntargets = ["score"]\nbogus = 1\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "dfrn: error: unknown config key [cohort] 'bogus' (known keys: bids, cache_dir, "
        "categorical_covariates, covariates, derivatives, "
        "downsample, gm_column, image_column, intensity, mask, missing_covariates, session, site, strict, table, targets)"
    ]


# --- issue 17: shared files, empty tables, separators, NA-like IDs, folders ---------------------


def test_shared_image_warns_naming_both_participants(tmp_path: Path) -> None:
    t = _cohort(tmp_path)
    # sub-02 copy-pasted sub-00's path, spelt differently: the same file once resolved
    _edit(t, lambda df: df.__setitem__("t1", ["sub-00.nii.gz", "sub-01.nii.gz",
                                              "./sub-00.nii.gz", "sub-03.nii.gz"]))
    with pytest.warns(UserWarning, match=r"participants sub-00 and sub-02 share one file "
                      r"in column 't1': .*sub-00.nii.gz"):
        c = load_cohort_table(t, ["score"])
    assert len(c) == 4
    with pytest.raises(DfrnInputError, match=r"participants sub-00 and sub-02 share one file"):
        load_cohort_table(t, ["score"], strict=True)


def test_shared_gm_map_is_found_too(tmp_path: Path) -> None:
    t = _cohort(tmp_path, gm=["g0.nii.gz", "g1.nii.gz", "g2.nii.gz", "g1.nii.gz"])
    for i in range(3):
        _img(tmp_path / f"g{i}.nii.gz")
    with pytest.raises(DfrnInputError, match=r"participants sub-01 and sub-03 share one file "
                       r"in column 'gm'"):
        load_cohort_table(t, ["score"], file_columns=["gm"], strict=True)


def test_header_only_table_is_a_one_line_error(tmp_path: Path) -> None:
    t = tmp_path / "cohort.tsv"
    t.write_text("participant_id\tt1\tscore\n")
    with pytest.raises(DfrnInputError, match=r"cohort.tsv has a header but no participants"):
        load_cohort_table(t, ["score"])


def test_header_only_table_through_the_cli(tmp_path: Path, capsys) -> None:
    (tmp_path / "cohort.tsv").write_text("participant_id\tt1\tscore\n")
    cfg = tmp_path / "study.toml"
    cfg.write_text('[cohort]\ntable = "cohort.tsv"\ntargets = ["score"]\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cohort.tsv has a header but no participants" in err[0]


@pytest.mark.parametrize(("name", "sep", "said"), [("cohort.csv", "\t", "tab"),
                                                   ("cohort.tsv", ",", "comma")])
def test_separator_is_detected(tmp_path: Path, name: str, sep: str, said: str) -> None:
    t = _cohort(tmp_path)
    other = tmp_path / name
    pd.read_csv(t, sep="\t").to_csv(other, sep=sep, index=False)
    with pytest.warns(UserWarning, match=rf"{name} is {said}-separated"):
        c = load_cohort_table(other, ["score"])
    assert c.participant_ids == ["sub-00", "sub-01", "sub-02", "sub-03"]
    assert c.targets["score"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("pid", ["NA", "NaN", "null", "None", "nan", "N-A"])
def test_na_like_participant_ids_are_ids(tmp_path: Path, pid: str) -> None:
    t = _cohort(tmp_path)

    def edit(df: pd.DataFrame) -> None:
        df["participant_id"] = [pid, "b", "c", "d"]
        df["score"] = ["1", "", "NA", "4"]

    _edit(t, edit)
    with pytest.warns(UserWarning, match=r"2 of 4 subjects have no value"):
        c = load_cohort_table(t, ["score"])
    assert c.participant_ids == [pid, "b", "c", "d"]
    assert c.targets["score"].isna().tolist() == [False, True, True, False]


def test_truly_empty_participant_id_is_still_refused(tmp_path: Path) -> None:
    t = _cohort(tmp_path)
    _edit(t, lambda df: df.__setitem__("participant_id", ["a", "", "c", "d"]))
    with pytest.raises(DfrnInputError, match=r"empty participant_id on line 3"):
        load_cohort_table(t, ["score"])


def test_folder_as_image_path_says_folder(tmp_path: Path) -> None:
    t = _cohort(tmp_path)
    (tmp_path / "scans").mkdir()
    _edit(t, lambda df: df.__setitem__("t1", ["sub-00.nii.gz", "scans", "sub-02.nii.gz",
                                              "sub-03.nii.gz"]))
    with pytest.raises(DfrnInputError, match=r"participant sub-01: column 't1' names a folder, "
                       r"not a NIfTI file: .*scans"):
        load_cohort_table(t, ["score"])


def test_strict_config_key_refuses_shared_files_in_a_study(cohort_copy) -> None:
    from conftest import study_config

    from dfrn.workflows.study import load_study_cohort

    _edit(cohort_copy.table, lambda df: df.__setitem__("t1", [df["t1"][0]] + list(df["t1"][1:2])
                                                             * 2 + list(df["t1"][3:])))
    cfg = study_config(cohort_copy)
    with pytest.warns(UserWarning, match=r"participants sub-0002 and sub-0003 share one file"):
        load_study_cohort(cfg)
    strict = study_config(cohort_copy, cohort={"strict": True})
    assert strict.fingerprint() == cfg.fingerprint()  # refusing changes no number
    with pytest.raises(DfrnInputError, match=r"participants sub-0002 and sub-0003 share one file"):
        load_study_cohort(strict)


def test_run_strict_flag_refuses_shared_files_before_any_output(cohort_copy, tmp_path, capsys):
    from conftest import study_config

    from dfrn.cli import main

    _edit(cohort_copy.table, lambda df: df.__setitem__("t1", [df["t1"][0]] + list(df["t1"][1:2])
                                                             * 2 + list(df["t1"][3:])))
    cfg = tmp_path / "study.toml"
    cfg.write_text(study_config(cohort_copy).to_toml())
    out = tmp_path / "res"
    assert main(["run", str(cfg), "--out", str(out), "--strict", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "participants sub-0002 and sub-0003 share one file" in err[0]
    assert not (out / "predictions").exists()
