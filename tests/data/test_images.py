"""Intensity normalisation modes and the verified volume cache."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.stats

import dfrn.data.images as images
from dfrn.data.images import VolumeCache, normalise
from dfrn.errors import DfrnInputError
from dfrn.io import file_digest

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
N = 12


def _mask() -> np.ndarray:
    m = np.zeros((N, N, N), dtype=bool)
    m[2:10, 2:10, 2:10] = True
    return m


def _binary(seed: int) -> np.ndarray:
    """A 0/1 'lesion map' inside the mask: ~30 % ones."""
    rng = np.random.default_rng(seed)
    return ((rng.uniform(size=(N, N, N)) < 0.3) & _mask()).astype(np.float32)


def _t1(seed: int) -> np.ndarray:
    """A continuous image, non-zero inside the mask only."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(50, 150, (N, N, N)) * _mask()).astype(np.float32)


def _save(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), path)
    return path


def _cohort(tmp: Path, n: int = 3, make=_t1) -> tuple[list[str], list[Path]]:
    ids = [f"s{i:02d}" for i in range(n)]
    paths = [_save(tmp / f"{pid}.nii.gz", make(i)) for i, pid in enumerate(ids)]
    return ids, paths


# --- normalise ------------------------------------------------------------------------------


def test_binary_map_modes_with_mask() -> None:
    data, mask = _binary(0), _mask()
    z = normalise(data, mask, "zscore")
    inside = data[mask]
    assert np.abs(z[mask]).max() > 0.5  # the old rule (mask & data != 0) gave all zeros
    np.testing.assert_allclose(z[mask], (inside - inside.mean()) / inside.std(), rtol=1e-5)
    levels = (np.array([0.0, 1.0]) - inside.mean()) / inside.std()
    np.testing.assert_allclose(np.unique(z[mask]), levels, rtol=1e-5)
    none = normalise(data, mask, "none")
    np.testing.assert_array_equal(none[mask], inside)
    assert set(np.unique(none[mask])) == {0.0, 1.0}
    mm = normalise(_t1(1), mask, "minmax")
    assert mm[mask].min() == pytest.approx(0.0) and mm[mask].max() == pytest.approx(1.0)
    for mode in ("zscore", "none", "minmax"):
        out = normalise(data + 5.0, mask, mode)  # non-zero everywhere: outside must be cleared
        assert out.dtype == np.float32
        assert not out[~mask].any(), mode


def test_minmax_and_none_without_mask() -> None:
    data = _t1(2)
    np.testing.assert_array_equal(normalise(data, None, "none"), data)
    mm = normalise(data, None, "minmax")
    nz = data != 0
    assert mm[nz].min() == pytest.approx(0.0) and mm[nz].max() == pytest.approx(1.0)
    assert not mm[~nz].any()
    const = _mask().astype(np.float32) * 7.0
    assert not normalise(const, None, "minmax").any()  # max == min: 0 inside


def test_bad_mode_and_tiny_region() -> None:
    with pytest.raises(DfrnInputError, match="'robust'"):
        normalise(_t1(0), None, "robust")
    one = np.zeros((N, N, N), dtype=np.float32)
    one[3, 3, 3] = 1.0
    for mode in ("zscore", "minmax"):
        with pytest.raises(DfrnInputError, match="fewer than 2 brain voxels"):
            normalise(one, None, mode)
    np.testing.assert_array_equal(normalise(one, None, "none"), one)  # no region minimum


def test_zscore_parity_with_scipy_without_mask() -> None:
    data = _t1(3)
    nz = data != 0
    z = normalise(data)  # the default is zscore
    np.testing.assert_allclose(z[nz], scipy.stats.zscore(data[nz].astype(np.float64)), atol=1e-5)
    assert not z[~nz].any()


# --- cache ----------------------------------------------------------------------------------


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.npy"))


