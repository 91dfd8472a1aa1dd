"""Atlases and region tables: loading, grid handling and parity with nilearn's labels masker."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import data_dir
from nilearn.maskers import NiftiLabelsMasker

from dfrn.data.atlas import (
    Atlas,
    fetch_aal3_atlas,
    load_atlas,
    region_table,
    roi_mean_intensity,
    roi_volumes,
    synthetic_parcellation,
)
from dfrn.errors import DfrnInputError

DATA = data_dir()
AAL_IMG = DATA / "atlas" / "tpl-MNI152NLin6Asym_res-01_atlas-AAL3v1_dseg.nii.gz"
AAL_TSV = DATA / "atlas" / "tpl-MNI152NLin6Asym_res-01_atlas-AAL3v1_dseg.tsv"
TEMPLATE = DATA / "mni152" / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"


def _masker_sums(labels_img: nib.Nifti1Image, img: nib.Nifti1Image, strategy: str = "sum"):
    masker = NiftiLabelsMasker(labels_img, strategy=strategy, standardize=None)
    values = np.atleast_2d(masker.fit_transform(img))
    ids = {k: v for k, v in masker.region_ids_.items() if k != "background"}
    return values, [int(ids[i]) for i in range(values.shape[1])]


def _small_atlas(tmp_path: Path, shape=(32, 32, 32), zoom: float = 1.0, extra_tsv=()) -> Atlas:
    """Label image of 8 octant blocks (labels 1..8) on a centred grid."""
    labels = np.zeros(shape, dtype=np.int16)
    half = [s // 2 for s in shape]
    k = 1
    for i in range(2):
        for j in range(2):
            for m in range(2):
                labels[
                    i * half[0] + 1 : (i + 1) * half[0] - 1,
                    j * half[1] + 1 : (j + 1) * half[1] - 1,
                    m * half[2] + 1 : (m + 1) * half[2] - 1,
                ] = k
                k += 1
    affine = np.diag([zoom, zoom, zoom, 1.0])
    affine[:3, 3] = -zoom * (np.array(shape) - 1) / 2
    img_path = tmp_path / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(labels, affine), img_path)
    rows = [(i, f"region_{i}") for i in range(1, 9)] + list(extra_tsv)
    tsv = tmp_path / "atlas.tsv"
    pd.DataFrame(rows, columns=["index", "name"]).to_csv(tsv, sep="\t", index=False)
    return load_atlas(img_path, tsv)


@pytest.mark.skipif(not AAL_IMG.is_file(), reason="shared AAL3 test data not available")
def test_aal3_volumes_match_nilearn_labels_masker() -> None:
    with pytest.warns(UserWarning, match="empty labels"):
        atlas = load_atlas(AAL_IMG, AAL_TSV)
    assert len(atlas.labels) == 166
    assert not {35, 36, 81, 82} & set(atlas.indices.tolist())

    tpl = nib.load(TEMPLATE)
    t1 = tpl.get_fdata(dtype=np.float32)
    pseudo_gm = nib.Nifti1Image(t1 / t1.max(), tpl.affine)  # real anatomy scaled to [0, 1]
    rng = np.random.default_rng(0)
    noise = nib.Nifti1Image(rng.random(tpl.shape, dtype=np.float32), tpl.affine)

    ours = roi_volumes([pseudo_gm, noise], atlas, ["sub-tpl", "sub-noise"])
    assert list(ours.columns) == atlas.names
    assert list(ours.index) == ["sub-tpl", "sub-noise"]

    both = nib.Nifti1Image(np.stack([pseudo_gm.get_fdata(), noise.get_fdata()], -1), tpl.affine)
    sums, region_ids = _masker_sums(atlas.img, both)
    name_of = dict(zip(atlas.indices.tolist(), atlas.names, strict=True))
    expected = pd.DataFrame(sums, columns=[name_of[i] for i in region_ids])[atlas.names]
    np.testing.assert_allclose(ours.to_numpy(), expected.to_numpy() * 1.0 / 1000, rtol=1e-5)
    assert (ours.to_numpy() > 0).all()


def test_volumes_brute_force_and_voxel_size(tmp_path: Path) -> None:
    atlas = _small_atlas(tmp_path, zoom=2.0)
    rng = np.random.default_rng(1)
    data = rng.random((32, 32, 32))
    path = tmp_path / "gm.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), atlas.img.affine), path)
    vols = roi_volumes([path], atlas, ["sub-01"])
    lab = atlas.label_data()
    gm = nib.load(path).get_fdata()
    for idx, name in zip(atlas.indices, atlas.names, strict=True):
        assert vols.at["sub-01", name] == pytest.approx(gm[lab == idx].sum() * 8.0 / 1000)
    sums, ids = _masker_sums(atlas.img, nib.load(path))
    np.testing.assert_allclose(vols.to_numpy()[0], sums[0][np.argsort(ids)] * 8.0 / 1000, rtol=1e-5)

    means = roi_mean_intensity([path], atlas, ["sub-01"])
    mean_ref, ids = _masker_sums(atlas.img, nib.load(path), strategy="mean")
    np.testing.assert_allclose(means.to_numpy()[0], mean_ref[0][np.argsort(ids)], rtol=1e-5)


def test_empty_labels_left_out_with_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"empty labels.*9 \(ghost\)"):
        atlas = _small_atlas(tmp_path, extra_tsv=[(9, "ghost")])
    assert "ghost" not in atlas.names
    assert len(atlas.names) == 8


def test_unnamed_label_is_an_input_error(tmp_path: Path) -> None:
    atlas = _small_atlas(tmp_path)
    lab = atlas.label_data().copy()
    lab[0, 0, 0] = 42
    nib.save(nib.Nifti1Image(lab.astype(np.int16), atlas.img.affine), tmp_path / "bad.nii.gz")
    with pytest.raises(DfrnInputError, match="42"):
        load_atlas(tmp_path / "bad.nii.gz", tmp_path / "atlas.tsv")
    with pytest.raises(DfrnInputError, match="does not exist"):
        load_atlas(tmp_path / "missing.nii.gz", tmp_path / "atlas.tsv")


def test_coarser_image_resamples_atlas_nearest(tmp_path: Path) -> None:
    atlas = _small_atlas(tmp_path, zoom=1.0)  # 32³ at 1 mm
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -2.0 * (16 - 1) / 2  # 16³ at 2 mm, same field of view
    rng = np.random.default_rng(2)
    img = nib.Nifti1Image(rng.random((16, 16, 16)).astype(np.float32), affine)
    vols = roi_volumes([img], atlas, ["s"])
    sums, ids = _masker_sums(atlas.img, img)  # nilearn resamples labels to the data
    np.testing.assert_allclose(vols.to_numpy()[0], sums[0][np.argsort(ids)] * 8.0 / 1000, rtol=1e-5)

    flip = affine.copy()  # the same image stored with the x axis flipped
    flip[:3, 0] *= -1
    flip[:3, 3] = affine[:3, :3] @ [15, 0, 0] + affine[:3, 3]
    flipped = nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), flip)
    np.testing.assert_allclose(roi_volumes([flipped], atlas, ["s"]).to_numpy(), vols.to_numpy())


def test_other_grids_are_input_errors(tmp_path: Path) -> None:
    atlas = _small_atlas(tmp_path)
    cropped = nib.Nifti1Image(np.ones((31, 31, 31), np.float32), atlas.img.affine)
    with pytest.raises(DfrnInputError, match="not on the atlas grid"):
        roi_volumes([cropped], atlas, ["s"])
    shifted = atlas.img.affine.copy()
    shifted[:3, 3] += 5.0
    with pytest.raises(DfrnInputError, match="not on the atlas grid"):
        roi_volumes([nib.Nifti1Image(np.ones((32, 32, 32), np.float32), shifted)], atlas, ["s"])
    with pytest.raises(DfrnInputError, match="participant ids"):
        roi_volumes([cropped], atlas, ["a", "b"])


def test_synthetic_parcellation_covers_mask(tmp_path: Path) -> None:
    ijk = np.indices((32, 32, 32)) - 15.5
    mask = (np.sqrt((ijk**2).sum(0)) < 13).astype(np.uint8)
    mask_img = nib.Nifti1Image(mask, np.eye(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atlas = synthetic_parcellation(mask_img, 12, seed=3)
    lab = atlas.label_data()
    assert atlas.names == [f"parcel_{i:03d}" for i in range(1, 13)]
    assert set(np.unique(lab[mask > 0])) == set(range(1, 13))
    assert (lab[mask == 0] == 0).all()
    again = synthetic_parcellation(mask_img, 12, seed=3)
    np.testing.assert_array_equal(lab, again.label_data())
    vols = roi_volumes([nib.Nifti1Image(mask.astype(np.float32), np.eye(4))], atlas, ["s"])
    assert vols.to_numpy().sum() == pytest.approx(mask.sum() / 1000)
    with pytest.raises(DfrnInputError, match="n_regions"):
        synthetic_parcellation(mask_img, 0)


def test_fetch_aal3_failure_is_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import nilearn.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(nilearn.datasets, "fetch_atlas_aal", offline)
    with pytest.raises(DfrnInputError, match="--atlas"):
        fetch_aal3_atlas()


def test_region_table_statistics_and_nonfinite_voxels(tmp_path: Path) -> None:
    atlas = _small_atlas(tmp_path, zoom=2.0)
    rng = np.random.default_rng(4)
    data = rng.random((32, 32, 32))
    data[3, 3, 3] = np.nan  # region 1
    data[3, 3, 4] = np.inf  # region 1
    img = nib.Nifti1Image(data, atlas.img.affine)
    lab = atlas.label_data()
    total = region_table(img, atlas, "sum")
    assert list(total.columns) == ["region", "label", "sum", "n_voxels"]
    assert total["region"].tolist() == atlas.names
    assert total["label"].tolist() == atlas.indices.tolist()
    zeroed = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    for _, row in total.iterrows():
        inside = lab == row["label"]
        assert row["sum"] == pytest.approx(zeroed[inside].sum(), rel=1e-12)
        assert row["n_voxels"] == inside.sum()
    volume = region_table(img, atlas, "volume")
    np.testing.assert_allclose(volume["volume"], total["sum"] * 8.0 / 1000, rtol=1e-12)
    mean = region_table(img, atlas, "mean")
    np.testing.assert_allclose(mean["mean"], total["sum"] / total["n_voxels"], rtol=1e-12)
    # "ignore" leaves the two non-finite voxels out of the sum and the count
    ignored = region_table(img, atlas, "mean", nonfinite="ignore")
    inside = (lab == 1) & np.isfinite(data)
    assert ignored["n_voxels"][0] == total["n_voxels"][0] - 2 == inside.sum()
    assert ignored["mean"][0] == pytest.approx(data[inside].mean(), rel=1e-12)
    np.testing.assert_array_equal(ignored["mean"][1:], mean["mean"][1:])
    # the same numbers as the subject tables
    path = tmp_path / "img.nii.gz"
    nib.save(img, path)
    np.testing.assert_array_equal(roi_volumes([path], atlas, ["s"]).to_numpy()[0], volume["volume"])
    with pytest.raises(DfrnInputError, match="unknown region statistic"):
        region_table(img, atlas, "median")
    with pytest.raises(DfrnInputError, match="nonfinite"):
        region_table(img, atlas, "sum", nonfinite="drop")


def test_unreadable_or_non_3d_images_are_one_line_errors(tmp_path: Path) -> None:
    atlas = _small_atlas(tmp_path)
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    with pytest.raises(DfrnInputError, match=r"atlas image: .*bad.nii.gz is not a readable") as e:
        load_atlas(bad, tmp_path / "atlas.tsv")
    assert "\n" not in str(e.value)
    four_d = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32, 32, 2), np.float32), atlas.img.affine), four_d)
    with pytest.raises(DfrnInputError, match=r"four.nii.gz has shape \(32, 32, 32, 2\); a 3D"):
        roi_volumes([four_d], atlas, ["s"])
    with pytest.raises(DfrnInputError, match=r"image of subject s: image file not found"):
        roi_volumes([tmp_path / "gone.nii.gz"], atlas, ["s"])
    with pytest.raises(DfrnInputError, match="not a nibabel image or a path"):
        roi_volumes([np.ones((32, 32, 32))], atlas, ["s"])


def test_an_atlas_on_another_grid_is_blamed_not_the_images(tmp_path: Path) -> None:
    atlas = _small_atlas(tmp_path)  # 32³ at 1 mm
    shifted = atlas.img.affine.copy()
    shifted[:3, 3] += 5.0
    imgs = [nib.Nifti1Image(np.full((32, 32, 32), float(i + 1), np.float32), shifted)
            for i in range(3)]
    with pytest.raises(DfrnInputError) as e:
        roi_volumes(imgs, atlas, ["a", "b", "c"])
    msg = str(e.value)
    assert msg.startswith(f"atlas {tmp_path / 'atlas.nii.gz'} is not on the grid of the images")
    assert "(32, 32, 32)" in msg and "1×1×1 mm" in msg and "\n" not in msg
    assert "of subject a" in msg  # an example image
    # the caller says which option names the atlas
    with pytest.raises(DfrnInputError, match=r"fix \[baseline\] atlas"):
        roi_volumes(imgs, atlas, ["a", "b", "c"], atlas_option="[baseline] atlas")
    # one image off the grid of the others: that image is blamed
    on_grid = [nib.Nifti1Image(np.ones((32, 32, 32), np.float32), atlas.img.affine)] * 2
    with pytest.raises(DfrnInputError, match=r"image of subject c is not on the atlas grid"):
        roi_volumes([*on_grid, imgs[0]], atlas, ["a", "b", "c"])


def test_a_folder_is_called_a_folder(tmp_path: Path) -> None:
    atlas = _small_atlas(tmp_path)
    (tmp_path / "maps").mkdir()
    with pytest.raises(DfrnInputError, match=r"image of subject s: .*maps is a folder, not a NIfTI"):
        roi_volumes([tmp_path / "maps"], atlas, ["s"])
