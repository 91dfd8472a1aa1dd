"""GPU benchmark: full-resolution training step, memory, images/s, and the paper's wall time.

Run on a GPU machine (under 8 minutes on one modern GPU):

    python benchmarks/bench_gpu.py                 # 182x218x182, batch 4, cuda
    python benchmarks/bench_gpu.py --no-compile    # skip the torch.compile row (slow to build)
    python benchmarks/bench_gpu.py --smoke         # tiny input on whatever device: code path only

Measures dfrn's network (DFRN, Adam fused, sum of squared errors) with batches already on the
device, one row per setting:

- fp32; bf16 autocast (dfrn's default on CUDA), with ``cudnn.benchmark`` off (dfrn's choice,
  for determinism) and on (the speed that choice costs); bf16 + ``channels_last_3d``;
  bf16 + ``torch.compile`` — the step time, peak GPU memory and images/s of each;
- 5 networks trained at once on one GPU (5 threads with their own CUDA streams: what 5 Ray
  tasks with ``gpus_per_task = 0.2`` do) against 1, as aggregate images/s.

It then projects the wall time of the paper's protocol (5 factors x 10 folds x 5 repeats =
250 trainings of at most 50 epochs, 116 subjects: about 94 training and 10 validation
subjects per training) on 1 GPU and on 8, with 1 task per GPU and with 5 fractional tasks
per GPU. The projection is an upper bound (early stopping usually ends trainings sooner).
"""

from __future__ import annotations

import argparse
import math
import resource
import threading
import time

import torch

from dfrn.models.network import DFRN

TRAININGS = 250
EPOCHS = 50
N_TRAIN, N_VAL = 94, 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(device: torch.device, shape, batch: int, steps: int, dtype, channels_last=False,
              compile_=False, benchmark=False) -> tuple[float, float]:
    """Seconds per training step and peak memory (GiB) of one network."""
    torch.backends.cudnn.benchmark = benchmark
    torch.manual_seed(0)
    net = DFRN().to(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    model = torch.compile(net) if compile_ else net
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=device.type in ("cuda", "cpu"))
    x = torch.randn(batch, 1, *shape, device=device).contiguous(memory_format=fmt)
    y = torch.randn(batch, 1, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = model(x)
        loss = torch.sum((pred.float() - y) ** 2)
        loss.backward()
        opt.step()

    for _ in range(3 if compile_ else 2):  # warm-up (and compilation)
        one()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    per = (time.perf_counter() - t) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    torch.backends.cudnn.benchmark = False
    return per, peak


def concurrent_images_per_s(device: torch.device, shape, batch: int, steps: int, n: int,
                            dtype) -> float:
    """Aggregate images/s of ``n`` networks trained at once (own threads and streams)."""
    nets = []
    for k in range(n):
        torch.manual_seed(k)
        net = DFRN().to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=device.type in ("cuda", "cpu"))
        x = torch.randn(batch, 1, *shape, device=device)
        nets.append((net, opt, x))
    barrier = threading.Barrier(n + 1)

    def work(net, opt, x) -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        with ctx:
            for i in range(steps + 1):
                if i == 1:
                    _sync(device)
                    barrier.wait()
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    pred = net(x)
                torch.sum(pred.float() ** 2).backward()
                opt.step()
            if stream is not None:
                stream.synchronize()

    threads = [threading.Thread(target=work, args=a) for a in nets]
    for th in threads:
        th.start()
    barrier.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    return n * steps * batch / (time.perf_counter() - t)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[182, 218, 182])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny input, 2 steps: code path only")
    args = ap.parse_args()
    if args.smoke:
        args.shape, args.steps = [24, 28, 24], 2
    device = torch.device(args.device)
    shape = tuple(args.shape)
    bf16 = torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        bf16 = torch.float16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; input {'x'.join(map(str, shape))}, batch {args.batch}, "
          f"{args.steps} timed steps per row; torch {torch.__version__}")
    rows = [("fp32", torch.float32, {}), ("bf16 (dfrn default)", bf16, {}),
            ("bf16, cudnn.benchmark on", bf16, {"benchmark": True}),
            ("bf16, channels_last_3d", bf16, {"channels_last": True})]
    if not args.no_compile:
        rows.append(("bf16, torch.compile", bf16, {"compile_": True}))
    results = {}
    print(f"{'setting':<28} {'s/step':>8} {'images/s':>9} {'peak GiB':>9}")
    for label, dtype, kw in rows:
        try:
            per, peak = step_time(device, shape, args.batch, args.steps, dtype, **kw)
        except Exception as exc:  # noqa: BLE001 - report and go on (e.g. no compiler)
            print(f"{label:<28} failed: {str(exc).splitlines()[0][:80]}")
            continue
        results[label] = per
        print(f"{label:<28} {per:8.3f} {args.batch / per:9.1f} {peak:9.2f}")
    base = results["bf16 (dfrn default)"]
    if "bf16, cudnn.benchmark on" in results:
        cost = base / results["bf16, cudnn.benchmark on"]
        print(f"determinism (cudnn.benchmark off) costs {100 * (cost - 1):.1f}% step time")

    one = concurrent_images_per_s(device, shape, args.batch, args.steps, 1, bf16)
    five = concurrent_images_per_s(device, shape, args.batch, args.steps, 5, bf16)
    print(f"1 network: {one:.1f} images/s; 5 networks at once: {five:.1f} images/s "
          f"({five / one:.2f}x)")

    steps = math.ceil(N_TRAIN / args.batch)
    val_steps = math.ceil(N_VAL / max(args.batch, 2))
    training_s = EPOCHS * (steps * base + val_steps * base / 3)  # forward ~1/3 of a step
    print(f"paper protocol: {TRAININGS} trainings x {EPOCHS} epochs x {steps} steps (bf16), "
          f"at most {_hours(training_s)} per training")
    for gpus in (1, 8):
        for per_gpu, speed in ((1, 1.0), (5, five / one)):
            wall = TRAININGS * training_s / (gpus * speed)
            print(f"  {gpus} GPU(s), {per_gpu} task(s) per GPU "
                  f"(gpus_per_task = {1 / per_gpu:g}): {_hours(wall)}")


if __name__ == "__main__":
    main()
