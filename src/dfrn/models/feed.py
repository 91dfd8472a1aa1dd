"""How batches reach the network: the cohort held in memory, prefetching, and the wait.

Three paths, chosen by ``[training] data``; all feed the network the same float32 values in
the same order, so they give the same numbers (bit for bit on the CPU with a fixed seed):

- ``"memory"``: the whole cached cohort is read once per process into one tensor (float16
  when the cache is float16, as it always is for a study: converting float16 to float32 is
  exact, so the values equal today's path). On CUDA it is pinned, and moved to the GPU when
  it takes at most 40% of the GPU's free memory (116 subjects at 1 mm: about 1.7 GB); a
  batch is then a gather on the device. A worker process that trains several tasks of one
  cohort reads it once.
- ``"prefetch"``: a background thread reads and stacks the next batch from the memory maps
  (pinned on CUDA) while the current one trains.
- ``"sync"``: each batch is read when it is needed (the path before this module).
- ``"auto"``: ``"memory"`` when the cohort takes at most a quarter of the RAM, else
  ``"prefetch"``.

:class:`BatchFeeder` measures the time the training loop waits for each batch (host side:
on CUDA a gather from a resident cohort is queued, not waited for), which the regressor
logs per epoch as ``data_wait_s`` in ``history.tsv``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["BatchFeeder", "split_view", "clear_resident", "resident_bytes"]

# one cohort per process: (key, tensor)
_RESIDENT: dict[tuple, torch.Tensor] = {}


def split_view(volumes: Sequence[np.ndarray]) -> tuple[Sequence[np.ndarray], list[int]]:
    """The underlying cohort of a view (an object with ``volumes`` and ``idx``) and the
    positions of the view's items in it; ``(volumes, range)`` for anything else."""
    base = getattr(volumes, "volumes", None)
    idx = getattr(volumes, "idx", None)
    if base is not None and idx is not None:
        return base, [int(i) for i in idx]
    return volumes, list(range(len(volumes)))


def clear_resident() -> None:
    """Drop the cohort this process holds in memory."""
    _RESIDENT.clear()


def resident_bytes(volumes: Sequence[np.ndarray]) -> int:
    """Bytes the whole cohort behind ``volumes`` takes when held in memory."""
    base, _ = split_view(volumes)
    if len(base) == 0:
        return 0
    first = np.asarray(base[0])
    itemsize = 2 if first.dtype == np.float16 else 4
    return int(first.size) * itemsize * len(base)


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _load_batch(volumes: Sequence[np.ndarray], idx: Sequence[int], pin: bool) -> torch.Tensor:
    arr = np.stack([np.asarray(volumes[i], dtype=np.float32) for i in idx])
    t = torch.from_numpy(arr).unsqueeze(1)
    return t.pin_memory() if pin else t


class BatchFeeder:
    """Batches of a sequence of volumes, on a device, by one of the paths above.

    Parameters
    ----------
    volumes : sequence of arrays
        The training (or prediction) volumes; a view of a larger cohort (``volumes``,
        ``idx``) lets ``"memory"`` hold the whole cohort once per process.
    device : torch.device
        Where the network runs.
    mode : {"auto", "memory", "prefetch", "sync"}, default "auto"
    channels_last : bool, default False
        Hand out batches in the channels-last 3D memory format.

    Attributes
    ----------
    mode : str
        The resolved path (never ``"auto"``).
    wait_s : float
        Seconds spent waiting for batches since the last :meth:`reset_wait`.
    """

    def __init__(
        self,
        volumes: Sequence[np.ndarray],
        device: torch.device,
        mode: str = "auto",
        channels_last: bool = False,
    ) -> None:
        if mode not in ("auto", "memory", "prefetch", "sync"):
            raise ValueError(f"data mode {mode!r} is not one of auto, memory, prefetch, sync")
        self.volumes = volumes
        self.device = device
        self.channels_last = channels_last
        self.pin = device.type == "cuda"
        if mode == "auto":
            ram = _ram_bytes()
            mode = "memory" if ram and resident_bytes(volumes) <= ram // 4 else "prefetch"
        self.mode = mode
        self.wait_s = 0.0
        self._store: torch.Tensor | None = None
        self._positions: list[int] = []
        self._pool: ThreadPoolExecutor | None = None
        if mode == "memory":
            self._store, self._positions = self._resident()
        elif mode == "prefetch":
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfrn-prefetch")

    # -- the resident cohort -----------------------------------------------------------
    def _resident(self) -> tuple[torch.Tensor, list[int]]:
        base, positions = split_view(self.volumes)
        files = getattr(base, "files", None)
        key = None
        if files is not None:  # content-keyed cache files: safe to share within a process
            key = (tuple(str(f) for f in files), str(self.device))
            if key in _RESIDENT:
                return _RESIDENT[key], positions
        else:  # an ad hoc list: hold only the items of this view
            base, positions = self.volumes, list(range(len(self.volumes)))
        store = self._stack(base)
        if key is not None:
            _RESIDENT.clear()
            _RESIDENT[key] = store
        return store, positions

    def _stack(self, base: Sequence[np.ndarray]) -> torch.Tensor:
        n = len(base)
        if n == 0:
            return torch.zeros(0)
        first = np.asarray(base[0])
        dtype = np.float16 if first.dtype == np.float16 else np.float32
        arr = np.empty((n, *first.shape), dtype=dtype)
        for i in range(n):
            arr[i] = np.asarray(base[i], dtype=dtype)
        store = torch.from_numpy(arr)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if store.numel() * store.element_size() <= 0.4 * free:
                return store.to(self.device)
            return store.pin_memory()
        return store

    # -- batches -----------------------------------------------------------------------
    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def _gather(self, idx: Sequence[int]) -> torch.Tensor:
        assert self._store is not None
        rows = torch.as_tensor([self._positions[i] for i in idx], dtype=torch.long)
        rows = rows.to(self._store.device)
        x = self._store.index_select(0, rows).to(self.device, non_blocking=True)
        return x.float().unsqueeze(1)

    def batches(self, batches: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        """Yield one input tensor ``(B, 1, D, H, W)`` per batch of positions, in order."""
        if self.mode == "memory":
            for b in batches:
                t0 = time.perf_counter()
                x = self._finish(self._gather(b))
                self.wait_s += time.perf_counter() - t0
                yield x
        elif self.mode == "prefetch":
            assert self._pool is not None
            future = self._pool.submit(_load_batch, self.volumes, batches[0], self.pin) if len(
                batches
            ) else None
            for k in range(len(batches)):
                t0 = time.perf_counter()
                assert future is not None
                x = future.result()
                if k + 1 < len(batches):
                    future = self._pool.submit(_load_batch, self.volumes, batches[k + 1], self.pin)
                x = self._finish(x)
                self.wait_s += time.perf_counter() - t0
                yield x
        else:
            for b in batches:
                t0 = time.perf_counter()
                x = self._finish(_load_batch(self.volumes, b, False))
                self.wait_s += time.perf_counter() - t0
                yield x

    def reset_wait(self) -> float:
        """Return the wait so far and start counting again."""
        wait, self.wait_s = self.wait_s, 0.0
        return wait

    def close(self) -> None:
        """Stop the prefetch thread (the resident cohort stays for the next task)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
