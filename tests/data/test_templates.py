"""Template lookup (paths, TemplateFlow cache, templateflow package) and world-grid checks."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dfrn.data.templates import resolve_template, same_world_grid
from dfrn.errors import DfrnInputError


def _pair(folder: Path, shape=(10, 12, 10), affine=None) -> tuple[Path, Path]:
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    rng = np.random.default_rng(0)
    t1 = folder / "tpl.nii.gz"
    mask = folder / "mask.nii.gz"
    nib.Nifti1Image(rng.uniform(0, 100, shape).astype(np.float32), affine).to_filename(t1)
    m = np.zeros(shape, np.uint8)
    m[2:-2, 2:-2, 2:-2] = 1
    nib.Nifti1Image(m, affine).to_filename(mask)
    return t1, mask


def test_explicit_paths(tmp_path: Path) -> None:
    t1, mask = _pair(tmp_path)
    tpl = resolve_template(t1, mask)
    assert tpl.source == "paths" and tpl.t1 == t1.resolve() and tpl.mask == mask.resolve()
    assert tpl.resolution_mm == 2.0


def test_one_path_only_is_refused(tmp_path: Path) -> None:
    t1, _ = _pair(tmp_path)
    with pytest.raises(DfrnInputError, match="both --template and --template-mask"):
        resolve_template(t1, None)


def test_mask_off_the_template_grid_is_refused(tmp_path: Path) -> None:
    t1, _ = _pair(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, mask = _pair(other, affine=np.diag([3.0, 3.0, 3.0, 1.0]))
    with pytest.raises(DfrnInputError, match="not on the template's grid"):
        resolve_template(t1, mask)


def test_non_binary_mask_is_refused(tmp_path: Path) -> None:
    t1, _ = _pair(tmp_path)
    nib.Nifti1Image(np.full((10, 12, 10), 3, np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(
        tmp_path / "bad.nii.gz")
    with pytest.raises(DfrnInputError, match="binary"):
        resolve_template(t1, tmp_path / "bad.nii.gz")


def test_templateflow_cache_on_disk_is_used_offline(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "tf" / "tpl-MNI152NLin6Asym"
    folder.mkdir(parents=True)
    t1, mask = _pair(tmp_path)
    (folder / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz").write_bytes(t1.read_bytes())
    (folder / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz").write_bytes(mask.read_bytes())
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    monkeypatch.setitem(sys.modules, "templateflow", None)  # no package: must not be needed
    tpl = resolve_template()
    assert tpl.source == "templateflow-cache"
    assert tpl.t1.name == "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"


def test_templateflow_package_is_asked_for_the_right_files(tmp_path: Path, monkeypatch) -> None:
    t1, mask = _pair(tmp_path)
    calls = []

    def get(template, **query):
        calls.append((template, query))
        return t1 if query["suffix"] == "T1w" else mask

    api = types.SimpleNamespace(get=get)
    pkg = types.ModuleType("templateflow")
    pkg.api = api  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "templateflow", pkg)
    monkeypatch.setitem(sys.modules, "templateflow.api", api)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "empty"))
    tpl = resolve_template()
    assert tpl.source == "templateflow"
    assert calls == [
        ("MNI152NLin6Asym", {"resolution": 1, "desc": None, "suffix": "T1w"}),
        ("MNI152NLin6Asym", {"resolution": 1, "desc": "brain", "suffix": "mask"}),
    ]


def test_no_template_anywhere_is_one_actionable_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "templateflow", None)
    with pytest.raises(DfrnInputError) as err:
        resolve_template()
    text = str(err.value)
    assert "\n" not in text and "--template PATH --template-mask PATH" in text


def test_same_world_grid_compares_world_coordinates(shared_data: Path) -> None:
    """TemplateFlow's and FSL's MNI152NLin6Asym affines differ in x sign and origin."""
    tf = nib.load(shared_data / "mni152" / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz")
    n = tf.shape[0] - 1
    fsl_affine = tf.affine.copy()
    fsl_affine[0, 0] = -1.0
    fsl_affine[0, 3] = tf.affine[0, 3] + n  # the same world box, x axis flipped
    fsl = nib.Nifti1Image(np.asarray(tf.dataobj)[::-1], fsl_affine)
    assert not np.allclose(fsl.affine, tf.affine)
    assert same_world_grid(tf, fsl)
    moved = tf.affine.copy()
    moved[0, 3] += 2.0
    shifted = nib.Nifti1Image(np.asarray(tf.dataobj), moved)
    assert not same_world_grid(tf, shifted)
    colin = nib.load(shared_data / "colin27" / "ch2.nii.gz")
    assert not same_world_grid(tf, colin)
