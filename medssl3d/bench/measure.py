"""Measuring a training step: median wall time, FLOPs, a dense-matmul peak, peak memory.

Every figure of ``bench step`` comes from these helpers, measured in the benchmark's own process
at its precision and device, so that ratios (achieved ÷ peak, method ÷ baseline) compare like with
like on a shared, noisy machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = [
    "DEFAULT_REPEATS",
    "DEFAULT_WARMUP",
    "EXTRA_FLOP_FORMULAS",
    "PeakMemory",
    "Timing",
    "count_flops",
    "matmul_flops",
    "matmul_peak_gflops",
    "release_memory",
    "synchronize",
    "time_call",
]

DEFAULT_WARMUP = 1
DEFAULT_REPEATS = 5
MIN_REPEATS = 1
# Square matmul sides for the peak: large enough to reach the plateau, small enough to take < 1 s.
MATMUL_SIDE = {"cpu": 2048, "cuda": 8192}
MATMUL_WARMUP = 2
MATMUL_REPEATS = 7
MEMORY_POLL_S = 0.005  # RSS sampling period on CPU
MIB = 2**20
GIGA = 1e9


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a wall-clock interval covers it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls, in seconds.

    Attributes:
        times: one wall time per timed call (after the warm-up).
    """

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median over the timed calls."""
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max − min) ÷ median: how noisy the repeats were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0


def time_call(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones, each bracketed by a device sync.

    Args:
        fn: the work to time (one training step).
        device: device whose queue is drained before and after each call.
        warmup: untimed calls first (allocator, caches, autotuning).
        repeats: timed calls; quote the median.

    Raises:
        ValueError: ``warmup < 0`` or ``repeats < 1``.
    """
    if warmup < 0 or repeats < MIN_REPEATS:
        raise ValueError(f"need warmup >= 0 and repeats >= {MIN_REPEATS}, got warmup={warmup}, repeats={repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# Fused attention kernels torch's counter has no formula for (it would count them as 0 FLOPs):
# the CPU flash kernels, counted like the GPU ones.
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``fn`` (forward and backward), from ``torch.utils.flop_counter``.

    Counts the ops torch has formulas for (matmuls, convolutions, attention, plus the CPU flash
    attention kernels of :data:`EXTRA_FLOP_FORMULAS`); element-wise work, norms and the optimizer
    are not counted, as usual for FLOP figures. Work a kernel really does is counted, so an attention
    backward that recomputes the scores counts that recomputation.
    """
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_flops(n: int) -> int:
    """FLOPs of one ``(n, n) @ (n, n)`` matmul: ``2 n³`` (a multiply and an add per term)."""
    return 2 * n**3


def matmul_peak_gflops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    n: int | None = None,
    warmup: int = MATMUL_WARMUP,
    repeats: int = MATMUL_REPEATS,
) -> float:
    """Dense square-matmul throughput in GFLOP/s: the peak a training step's achieved rate is compared to.

    Args:
        device: where to multiply.
        dtype: the step's compute dtype (bf16 under bf16 autocast).
        n: matrix side (default: :data:`MATMUL_SIDE` for the device type).
        warmup: untimed products first.
        repeats: timed products; the median time is used.
    """
    device = torch.device(device)
    n = MATMUL_SIDE.get(device.type, MATMUL_SIDE["cuda"]) if n is None else n
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    timing = time_call(lambda: torch.mm(a, b), device=device, warmup=warmup, repeats=repeats)
    return matmul_flops(n) / timing.median / GIGA


def release_memory(device: torch.device | str = "cpu") -> None:
    """Return freed memory before a measurement: garbage-collect, empty the CUDA cache, trim glibc's heap."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        return
    # glibc keeps freed heap pages mapped, so the next model's RSS would include the last one's.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory while the ``with`` block runs.

    On a GPU, ``torch.cuda.max_memory_allocated``; on a CPU, the process's resident set size,
    sampled every :data:`MEMORY_POLL_S` s. After the block, :attr:`peak_mib` holds the peak in MiB.
    The CPU figure is the whole process's RSS (interpreter, libraries and every live tensor), not
    just the step's.

    Args:
        device: the device the work runs on.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._peak_bytes = 0

    def _poll(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self._peak_bytes = max(self._peak_bytes, proc.memory_info().rss)
            self._stop.wait(MEMORY_POLL_S)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._peak_bytes = psutil.Process().memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="rss-poll", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB
            return
        self._stop.set()
        self._thread.join()
        self._peak_bytes = max(self._peak_bytes, psutil.Process().memory_info().rss)
        self.peak_mib = self._peak_bytes / MIB
