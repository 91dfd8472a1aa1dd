"""Out-of-distribution checks of network inputs: image statistics and feature distances.

A package describes its training inputs by four statistics per scan, each computed on the
network input (the normalised, downsampled volume :class:`dfrn.data.images.VolumeCache`
makes, the same for training and ``dfrn predict``) inside the input region (the brain mask on
the input grid):

* ``mean`` and ``sd`` of the voxels (detector "intensity", two-sided);
* ``corr``, the Pearson correlation with the training subjects' mean input (detector
  "image correlation", low is strange);
* ``features``, the Mahalanobis distance of the network's penultimate features (the pooled
  activations before the last linear layer) to its training subjects' features, with a
  Ledoit-Wolf shrinkage covariance (Lee et al. 2018), as a log-distance standardised per
  network on its held-out subjects (detector "features", high is strange).

Calibration (:class:`OODCalibration`) uses the training subjects' values computed without
themselves: the correlation with the mean of the other subjects (leave one out), the feature
distance under the fold network that did not train on them (out of fold). Each statistic
becomes a robust z (median and 1.4826 × MAD of the calibration values); a detector's
strangeness is its |z| (two-sided) or signed z; a scan's strangeness is the largest. Its
``ood_score`` is the percentage of calibration subjects that are less strange, and it is
flagged when it is stranger than their 99th percentile, naming each detector beyond it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DETECTORS",
    "STATISTICS",
    "FeatureModel",
    "OODCalibration",
    "image_statistics",
    "input_region",
    "penultimate_features",
    "predict_with_features",
    "robust_scale",
]

#: The statistics, in the column order of a calibration array.
STATISTICS = ("mean", "sd", "corr", "features")
#: The detectors, in the order of :meth:`OODCalibration.strangeness`'s columns.
DETECTORS = ("intensity", "image correlation", "features")


def input_region(mask: np.ndarray | None, mean_image: np.ndarray, downsample: int) -> np.ndarray:
    """The region the statistics are computed in, on the network input grid.

    The brain mask block-averaged as the inputs are (a block at least half inside counts);
    without a mask, the voxels where the training subjects' mean input is not 0.
    """
    from dfrn.data.images import block_downsample

    if mask is None:
        return np.asarray(mean_image) != 0
    return block_downsample(np.asarray(mask, dtype=np.float32), downsample) >= 0.5


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two vectors; 0 when either is constant."""
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def image_statistics(volume: np.ndarray, region: np.ndarray, reference: np.ndarray,
                     ) -> tuple[float, float, float]:
    """``(mean, sd, corr)`` of one network input inside ``region``; corr with ``reference``."""
    v = np.asarray(volume, dtype=np.float64)[region]
    return float(v.mean()), float(v.std()), _corr(v, np.asarray(reference, np.float64)[region])


def predict_with_features(est, volumes: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The network's predictions ``(n,)`` and penultimate features ``(n, channels)``.

    ``est`` is a fitted one-output :class:`dfrn.models.regressor.DFRNRegressor`; the
    features (its last linear layer's input) are taken by a forward pre-hook during its own
    :meth:`predict` pass (same batching and device), so the predictions are those of
    ``est.predict``.
    """
    captured: list[np.ndarray] = []

    def hook(_module, inputs) -> None:
        captured.append(inputs[0].detach().float().cpu().numpy())

    handle = est.model_.fc.register_forward_pre_hook(hook)
    try:
        pred = est.predict(volumes)
    finally:
        handle.remove()
    feats = np.concatenate(captured) if captured else np.zeros((0, est.model_.fc.in_features))
    return pred, feats


def penultimate_features(est, volumes: Sequence[np.ndarray]) -> np.ndarray:
    """The network's penultimate features ``(n, channels)`` (:func:`predict_with_features`)."""
    return predict_with_features(est, volumes)[1]


@dataclass(frozen=True)
class FeatureModel:
    """One network's training features: mean and Ledoit-Wolf precision matrix."""

    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> FeatureModel:
        """Fit on the features of the subjects the network trained on."""
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf().fit(np.asarray(features, dtype=np.float64))
        return cls(lw.location_.astype(np.float64), lw.precision_.astype(np.float64))

    def log_distance(self, features: np.ndarray) -> np.ndarray:
        """log of the Mahalanobis distance of each row of ``features`` (floored at 1e-12)."""
        d = np.asarray(features, dtype=np.float64) - self.mean
        d2 = np.einsum("ij,jk,ik->i", d, self.precision, d)
        return 0.5 * np.log(np.maximum(d2, 1e-24))


def robust_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 × MAD of the finite ``values`` (the scale floored at 1e-4 × (1 +
    |median|), so that a statistic fixed by the normalisation gives z ≈ 0, not noise)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    centre = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - centre)))
    return centre, max(mad, 1e-4 * (1.0 + abs(centre)))


@dataclass(frozen=True)
class OODCalibration:
    """The calibration subjects' statistics (``(n, 4)``, :data:`STATISTICS`; NaN features
    when the package has no out-of-fold networks) and the flagging percentile."""

    values: np.ndarray
    percentile: float = 99.0

    def _scales(self) -> list[tuple[float, float]]:
        return [robust_scale(self.values[:, j]) for j in range(len(STATISTICS))]

    def strangeness(self, stats: np.ndarray) -> np.ndarray:
        """Per scan (rows of ``stats``, :data:`STATISTICS`) and detector, how strange it is
        (robust z; NaN for a detector the package has no calibration for)."""
        stats = np.atleast_2d(np.asarray(stats, dtype=np.float64))
        (cm, sm), (cs, ss), (cc, sc), (cf, sf) = self._scales()
        intensity = np.maximum(np.abs(stats[:, 0] - cm) / sm, np.abs(stats[:, 1] - cs) / ss)
        return np.column_stack([intensity, (cc - stats[:, 2]) / sc, (stats[:, 3] - cf) / sf])

    def threshold(self) -> float:
        """The calibration subjects' ``percentile`` of their largest strangeness."""
        return float(np.percentile(np.nanmax(self.strangeness(self.values), axis=1),
                                   self.percentile))

    def assess(self, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(ood_score, ood, ood_reason)`` of each scan (rows of ``stats``).

        ``ood_score`` is the percentage of calibration subjects less strange than the scan
        (both by their strangest detector); ``ood`` whether the scan is stranger than the
        calibration subjects' ``percentile``; ``ood_reason`` the detectors beyond it.
        """
        cal = np.nanmax(self.strangeness(self.values), axis=1)
        a = self.strangeness(stats)
        worst = np.nanmax(a, axis=1)
        t = self.threshold()
        score = 100.0 * (cal[None, :] < worst[:, None]).mean(axis=1)
        flagged = worst > t
        reasons = [", ".join(d for d, v in zip(DETECTORS, row, strict=True) if v > t)
                   for row in a]
        return score, flagged, reasons
