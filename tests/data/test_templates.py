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
    tpl = resolve_template(t1, mask, "Custom")
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
    assert "pip install 'dfrn[prep]'" in text


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


def test_a_custom_template_needs_its_space_label(tmp_path: Path) -> None:
    """A template that is not a TemplateFlow file is never called MNI152NLin6Asym: its space
    label is given (a BIDS label), or it is refused."""
    t1, mask = _pair(tmp_path)
    with pytest.raises(DfrnInputError) as err:
        resolve_template(t1, mask)
    assert "\n" not in str(err.value) and "--template-space NAME" in str(err.value)
    assert resolve_template(t1, mask, "Colin27").space == "Colin27"
    with pytest.raises(DfrnInputError, match="'MNI-152' is not a BIDS label"):
        resolve_template(t1, mask, "MNI-152")
    # a TemplateFlow file name carries its label; a contradicting label is refused
    named = tmp_path / "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz"
    named.write_bytes(t1.read_bytes())
    assert resolve_template(named, mask).space == "MNI152NLin2009cAsym"
    assert resolve_template(named, mask, "MNI152NLin2009cAsym").space == "MNI152NLin2009cAsym"
    with pytest.raises(DfrnInputError, match="TemplateFlow's MNI152NLin2009cAsym, but"):
        resolve_template(named, mask, "MNI152NLin6Asym")
    # without files, TemplateFlow's MNI152NLin6Asym is the only template there is
    with pytest.raises(DfrnInputError, match="without --template"):
        resolve_template(None, None, "Colin27")


def test_offline_routes_come_before_the_templateflow_package(tmp_path: Path, monkeypatch) -> None:
    """With templateflow installed (the [prep] extra), explicit paths and a filled cache are
    still used first: its get (which downloads) is never called. The empty placeholders that
    templateflow writes into a new cache are not a cache."""
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
    folder = tmp_path / "tf" / "tpl-MNI152NLin6Asym"
    folder.mkdir(parents=True)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    cached_t1 = folder / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"
    cached_mask = folder / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz"
    cached_t1.touch()  # templateflow's skeleton: empty files until fetched
    cached_mask.touch()
    assert resolve_template(t1, mask, "Custom").source == "paths"
    assert calls == []
    assert resolve_template().source == "templateflow"
    assert len(calls) == 2
    cached_t1.write_bytes(t1.read_bytes())
    cached_mask.write_bytes(mask.read_bytes())
    calls.clear()
    tpl = resolve_template()
    assert tpl.source == "templateflow-cache" and tpl.space == "MNI152NLin6Asym"
    assert calls == []


def test_the_prep_extra_installs_templateflow() -> None:
    """The error without a template says pip install 'dfrn[prep]': that extra must bring
    templateflow (and antspyx)."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("prep", "preprocess"):
        names = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in extras[name]}
        assert {"antspyx", "templateflow"} <= names, (name, extras[name])
