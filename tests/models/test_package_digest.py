"""The content digest that identifies a training scan however its file was written."""

from __future__ import annotations

import numpy as np
import pytest

from dfrn.models.package import scan_content_digest


@pytest.fixture
def scan() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    affine = np.array([[-2.0, 0, 0, 90.3], [0, 2.0, 0, -126.7], [0, 0, 2.0, -72.1], [0, 0, 0, 1]])
    return rng.normal(size=(7, 8, 9)).astype(np.float32), affine


def test_the_same_image_in_another_voxel_order_has_the_same_digest(scan) -> None:
    data, affine = scan
    # the same image stored with its first axis flipped (RAS instead of LAS), written by a tool
    # whose float arithmetic left 1e-9 mm of noise
    flipped = data[::-1]
    flip_affine = affine @ np.array([[-1.0, 0, 0, 6], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert scan_content_digest(flipped, flip_affine + 1e-9) == scan_content_digest(data, affine)
    assert scan_content_digest(data.astype(np.float64), affine) == scan_content_digest(data, affine)


def test_a_changed_voxel_or_grid_changes_the_digest(scan) -> None:
    data, affine = scan
    base = scan_content_digest(data, affine)
    changed = data.copy()
    changed[3, 4, 5] += 1e-3
    shifted = affine.copy()
    shifted[0, 3] += 0.01
    assert scan_content_digest(changed, affine) != base
    assert scan_content_digest(data, shifted) != base
    assert scan_content_digest(data.reshape(8, 7, 9), affine) != base
