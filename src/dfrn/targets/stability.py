"""How reproducible each symptom factor is: Tucker's congruence across folds or resamples.

For each fit on a subset of participants (a CV training fold, or a random half), the subset's
factors are aligned to the full-cohort fit (:func:`dfrn.targets.factors.align_factors`:
Hungarian matching by default, Procrustes as an option) and compared with it:

* ``congruence``: Tucker's congruence coefficient of the two loading columns (absolute);
* ``score_r``: the Pearson correlation, over the participants the subset did *not* see, of
  their scores projected with the subset's weights and with the full-cohort weights.

Each factor is classified with the bands of Lorenzo-Seva and ten Berge (2006): congruence
≥ 0.95 "equal", 0.85–0.95 "fair", < 0.85 "not the same factor". A correlation with an
unstable factor should not be taken at face value.

Without folds (``dfrn factors`` alone, or ``[factors] fit_on = "all"``) the estimate is
split-half: ``n_resamples`` (default 50) random halves, with a fixed seed; 0 resamples give an
empty table (no estimate).

When the subsets are smaller than the number of items, one warning says so with the user's
count of participants (the subsets' own fits do not warn one by one).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from dfrn.errors import DfrnInputError
from dfrn.targets.factors import FewParticipantsWarning, SymptomFactors, align_factors

__all__ = [
    "STABILITY_COLUMNS",
    "congruence_band",
    "subset_stability",
    "fold_stability",
    "split_half_stability",
    "summarise_stability",
]

STABILITY_COLUMNS = [
    "resample", "factor", "congruence", "score_r", "band", "n_fit", "n_held_out", "alignment",
]


def congruence_band(phi: float) -> str:
    """Lorenzo-Seva and ten Berge (2006): ≥ 0.95 equal, ≥ 0.85 fair, else not the same."""
    phi = abs(float(phi))
    if phi >= 0.95:
        return "equal"
    if phi >= 0.85:
        return "fair"
    return "not the same factor"


def subset_stability(
    items: pd.DataFrame,
    fit_ids: Sequence[str],
    held_out_ids: Sequence[str],
    reference: SymptomFactors,
    method: str = "hungarian",
    label: str = "",
) -> pd.DataFrame:
    """Congruence and held-out score correlation of one subset's fit, per factor."""
    settings = {**reference.get_params(), "names": None}
    with warnings.catch_warnings():  # the caller warns once, in the user's terms
        warnings.simplefilter("ignore", FewParticipantsWarning)
        model = SymptomFactors(**settings).fit(items.loc[list(fit_ids)])
    model = align_factors(model, reference, method=method)
    rows = []
    held = list(held_out_ids)
    sub = model.transform(items.loc[held]) if held else None
    full = reference.transform(items.loc[held]) if held else None
    for f in reference.factor_names_:
        r = np.nan
        if sub is not None and len(held) > 2 and sub[f].std() > 0 and full[f].std() > 0:
            r = float(np.corrcoef(sub[f], full[f])[0, 1])
        phi = float(model.congruence_[f])
        rows.append((label, f, phi, r, congruence_band(phi), len(fit_ids), len(held), method))
    return pd.DataFrame(rows, columns=STABILITY_COLUMNS)


def fold_stability(
    items: pd.DataFrame, plan: pd.DataFrame, reference: SymptomFactors, method: str = "hungarian"
) -> pd.DataFrame:
    """Per (repeat, fold) and factor: the training fold's fit against the full-cohort fit.

    The held-out participants are the fold's test participants.
    """
    sizes = plan.groupby(["repeat", "fold"]).size()
    smallest = len(items) - int(sizes.max())
    _warn_small_subsets(
        smallest, len(items), items.shape[1], f"training folds of {smallest}"
    )
    frames = []
    for r in sorted(plan["repeat"].unique()):
        g = plan[plan["repeat"] == r]
        for f in sorted(g["fold"].unique()):
            test = g.loc[g["fold"] == f, "participant_id"].tolist()
            train = g.loc[g["fold"] != f, "participant_id"].tolist()
            frames.append(subset_stability(items, train, test, reference, method,
                                           f"repeat-{int(r)}_fold-{int(f)}"))
    return pd.concat(frames, ignore_index=True)


def split_half_stability(
    items: pd.DataFrame,
    reference: SymptomFactors,
    n_resamples: int = 50,
    seed: int = 0,
    method: str = "hungarian",
) -> pd.DataFrame:
    """``n_resamples`` random halves: each half's fit against the full fit (other half held out).

    ``n_resamples = 0`` returns an empty table with :data:`STABILITY_COLUMNS` (no estimate).
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int | np.integer) \
            or n_resamples < 0:
        raise DfrnInputError(f"n_resamples must be a whole number >= 0, got {n_resamples!r}")
    if n_resamples == 0:
        return pd.DataFrame(columns=STABILITY_COLUMNS)
    ids = list(items.index)
    half = len(ids) // 2
    _warn_small_subsets(half, len(ids), items.shape[1], f"split halves of {half}")
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n_resamples):
        perm = rng.permutation(len(ids))
        fit = [ids[i] for i in perm[:half]]
        held = [ids[i] for i in perm[half:]]
        frames.append(subset_stability(items, fit, held, reference, method, f"half-{k:03d}"))
    return pd.concat(frames, ignore_index=True)


def _warn_small_subsets(size: int, n: int, n_items: int, what: str) -> None:
    """One warning when the subsets that are refitted have fewer participants than items."""
    if size < n_items:
        warnings.warn(
            f"{what} of the {n} participants are fewer than the {n_items} items: each of "
            "their fits has a singular item correlation matrix, so the stability estimates "
            "are unreliable",
            FewParticipantsWarning,
            stacklevel=3,
        )


def summarise_stability(stability: pd.DataFrame) -> pd.DataFrame:
    """Per factor: median and minimum congruence and score r, and the band of the median."""
    rows = []
    for f, g in stability.groupby("factor", sort=False):
        med = float(g["congruence"].median())
        rows.append({
            "factor": f,
            "median_congruence": med,
            "min_congruence": float(g["congruence"].min()),
            "median_score_r": float(g["score_r"].median()),
            "min_score_r": float(g["score_r"].min()),
            "band": congruence_band(med),
            "n_below_085": int((g["congruence"] < 0.85).sum()),
            "n_fits": len(g),
        })
    return pd.DataFrame(rows)
