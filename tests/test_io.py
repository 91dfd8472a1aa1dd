"""Atomic writes: a writer that fails halfway leaves no partial file, for every output kind."""

from __future__ import annotations

from pathlib import Path

import matplotlib.figure
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from dfrn.io import atomic_write_nifti, atomic_write_tsv, verify_manifest, write_manifest
from dfrn.models.regressor import DFRNRegressor
from dfrn.plotting import plot_fig2


class Halfway(RuntimeError):
    pass


def _fail_halfway(real):
    """Wrap a writer: let it write to its target, keep half the bytes, then fail."""

    def wrapper(obj, target, *args, **kwargs):
        if isinstance(obj, str | Path) and not isinstance(target, str | Path):
            obj, target = target, obj  # nib.save(img, path) vs torch.save(obj, path)
        real(obj, target, *args, **kwargs)
        data = Path(target).read_bytes()
        Path(target).write_bytes(data[: len(data) // 2])
        raise Halfway(f"interrupted while writing {target}")

    return wrapper


def _predictions() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    pred = pd.DataFrame({
        "participant_id": [f"s{i}" for i in range(8)], "repeat": 0, "fold": [0, 1] * 4,
        "factor": "sleep", "y_true": rng.standard_normal(8), "y_pred": rng.standard_normal(8),
    })
    metrics = pd.DataFrame({"repeat": [0], "factor": ["sleep"], "n": [8], "pearson_r": [0.3],
                            "p_value": [0.5], "r2": [0.0], "mae": [1.0], "rmse": [1.0]})
    return pred, metrics


def _model() -> DFRNRegressor:
    vols = [np.random.default_rng(i).standard_normal((12, 12, 12)).astype(np.float32)
            for i in range(4)]
    return DFRNRegressor(epochs=1, seed=0, val_fraction=0.0).fit(vols, np.arange(4.0))


def _write_tsv(path: Path) -> None:
    atomic_write_tsv(pd.DataFrame({"a": range(1000)}), path)


def _write_nifti(path: Path) -> None:
    atomic_write_nifti(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), path)


def _write_png(path: Path) -> None:
    plot_fig2(*_predictions(), path)


KINDS = {
    "tsv": ("predictions.tsv", _write_tsv, (pd.DataFrame, "to_csv"), False),
    "nifti": ("map.nii.gz", _write_nifti, (nib, "save"), True),
    "png": ("fig2.png", _write_png, (matplotlib.figure.Figure, "savefig"), False),
    "checkpoint": ("model.pt", None, (torch, "save"), True),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_writer_leaves_no_partial_file(kind: str, existing: bool, tmp_path: Path,
                                                   monkeypatch) -> None:
    name, write, (owner, attr), swap = KINDS[kind]
    path = tmp_path / "out" / name
    model = _model() if kind == "checkpoint" else None
    if write is None:
        def write(p: Path) -> None:
            model.save(p)

    if existing:
        write(path)
        before = path.read_bytes()
    real = getattr(owner, attr)
    if swap:  # module-level functions: nib.save(img, path), torch.save(obj, path)
        monkeypatch.setattr(owner, attr, _fail_halfway(real))
    else:  # methods: df.to_csv(path), fig.savefig(path)
        def method(self, target, *args, **kwargs):
            real(self, target, *args, **kwargs)
            data = Path(target).read_bytes()
            Path(target).write_bytes(data[: len(data) // 2])
            raise Halfway(f"interrupted while writing {target}")

        monkeypatch.setattr(owner, attr, method)
    with pytest.raises(Halfway):
        write(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ([name] if existing else [])
    if existing:
        assert path.read_bytes() == before  # the old file is untouched, not half-replaced


def test_manifest_detects_every_change(tmp_path: Path) -> None:
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "a.tsv").write_text("x\n1\n")
    (folder / "b.bin").write_bytes(b"\x00" * 10)
    write_manifest(folder)
    assert verify_manifest(folder, required=("a.tsv",)) is None
    assert verify_manifest(folder, required=("c.pt",)) == "c.pt is not in the manifest"
    (folder / "a.tsv").write_text("x\n2\n")  # same size, new content
    assert "SHA-256" in verify_manifest(folder)
    (folder / "a.tsv").write_text("x\n1\n")
    (folder / "b.bin").unlink()
    assert verify_manifest(folder) == "b.bin is missing"
