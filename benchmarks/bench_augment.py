"""Cost of ``[training] augment = "light"`` per training step, at 46×55×46 on the CPU.

Baseline: the same training step without augmentation (forward, SSE, backward, Adam step of
the DFRN network on a batch of 4). dfrn: the step plus :class:`dfrn.models.augment.Augmenter`
on the batch (TorchIO random affine per subject; ``--bias-field`` adds the random bias
field). Both measured side by side, alternating, in one run; printed: median seconds per step
and the ratio.

Run::

    python benchmarks/bench_augment.py --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dfrn.models.augment import Augmenter
from dfrn.models.network import DFRN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[46, 55, 46])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bias-field", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DFRN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(4, 1, *args.shape)
    y = torch.randn(4)
    aug = Augmenter("light", seed=0, bias_field=args.bias_field)

    def step(batch: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.sum((model(batch) - y) ** 2)
        loss.backward()
        opt.step()

    plain, augmented, aug_only = [], [], []
    for k in range(args.steps + 2):
        t0 = time.perf_counter()
        step(x)
        t1 = time.perf_counter()
        xa = aug(x, 0, k)
        t2 = time.perf_counter()
        step(xa)
        t3 = time.perf_counter()
        if k >= 2:  # warm-up
            plain.append(t1 - t0)
            augmented.append(t3 - t1)
            aug_only.append(t2 - t1)
    p, a, o = (statistics.median(v) for v in (plain, augmented, aug_only))
    print(f"shape {args.shape}, batch 4, {args.threads} threads, {args.steps} steps each")
    print(f"step without augmentation: {p:.3f} s; with: {a:.3f} s (augmentation alone "
          f"{o * 1000:.1f} ms); ratio {a / p:.3f} (+{100 * (a / p - 1):.1f}%)")


if __name__ == "__main__":
    main()
