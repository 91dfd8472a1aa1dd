"""One subject's preprocessing: input checks, class order, modulation, determinism, ANTs args."""

from __future__ import annotations

import builtins
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dfrn.data.prep import PrepParams, _checked_call, check_t1, order_classes, require_ants
from dfrn.errors import DfrnInputError

AFF = np.diag([2.0, 2.0, 2.0, 1.0])


def _save(tmp: Path, name: str, data: np.ndarray) -> Path:
    p = tmp / name
    nib.Nifti1Image(data, AFF).to_filename(p)
    return p


@pytest.mark.parametrize(
    "kind, message",
    [
        ("4d", "is 4D"),
        ("empty", "is empty"),
        ("constant", "is constant"),
        ("mask", "not a T1"),
        ("nan", "NaN"),
        ("unreadable", "cannot read"),
    ],
)
def test_bad_inputs_are_one_line_naming_the_subject(tmp_path: Path, kind: str, message: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "4d":
        p = _save(tmp_path, "x.nii.gz", rng.uniform(0, 1, (16, 16, 16, 3)).astype(np.float32))
    elif kind == "empty":
        p = _save(tmp_path, "x.nii.gz", np.zeros((16, 16, 16), np.float32))
    elif kind == "constant":
        p = _save(tmp_path, "x.nii.gz", np.full((16, 16, 16), 7.0, np.float32))
    elif kind == "mask":
        p = _save(tmp_path, "x.nii.gz", (rng.uniform(size=(16, 16, 16)) > 0.5).astype(np.uint8))
    elif kind == "nan":
        d = rng.uniform(0, 1, (16, 16, 16)).astype(np.float32)
        d[3, 3, 3] = np.nan
        p = _save(tmp_path, "x.nii.gz", d)
    else:
        p = tmp_path / "x.nii.gz"
        p.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    with pytest.raises(DfrnInputError) as err:
        check_t1(p, "participant sub-07")
    text = str(err.value)
    assert "\n" not in text and text.startswith("participant sub-07") and message in text


def test_a_t1_passes_the_checks(shared_data: Path) -> None:
    img = check_t1(shared_data / "ixi" / "sub-IXI012_T1w.nii.gz", "participant sub-IXI012")
    assert img.ndim == 3
    np.testing.assert_array_equal(img.affine, nib.load(shared_data / "ixi" / "sub-IXI012_T1w.nii.gz").affine)


def test_order_classes_fixes_any_label_permutation() -> None:
    rng = np.random.default_rng(1)
    true = rng.integers(1, 4, size=5000)  # 1 CSF (dark), 2 GM, 3 WM (bright)
    intensity = np.choose(true - 1, [100.0, 500.0, 900.0]) + rng.normal(0, 20, true.size)
    for perm in ([1, 2, 3], [3, 1, 2], [2, 3, 1], [3, 2, 1]):
        labels = np.array(perm)[true - 1]  # the clustering's arbitrary numbering
        order = order_classes(intensity, labels)
        relabelled = np.zeros_like(labels)
        for new, old in enumerate(order, start=1):
            relabelled[labels == old] = new
        np.testing.assert_array_equal(relabelled, true)


def test_params_are_validated_before_ants() -> None:
    with pytest.raises(DfrnInputError, match="transform 'rigid' is not one of syn, affine"):
        PrepParams("rigid")
    with pytest.raises(DfrnInputError, match="seed"):
        PrepParams("syn", -1)
    # ANTs takes 0 as "unseeded" (two processes then differ): never pass it
    assert PrepParams("syn", 0).ants_seed == 1 and PrepParams("syn", 7).ants_seed == 8


def test_unknown_ants_keyword_is_refused_not_swallowed() -> None:
    def registration(fixed, moving, type_of_transform="SyN", random_seed=None, **kwargs):
        return "ran"

    assert _checked_call(registration, fixed=1, moving=2, random_seed=3) == "ran"
    with pytest.raises(RuntimeError, match="no parameter random_sede"):
        _checked_call(registration, fixed=1, moving=2, random_sede=3)


def test_the_seed_reaches_either_antspyx_api() -> None:
    """antspyx 0.6.1 takes registration(random_seed=…); 0.6.3 a global
    ants.config.set_ants_deterministic(on, seed_value). Both get dfrn's seed."""
    import types

    from dfrn.data.prep import _seed_registration

    def old_registration(fixed, moving, random_seed=None, **kwargs):
        return None

    old = types.SimpleNamespace(registration=old_registration)
    assert _seed_registration(old, 8) == {"random_seed": 8}
    calls = []

    def new_registration(fixed, moving, **kwargs):
        return None

    new = types.SimpleNamespace(
        registration=new_registration,
        config=types.SimpleNamespace(set_ants_deterministic=lambda on, seed: calls.append((on, seed))),
    )
    assert _seed_registration(new, 8) == {}
    assert calls and calls[0][1] == 8
    with pytest.raises(RuntimeError, match="no registration seed"):
        _seed_registration(types.SimpleNamespace(registration=new_registration), 8)


def test_missing_antspyx_is_one_line(monkeypatch) -> None:
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "ants":
            raise ImportError("No module named 'ants'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(DfrnInputError, match=r"pip install 'dfrn\[prep\]'"):
        require_ants()


# ---------------------------------------------------------------- with antspyx


def _gm_volume(result) -> tuple[float, float, float]:
    vox = float(np.prod(result.gm_template.header.get_zooms()[:3])) / 1000.0
    return (result.metrics["gm_ml"], float(result.gm_template.get_fdata().sum()) * vox,
            float(result.gm_modulated.get_fdata().sum()) * vox)


def test_modulation_scales_with_the_cube_of_a_known_zoom(template_4mm, tmp_path: Path) -> None:
    """The template, zoomed by s = 1.1 in every axis, then preprocessed: modulated GM = s³ × the
    template's GM volume (within 3 %); the unmodulated map keeps the template's volume."""
    pytest.importorskip("ants")
    from dfrn.data.prep import preprocess_t1, set_ants_threads

    set_ants_threads(True, 1)
    tpl, mask = template_4mm
    img = nib.load(tpl)
    s = 1.1
    zoomed_affine = img.affine.copy()
    zoomed_affine[:3, :] *= s
    zoomed = tmp_path / "zoomed.nii.gz"
    nib.Nifti1Image(np.asarray(img.dataobj, np.float32), zoomed_affine).to_filename(zoomed)
    params = PrepParams("affine", 0)
    ref = preprocess_t1(tpl, tpl, mask, params, tmp_path, "template")
    big = preprocess_t1(zoomed, tpl, mask, params, tmp_path, "zoomed")
    ref_native, _, _ = _gm_volume(ref)
    native, unmodulated, modulated = _gm_volume(big)
    assert native == pytest.approx(s**3 * ref_native, rel=0.03)
    assert modulated == pytest.approx(s**3 * ref_native, rel=0.03)
    assert unmodulated == pytest.approx(ref_native, rel=0.03)
    assert not unmodulated == pytest.approx(modulated, rel=0.10)
    # template-space outputs carry the template's affine, native ones the input's world
    np.testing.assert_array_equal(big.gm_modulated.affine, img.affine)
    np.testing.assert_allclose(big.t1_native.affine, nib.as_closest_canonical(
        nib.load(zoomed)).affine)


def test_ants_temporary_files_are_removed_on_success_and_failure(template_4mm, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """ANTsPy leaves Atropos' antsr*prob*.nii.gz (and the Jacobian's field) in the temporary
    folder: a cohort of 1,000 subjects filled /tmp. They go into a private folder per subject,
    removed after it, also when the subject fails after ANTs wrote them."""
    pytest.importorskip("ants")
    import os
    import tempfile

    import dfrn.data.prep as prep

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # so that tempfile reads $TMPDIR again
    prep.set_ants_threads(True, 1)
    tpl, mask = template_4mm
    work = tmp_path / "work"
    work.mkdir()
    seen: list[list[str]] = []
    real_order = prep.order_classes

    def order_and_look(*args, **kwargs):  # runs just after Atropos wrote its files
        seen.append(sorted(p.name for p in Path(tempfile.gettempdir()).iterdir()))
        return real_order(*args, **kwargs)

    monkeypatch.setattr(prep, "order_classes", order_and_look)
    prep.preprocess_t1(tpl, tpl, mask, PrepParams("affine", 0), work, "template")
    assert any("prob01" in name for name in seen[0]), seen  # ANTs did write them, privately
    assert list(system_tmp.iterdir()) == []
    assert tempfile.gettempdir() == str(system_tmp) and os.environ["TMPDIR"] == str(system_tmp)

    def order_and_fail(*args, **kwargs):
        order_and_look(*args, **kwargs)
        raise RuntimeError("segmentation failed")

    monkeypatch.setattr(prep, "order_classes", order_and_fail)
    with pytest.raises(RuntimeError, match="segmentation failed"):
        prep.preprocess_t1(tpl, tpl, mask, PrepParams("affine", 0), work, "template")
    assert any("prob01" in name for name in seen[1]), seen
    assert list(system_tmp.iterdir()) == []
    assert not [p for p in work.iterdir() if p.name.startswith("ants-")]


def test_a_folder_as_scan_path_is_called_a_folder(tmp_path: Path) -> None:
    from dfrn.workflows.prep import plan_prep_subjects

    (tmp_path / "scans").mkdir()
    table = tmp_path / "participants.tsv"
    table.write_text("participant_id\tt1\nsub-01\tscans\n")
    with pytest.raises(DfrnInputError, match=r"^participant sub-01: column 't1' names a folder, "
                       r"not a NIfTI file: .*scans$"):
        plan_prep_subjects(table)
