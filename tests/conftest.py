"""Shared fixtures: real-data location and tiny synthetic cohorts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return Path(os.environ.get("DFRN_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data folder; tests using it skip when it is absent."""
    d = data_dir()
    if not d.is_dir():
        pytest.skip(f"shared test data not found at {d} (set DFRN_TEST_DATA)")
    return d


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory):
    """12 synthetic subjects on an 8 mm grid (23×28×23) with planted effects."""
    from dfrn.synth import make_synthetic_cohort

    return make_synthetic_cohort(
        tmp_path_factory.mktemp("tiny_cohort"), n_subjects=12, voxel_size=8.0, effect=0.4,
        radius=14.0, seed=3,
    )
