"""Benchmark: reading a training batch from dfrn's volume cache vs decoding the NIfTI files.

Baseline: what a naive loop does for each of the 250 trainings of a 5 × 10-fold, 5-factor
run: nibabel-decode each gzipped NIfTI, z-score it and block-average it. dfrn decodes once
and reads float16 memory maps afterwards. Prints both times per pass over the cohort and
their ratio, measured side by side in one run.

    python benchmarks/bench_volume_cache.py [--subjects 8] [--voxel-size 1] [--downsample 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from dfrn.data.images import VolumeCache, block_downsample, load_volume, normalise
from dfrn.data.synth import make_synthetic_cohort


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--voxel-size", type=float, default=1.0)
    ap.add_argument("--downsample", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        c = make_synthetic_cohort(Path(tmp) / "c", n_subjects=args.subjects, voxel_size=args.voxel_size)
        paths = [c.root / p for p in c.participants["t1"]]
        ids = list(c.participants["participant_id"])
        vs = VolumeCache(Path(tmp) / "cache").prepare(ids, paths, args.downsample, progress=False)

        def decode_pass() -> float:
            t = time.perf_counter()
            for p in paths:
                data, _ = load_volume(p)
                block_downsample(normalise(data), args.downsample).sum()
            return time.perf_counter() - t

        def cache_pass() -> float:
            t = time.perf_counter()
            for i in range(len(vs)):
                np.asarray(vs[i], dtype=np.float32).sum()
            return time.perf_counter() - t

        dec = min(decode_pass() for _ in range(args.passes))
        cac = min(cache_pass() for _ in range(args.passes))
        shape = "x".join(map(str, vs.shape))
        print(f"{args.subjects} subjects on a {args.voxel_size:g} mm grid, downsample {args.downsample} -> {shape}")
        print(f"decode NIfTI each pass (baseline): {dec:.3f} s per pass")
        print(f"dfrn volume cache:                 {cac:.3f} s per pass")
        print(f"speed-up: {dec / cac:.1f}x")


if __name__ == "__main__":
    main()
