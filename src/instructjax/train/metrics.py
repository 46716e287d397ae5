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


NONFINITE = "nonfinite"  # JSONL key: {metric: "nan" | "inf" | "-inf"} for the nulls of a row


def _to_python(value: Any) -> Any:
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr.tolist()


def encode_row(row: Mapping[str, Any]) -> dict:
    """A metrics row as strict JSON: NaN / inf scalars become null, named under NONFINITE.

    JSON has no NaN; writing it as a string (as before) hid divergence from every reader.
    """
    out, flags = {}, {}
    for name, value in row.items():
        value = _to_python(value)
        if isinstance(value, float) and not math.isfinite(value):
            flags[name] = str(value)  # "nan", "inf" or "-inf"
            value = None
        out[name] = value
    if flags:
        out[NONFINITE] = flags
    return out


def decode_row(row: Mapping[str, Any]) -> dict:
    """Inverse of `encode_row`: the nulls named under NONFINITE become float NaN / inf."""
    out = {k: v for k, v in row.items() if k != NONFINITE}
    for name, text in row.get(NONFINITE, {}).items():
        out[name] = float(text)
    return out


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

    def start_fresh(self) -> str | None:
        """A run starting at step 0 keeps no rows of an earlier attempt: an existing
        metrics.jsonl (a run killed before its first checkpoint, or whose checkpoints were all
        unreadable) is moved aside to `metrics.jsonl.previous-<time>`, never deleted.
        Returns the new name, or None when there was nothing to move."""
        if not self.enabled or not os.path.exists(self.path) or not os.path.getsize(self.path):
            return None
        aside = f"{self.path}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(self.path, aside)
        print(f"note: {self.path} held rows of an earlier attempt; moved to {aside}", flush=True)
        return aside

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Appends one row `{"step", "split", **metrics}` and mirrors it to TensorBoard."""
        if not self.enabled:
            return
        row = {"step": int(step), "split": split}
        row.update({k: _to_python(v) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(encode_row(row), ensure_ascii=False, allow_nan=False) + "\n")
        if self._tb is not None:
            for name, value in row.items():  # TensorBoard stores NaN / inf as numbers
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
    """Rows of a `metrics.jsonl` (a workdir or the file itself), non-finite values as floats."""
    path = workdir_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [decode_row(json.loads(line)) for line in f if line.strip()]


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
