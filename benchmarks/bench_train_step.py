"""Benchmark: dfrn's training step against a bare MONAI ``ResNet`` loop; and the data wait.

Baseline: MONAI's ``ResNet`` (basic block, layers [1,1,1,1], the same network as dfrn's DFRN
parameter for parameter), Adam with the same settings (lr 0.001, fused), sum of squared
errors, the same batch size, on the same device, with every batch *already in device
memory* (no data path at all). dfrn: ``DFRNRegressor.fit`` on a cohort of float16 cached
volumes (memory maps, as a study has them), timed per step from ``history.tsv``'s
``epoch_s`` (which includes reading the data), for each data path (``sync``: the path
before the data-path work, reading each batch from the memory maps when needed;
``memory``; ``prefetch``). Rounds alternate dfrn and the baseline so that both see the same
machine load; the best round of each is reported.

Prints the step ratio dfrn / bare MONAI per data path (goal ≤ 1.05) and the fraction of
epoch time spent waiting for data (``data_wait_s / epoch_s``, goal ≤ 5%).

    python benchmarks/bench_train_step.py --shape 46 55 46 [--subjects 12] [--rounds 3]
    python benchmarks/bench_train_step.py --shape 91 109 91 --subjects 8 --rounds 2
    python benchmarks/bench_train_step.py --device cuda --shape 182 218 182 --subjects 16 \
        --threads 4     # on a GPU machine
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dfrn.data.images import GridSpec, VolumeSet
from dfrn.evaluation.tasks import _Subset
from dfrn.models.feed import clear_resident
from dfrn.models.regressor import DFRNRegressor, _batches


def monai_step_time(xs: torch.Tensor, ys: torch.Tensor, batch: int, epochs: int,
                    device: torch.device, seed: int) -> float:
    """Seconds per step of a bare MONAI loop over batches already on ``device``."""
    from monai.networks.nets.resnet import ResNet

    torch.manual_seed(seed)
    net = ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[64, 128, 256, 512],
                 spatial_dims=3, n_input_channels=1, conv1_t_size=7, conv1_t_stride=(1, 2, 2),
                 shortcut_type="B", bias_downsample=False, num_classes=1).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    rng = np.random.default_rng(seed)
    order_batches = [_batches(rng.permutation(len(xs)), batch) for _ in range(epochs)]
    pre = [[(xs[b], ys[b]) for b in bs] for bs in order_batches]  # in device memory
    net.train()
    best = float("inf")
    for epoch_batches in pre:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for x, y in epoch_batches:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = net(x)  # bf16 autocast on CUDA, as dfrn (fp32 on the CPU)
            loss = torch.sum((pred.float() - y) ** 2)
            loss.backward()
            opt.step()
            float(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / len(epoch_batches))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[46, 55, 46])
    ap.add_argument("--subjects", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", nargs="+", default=["sync", "memory", "prefetch"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(args.subjects):
            f = Path(tmp) / f"v{i}.npy"
            np.save(f, rng.standard_normal(shape).astype(np.float16))
            files.append(f)
        cohort = VolumeSet([f"s{i}" for i in range(args.subjects)], files, shape,  # type: ignore[arg-type]
                           GridSpec(shape, np.eye(4)), 1)  # type: ignore[arg-type]
        view = _Subset(cohort, range(args.subjects))
        y = rng.standard_normal(args.subjects)
        xs = torch.from_numpy(
            np.stack([np.load(f).astype(np.float32) for f in files])
        ).unsqueeze(1).to(device)
        ys = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32).to(device)
        steps = len(_batches(np.arange(args.subjects), args.batch_size))
        dfrn_best = {m: float("inf") for m in args.modes}
        wait_frac = {m: float("inf") for m in args.modes}
        monai_best = float("inf")
        for r in range(args.rounds):
            for mode in args.modes:
                clear_resident()
                est = DFRNRegressor(epochs=args.epochs, batch_size=args.batch_size,
                                    val_fraction=0.0, seed=r, device=args.device, data=mode)
                h = est.fit(view, y).history_
                # the first epoch of memory holds the cohort read: count it, like a task does
                per_step = float(h["epoch_s"].min()) / steps
                dfrn_best[mode] = min(dfrn_best[mode], per_step)
                wait_frac[mode] = min(wait_frac[mode],
                                      float((h["data_wait_s"] / h["epoch_s"]).mean()))
            monai_best = min(monai_best, monai_step_time(xs, ys, args.batch_size, args.epochs,
                                                         device, r))
        print(f"input {'x'.join(map(str, shape))}, {args.subjects} subjects, batch "
              f"{args.batch_size}, {steps} steps/epoch, device {device}, {args.threads} "
              f"thread(s), best of {args.rounds} rounds x {args.epochs} epochs")
        print(f"bare MONAI ResNet loop (batches in device memory): {monai_best:.3f} s/step")
        for mode in args.modes:
            print(f"dfrn data={mode:<8}: {dfrn_best[mode]:.3f} s/step, ratio "
                  f"{dfrn_best[mode] / monai_best:.3f}, data wait {100 * wait_frac[mode]:.2f}% "
                  "of epoch time")


if __name__ == "__main__":
    main()
