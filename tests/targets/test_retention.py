"""How many factors: Kaiser, parallel analysis and MAP, against R's psych on the shared items.

Literals computed with R 4.2.2, psych 2.2.9 (Debian r-cran-psych):

    x <- read.delim("ehd20.tsv"); x <- x[, names(x) != "participant_id"]
    set.seed(s); fa.parallel(x, fa = "pc", n.iter = 20, plot = FALSE)$ncomp   # s = 0..4
    VSS(x, n = 8, plot = FALSE)$map; which.min(.Last.value)

ehd20: ncomp 4 for every seed 0-4; MAP minimum at 5; 5 eigenvalues > 1.
bdi13_wsc: ncomp 1 for every seed 0-4; MAP minimum at 1; 1 eigenvalue > 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import data_dir

from dfrn.errors import DfrnInputError
from dfrn.targets.factors import read_items_table
from dfrn.targets.retention import (
    item_correlation,
    kaiser_criterion,
    parallel_analysis,
    resolve_n_factors,
    suggest_n_factors,
    velicer_map,
)

EHD_MAP = [0.0664439, 0.0358042, 0.0306169, 0.0291337, 0.0285519, 0.0336146, 0.0411062,
           0.0502889]
BDI_MAP = [0.0170365, 0.0242665, 0.0381343, 0.0572012, 0.0747343, 0.111758, 0.132355, 0.165605]


def _items(name: str) -> pd.DataFrame:
    path = data_dir() / "items" / name
    if not path.is_file():
        pytest.skip(f"shared items not found at {path}")
    return read_items_table(path)


@pytest.mark.parametrize("name, kaiser, parallel, map_n, map_values", [
    ("ehd20.tsv", 5, 4, 5, EHD_MAP),
    ("bdi13_wsc.tsv", 1, 1, 1, BDI_MAP),
])
def test_matches_psych(name, kaiser, parallel, map_n, map_values) -> None:
    items = _items(name)
    corr = item_correlation(items)
    assert kaiser_criterion(np.linalg.eigvalsh(corr)) == kaiser
    for seed in range(5):  # like psych, the count does not depend on the random draw here
        assert parallel_analysis(items, n_iter=20, seed=seed).n_components == parallel
    mp = velicer_map(corr)
    np.testing.assert_allclose(mp.average_partial, map_values, rtol=5e-6)  # psych printed 6 s.f.
    assert mp.n_components == map_n
    table, _, _ = suggest_n_factors(items)
    assert table.set_index("criterion").loc[["kaiser", "parallel", "map"], "n_factors"].tolist() \
        == [kaiser, parallel, map_n]


def three_factor_items(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """12 items, 4 per factor, loadings 0.8 on three independent factors."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, 3))
    cols = {}
    for j in range(12):
        cols[f"i{j + 1:02d}"] = 0.8 * f[:, j // 4] + 0.6 * rng.standard_normal(n)
    return pd.DataFrame(cols, index=pd.Index([f"p{i:04d}" for i in range(n)],
                                            name="participant_id"))


def test_three_separated_factors_are_found() -> None:
    table, pa, _ = suggest_n_factors(three_factor_items())
    got = table.set_index("criterion")["n_factors"]
    assert got["parallel"] == 3 and got["map"] == 3 and got["kaiser"] == 3
    assert pa.observed[2] > pa.threshold[2] and pa.observed[3] < pa.threshold[3]


def test_resolve_by_criterion_and_warn_above_parallel() -> None:
    items = three_factor_items()
    assert resolve_n_factors(items, "parallel") == 3
    assert resolve_n_factors(items, "map") == 3
    with pytest.warns(UserWarning, match="5 factors requested but parallel analysis supports 3"):
        assert resolve_n_factors(items, 5) == 5
    with pytest.raises(DfrnInputError, match="'kaiser'"):
        resolve_n_factors(items, "kaiser")


def test_config_accepts_a_criterion(tiny_cohort) -> None:
    from conftest import study_config

    cfg = study_config(tiny_cohort, factors={"items": ["a", "b"], "n_factors": "parallel"})
    assert cfg.factors.n_factors == "parallel"
    with pytest.raises(DfrnInputError, match="n_factors must be a number, 'parallel' or 'map'"):
        study_config(tiny_cohort, factors={"items": ["a", "b"], "n_factors": "elbow"})
    with pytest.raises(DfrnInputError, match="align must be 'hungarian' or 'procrustes'"):
        study_config(tiny_cohort, factors={"items": ["a", "b"], "align": "greedy"})
