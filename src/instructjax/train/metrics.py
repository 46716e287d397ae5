"""Metric logging: `metrics.jsonl`, TensorBoard event files and a progress line with ETA.

Only process 0 writes (multi-host runs call this on every process; the others are no-ops).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np


def _to_python(value: Any) -> Any:
    arr = np.asarray(value)
    if arr.ndim == 0:
        item = arr.item()
        return item if not isinstance(item, float) or math.isfinite(item) else str(item)
    return arr.tolist()


class MetricsWriter:
    """Writes one JSON object per row to `workdir/metrics.jsonl` and scalars to TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter  # lazy: absent on some accelerator images
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops rows with step > `step` (left by a run killed after its last checkpoint).

        On resume the steps after the checkpoint are recomputed; keeping their old rows would
        log them twice.
        """
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            rows = [line for line in f if line.strip()]
        kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Appends one row `{"step", "split", **metrics}` and mirrors it to TensorBoard."""
        if not self.enabled:
            return
        row = {"step": int(step), "split": split}
        row.update({k: _to_python(v) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self._tb is not None:
            for name, value in row.items():
                if name in ("step", "split") or not isinstance(value, (int, float)):
                    continue
                self._tb.add_scalar(f"{split}/{name}", value, int(step))

    def flush(self) -> None:
        """Flushes TensorBoard events."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the event writer (again: a no-op)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(workdir_or_path: str) -> list[dict]:
    """Rows of a `metrics.jsonl` (a workdir or the file itself)."""
    path = workdir_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A one-line progress report with steps/s, tokens/s and the estimated time left."""

    def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True, stage: str = ""):
        self.total, self.start_step, self.enabled, self.stage = total_steps, start_step, enabled, stage
        self.t0 = time.perf_counter()

    def report(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Prints `[stage] step s/N loss .. | steps/s | tokens/s | ETA`."""
        if not self.enabled:
            return
        done = max(step - self.start_step, 1)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step)
        parts = [f"[{self.stage}] step {step}/{self.total}"]
        for name in ("loss", "accuracy", "score", "kl", "grad_norm", "lr"):
            if name in metrics:
                parts.append(f"{name} {float(metrics[name]):.4g}")
        if "steps_per_sec" in metrics:
            parts.append(f"{float(metrics['steps_per_sec']):.2f} steps/s")
        if "tokens_per_sec" in metrics:
            parts.append(f"{float(metrics['tokens_per_sec']):.0f} tok/s")
        parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
        print(" | ".join(parts), file=sys.stdout, flush=True)