def test_intensity_changes_key_and_sidecar(tmp_path: Path) -> None:
    ids, paths = _cohort(tmp_path, 1, _binary)
    mask = _save(tmp_path / "mask.nii.gz", _mask() * 1.0)
    cache = VolumeCache(tmp_path / "cache")
    a = cache.prepare(ids, paths, 1, mask, progress=False, intensity="none")
    with pytest.warns(UserWarning):
        b = cache.prepare(ids, paths, 1, mask, progress=False, intensity="zscore")
    assert a.files[0] != b.files[0] and len(_entries(tmp_path / "cache")) == 2
    assert not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert a.intensity == "none" and b.intensity == "zscore"
    side = json.loads(a.files[0].with_suffix(".json").read_text())
    assert side["sha256"] == file_digest(a.files[0])
    assert side["source"] == str(paths[0])
    assert side["n_unique_le_2"] is True
    assert side["min"] == 0.0 and side["max"] == 1.0 and side["std"] > 0
    assert side["input_nonzero"] == int(_binary(0).sum())
    assert a.stats == [side]
    with pytest.raises(DfrnInputError, match="'clip'"):
        cache.prepare(ids, paths, progress=False, intensity="clip")


@pytest.mark.parametrize("damage", ["truncate", "replace", "no_sidecar", "bad_sidecar"])
def test_corrupt_entry_is_rebuilt(tmp_path: Path, damage: str) -> None:
    ids, paths = _cohort(tmp_path, 3)
    cache = VolumeCache(tmp_path / "cache")
    logs: list[str] = []
    fresh = cache.prepare(ids, paths, 2, progress=False, log=logs.append)
    assert logs == []
    expected = np.array(fresh[1], dtype=np.float32)
    npy = fresh.files[1]
    if damage == "truncate":
        raw = npy.read_bytes()
        npy.write_bytes(raw[: len(raw) // 2])
    elif damage == "replace":
        np.save(npy, np.zeros(fresh.shape, dtype=np.float16))  # valid, same shape and dtype
    elif damage == "no_sidecar":
        npy.with_suffix(".json").unlink()
    else:
        npy.with_suffix(".json").write_text("{not json")
    again = cache.prepare(ids, paths, 2, progress=False, log=logs.append)
    assert len(logs) == 1, logs
    assert logs[0].startswith("cache entry for participant s01 was corrupt or incomplete (")
    assert logs[0].endswith(f"); rebuilt from {paths[1]}")
    np.testing.assert_array_equal(np.asarray(again[1], dtype=np.float32), expected)
    assert json.loads(npy.with_suffix(".json").read_text())["sha256"] == file_digest(npy)
    logs.clear()
    cache.prepare(ids, paths, 2, progress=False, log=logs.append)
    assert logs == []  # repaired for good


def test_untouched_entries_are_not_rebuilt(tmp_path: Path, monkeypatch) -> None:
    ids, paths = _cohort(tmp_path, 3)
    cache = VolumeCache(tmp_path / "cache")
    first = cache.prepare(ids, paths, progress=False)
    mtimes = [os.stat(f).st_mtime_ns for f in first.files]
    side_mtimes = [os.stat(f.with_suffix(".json")).st_mtime_ns for f in first.files]
    calls: list[tuple] = []
    real = images.load_volume
    monkeypatch.setattr(images, "load_volume", lambda *a, **k: calls.append(a) or real(*a, **k))
    logs: list[str] = []
    second = cache.prepare(ids, paths, progress=False, log=logs.append)
    assert calls == [] and logs == []
    assert second.files == first.files and second.stats == first.stats
    assert [os.stat(f).st_mtime_ns for f in second.files] == mtimes
    assert [os.stat(f.with_suffix(".json")).st_mtime_ns for f in second.files] == side_mtimes


def test_constant_inputs_refused_in_one_line(tmp_path: Path) -> None:
    ids, paths = _cohort(tmp_path, 4)
    zero = np.zeros((N, N, N), dtype=np.float32)
    _save(paths[1], zero)
    _save(paths[3], zero)
    cache = VolumeCache(tmp_path / "cache")
    for kwargs in ({}, {"mask_path": _save(tmp_path / "mask.nii.gz", _mask() * 1.0)}):
        with pytest.raises(DfrnInputError) as err:
            cache.prepare(ids, paths, progress=False, **kwargs)
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(
            "2 subject(s) have constant or all-zero network inputs after "
            "intensity='zscore' normalisation: participant s01, participant s03;"
        )
        assert "s00" not in msg and "s02" not in msg
        assert "flattens" not in msg  # empty images get no binary-map hint


def test_constant_list_is_capped(tmp_path: Path) -> None:
    ids = [f"c{i:02d}" for i in range(12)]
    paths = [_save(tmp_path / f"{p}.nii.gz", np.full((N, N, N), 3.0)) for p in ids]
    with pytest.raises(DfrnInputError, match=r"participant c09 and 2 more; check"):
        VolumeCache(tmp_path / "cache").prepare(ids, paths, progress=False, intensity="none")


def test_one_empty_map_is_accepted_only_when_allowed(tmp_path: Path) -> None:
    """Issue 26.9: ``dfrn predict`` on one subject's empty lesion map (intensity "none")
    passes ``allow_constant``; a training cohort without any variation is still refused."""
    mask = _save(tmp_path / "mask.nii.gz", _mask() * 1.0)
    empty = _save(tmp_path / "empty.nii.gz", np.zeros((N, N, N)))
    cache = VolumeCache(tmp_path / "cache")
    with pytest.raises(DfrnInputError, match=r"^1 subject\(s\) have constant .*participant e;"):
        cache.prepare(["e"], [empty], 1, mask, progress=False, intensity="none")
    with pytest.warns(UserWarning, match=r"empty lesion map\): participant e$"):
        vs = cache.prepare(["e"], [empty], 1, mask, progress=False, intensity="none",
                           allow_constant=True)
    assert not np.asarray(vs[0]).any()
    with pytest.raises(DfrnInputError, match="intensity='zscore'"):  # only raw values
        cache.prepare(["e"], [empty], 1, mask, progress=False, allow_constant=True)


def test_few_distinct_values_are_sorted_or_none() -> None:
    assert images.few_distinct_values(_binary(0)) == [0.0, 1.0]
    assert images.few_distinct_values(np.full(5, 3.0)) == [3.0]
    assert images.few_distinct_values(np.array([])) == []
    assert images.few_distinct_values(np.array([1.0, 0.0, 0.5, 1.0])) is None
    assert images.few_distinct_values(np.array([2.0, 0.5, 1.0]), limit=3) == [0.5, 1.0, 2.0]


def test_unmasked_binary_maps_flattened_by_zscore_get_a_hint(tmp_path: Path) -> None:
    ids, paths = _cohort(tmp_path, 3, _binary)  # no mask: the region is the ones only
    cache = VolumeCache(tmp_path / "cache")
    with pytest.raises(
        DfrnInputError, match=r"^3 subject\(s\) .*3 of them .* intensity = \"none\""
    ):
        cache.prepare(ids, paths, progress=False)
    vs = cache.prepare(ids, paths, progress=False, intensity="none")
    np.testing.assert_array_equal(np.asarray(vs[2], dtype=np.float32), _binary(2))


def test_binary_images_warn_under_zscore_only(tmp_path: Path) -> None:
    ids, paths = _cohort(tmp_path, 3, _binary)
    mask = _save(tmp_path / "mask.nii.gz", _mask() * 1.0)
    cache = VolumeCache(tmp_path / "cache")
    with pytest.warns(UserWarning, match="intensity") as rec:
        vs = cache.prepare(ids, paths, 1, mask, progress=False, intensity="zscore")
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert "participant s00" in msgs[0] and 'intensity = "none"' in msgs[0]
    assert all(st["n_unique_le_2"] for st in vs.stats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none = cache.prepare(ids, paths, 1, mask, progress=False, intensity="none")
    assert set(np.unique(np.asarray(none[0]))) == {0.0, 1.0}


def test_continuous_images_do_not_warn(tmp_path: Path) -> None:
    ids, paths = _cohort(tmp_path, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vs = VolumeCache(tmp_path / "cache").prepare(ids, paths, progress=False)
    assert not any(st["n_unique_le_2"] for st in vs.stats)


def test_given_digests_skip_image_hashing(tmp_path: Path, monkeypatch) -> None:
    ids, paths = _cohort(tmp_path, 3)
    mask = _save(tmp_path / "mask.nii.gz", _mask() * 1.0)
    digests = [file_digest(p) for p in paths]
    hashed: list[Path] = []
    real = images.file_digest
    monkeypatch.setattr(images, "file_digest", lambda p: hashed.append(Path(p)) or real(p))
    cache = VolumeCache(tmp_path / "cache")
    with_digests = cache.prepare(ids, paths, 1, mask, progress=False, digests=digests)
    assert not set(paths) & set(hashed)
    hashed.clear()
    without = cache.prepare(ids, paths, 1, mask, progress=False)
    assert set(paths) <= set(hashed)  # the counter does see image hashing when it happens
    assert without.files == with_digests.files
    with pytest.raises(ValueError, match="digests"):
        cache.prepare(ids, paths, progress=False, digests=digests[:2])


# --- NaN voxels (issue 17) --------------------------------------------------------------------


def _with_nan(path: Path, where: np.ndarray) -> Path:
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32).copy()
    data[where] = np.nan
    return _save(path.with_name(path.name.replace(".nii.gz", "_nan.nii.gz")), data)


def test_nan_outside_the_mask_is_ignored_and_gives_the_zero_copy_numbers(tmp_path: Path) -> None:
    from dfrn.data.atlas import Atlas, roi_mean_intensity, roi_volumes

    ids, paths = _cohort(tmp_path, 3)
    mask_path = _save(tmp_path / "mask.nii.gz", _mask() * 1.0)
    outside = ~_mask()
    outside[:, :, 6:] = False  # NaN in part of the outside only
    nan_paths = [paths[0], _with_nan(paths[1], outside), paths[2]]
    cache = VolumeCache(tmp_path / "cache")
    clean = cache.prepare(ids, paths, progress=False, mask_path=mask_path)
    nan = cache.prepare(ids, nan_paths, progress=False, mask_path=mask_path)
    assert nan.files[1] != clean.files[1]  # another file, another cache entry
    for i in range(3):
        assert np.isfinite(nan[i]).all()
        np.testing.assert_array_equal(nan[i], clean[i])
    # ROI features: an atlas whose regions reach outside the mask
    labels = np.ones((N, N, N), dtype=np.int32)
    labels[N // 2 :] = 2
    atlas = Atlas(nib.Nifti1Image(labels, AFFINE),
                  pd.DataFrame({"index": [1, 2], "name": ["a", "b"]}), "atlas")
    for features in (roi_volumes, roi_mean_intensity):
        got = features(nan_paths, atlas, ids)
        assert np.isfinite(got.to_numpy()).all()
        np.testing.assert_array_equal(got.to_numpy(), features(paths, atlas, ids).to_numpy())


def test_nan_inside_the_mask_is_refused_naming_subject_file_and_count(tmp_path: Path) -> None:
    ids, paths = _cohort(tmp_path, 3)
    mask_path = _save(tmp_path / "mask.nii.gz", _mask() * 1.0)
    where = np.zeros((N, N, N), dtype=bool)
    where[3, 3, 3:6] = True  # 3 voxels inside the mask
    where[0, 0, 0] = True  # 1 outside
    bad = _with_nan(paths[2], where)
    cache = VolumeCache(tmp_path / "cache")
    with pytest.raises(DfrnInputError, match=r"participant s02: .*s02_nan.nii.gz has 3 NaN or inf "
                       r"voxels inside the brain mask") as e:
        cache.prepare(ids, [paths[0], paths[1], bad], progress=False, mask_path=mask_path)
    assert "\n" not in str(e.value)
    with pytest.raises(DfrnInputError, match=r"participant s02: .*has 4 NaN or inf voxels; .*"
                       r"\[cohort\] mask"):
        cache.prepare(ids, [paths[0], paths[1], bad], progress=False)
    with pytest.raises(DfrnInputError, match=r"s02_nan.nii.gz has 4 NaN or inf voxels; set "
                       r"them to 0$"):  # a caller's own advice (dfrn predict's)
        images.load_volume(bad, "participant s02", nan_hint="set them to 0")
