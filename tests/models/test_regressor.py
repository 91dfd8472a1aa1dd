"""DFRNRegressor: batches keep every subject once, seeded training, fold-local reads, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dfrn.models.regressor import DFRNRegressor, _batches


def test_batches_of_nine_by_four() -> None:
    out = _batches(np.arange(9), 4)
    assert [b.tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert [b.tolist() for b in _batches(np.arange(5), 4)] == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("size", range(1, 9))
def test_batches_cover_every_index_exactly_once(size: int) -> None:
    rng = np.random.default_rng(size)
    for n in range(1, 51):
        order = rng.permutation(n)
        batches = _batches(order, size)
        joined = np.concatenate(batches)
        assert joined.tolist() == order.tolist(), (n, size)  # each index once, in order
        if n > 1:
            assert min(len(b) for b in batches) >= min(2, size if size > 1 else 1)
        assert all(len(b) <= size + 1 for b in batches)


def test_training_is_reproducible_and_fold_local(tiny_cohort) -> None:
    """Same seed, same model; test subjects' volumes are never read while fitting."""
    vols = [np.random.default_rng(i).standard_normal((16, 16, 16)).astype(np.float32) for i in range(10)]
    y = np.arange(10, dtype=float)

    class Spy(list):
        seen: set[int] = set()

        def __getitem__(self, i):
            Spy.seen.add(i)
            return super().__getitem__(i)

    train = Spy(vols[:8])
    a = DFRNRegressor(epochs=1, seed=5, val_fraction=0.25).fit(train, y[:8])
    b = DFRNRegressor(epochs=1, seed=5, val_fraction=0.25).fit(vols[:8], y[:8])
    assert Spy.seen <= set(range(8))
    np.testing.assert_allclose(a.predict(vols[8:]), b.predict(vols[8:]), rtol=1e-5)
    assert a.y_mean_ == pytest.approx(np.mean(y[:8][np.setdiff1d(range(8), a.val_ids_)]))
    c = DFRNRegressor(epochs=1, seed=6, val_fraction=0.25).fit(vols[:8], y[:8])
    assert not np.allclose(a.predict(vols[8:]), c.predict(vols[8:]))


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    vols = [np.random.default_rng(i).standard_normal((16, 16, 16)).astype(np.float32) for i in range(6)]
    est = DFRNRegressor(epochs=1, seed=0, val_fraction=0.0).fit(vols, np.arange(6.0))
    est.save(tmp_path / "m.pt")
    back = DFRNRegressor.load(tmp_path / "m.pt")
    np.testing.assert_allclose(back.predict(vols), est.predict(vols), rtol=1e-6)
