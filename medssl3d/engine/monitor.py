"""Training progress for people (tqdm bar or periodic log lines) and for tools (TensorBoard, JSONL)."""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

TB_DIR = "tb"
METRICS_FILE = "metrics.jsonl"


class TrainingMonitor:
    """Shows progress and records scalars; every method is a no-op when ``enabled`` is False.

    On a TTY a tqdm bar shows steps/s, ETA and the loss; otherwise each :meth:`record` (every
    ``log_every`` steps, called by the trainer) logs an INFO line with the same information.
    Scalars go to TensorBoard under ``out_dir/tb`` (when ``tensorboard``) and, one JSON object per line, to
    ``out_dir/metrics.jsonl`` (appended across resumes; the last line for a step wins).

    Args:
        out_dir: run folder.
        total_steps: steps of the whole run.
        start_step: step the run (re)starts from.
        enabled: False on ranks other than 0.
        tensorboard: write TensorBoard event files.
    """

    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        start_step: int,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self.total, self.start = total_steps, start_step
        self.t0 = time.perf_counter()
        self._last_time, self._last_step = self.t0, start_step
        self.bar = self.writer = self.jsonl = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / TB_DIR))
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def rate(self, step: int) -> float:
        """Average steps per second since the (re)start."""
        elapsed = time.perf_counter() - self.t0
        return (step - self.start) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, loss: float) -> None:
        """Advance the bar to ``step`` (optimizer steps done) and show the loss."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def record(self, step: int, epoch: int, scalars: dict[str, float], samples_per_step: int) -> None:
        """Log a line (without a bar) and write ``scalars`` plus throughput to TensorBoard and JSONL.

        Args:
            step: optimizer steps done.
            epoch: current epoch.
            scalars: name → value; names without a "/" are filed under "train/".
            samples_per_step: samples per optimizer step over all processes (for samples/s).
        """
        if not self.enabled:
            return
        now = time.perf_counter()
        window = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        record = dict(scalars)
        record["perf/steps_per_s"] = window
        record["perf/samples_per_s"] = window * samples_per_step
        if self.writer is not None:
            for key, value in record.items():
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        self.jsonl.write(json.dumps({"step": step, "epoch": epoch, **record}) + "\n")
        if self.bar is None:
            rate = self.rate(step)
            eta = (self.total - step) / rate if rate > 0 else math.inf
            eta_s = str(datetime.timedelta(seconds=round(eta))) if math.isfinite(eta) else "?"
            logger.info(
                "step %d/%d (%.1f%%) epoch %d loss %.4f | %.2f steps/s | ETA %s",
                step, self.total, 100.0 * step / max(self.total, 1), epoch,
                scalars.get("loss", math.nan), rate, eta_s,
            )

    def close(self) -> None:
        """Flush and close the bar, the event writer and the JSONL file."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.bar = self.writer = self.jsonl = None
