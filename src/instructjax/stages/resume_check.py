"""Resuming a run with the settings it started with: WORKDIR/config.json, recorded on a
fresh start and compared on resume (`check_resume_config`)."""

from __future__ import annotations

import json
import os
from typing import Any

from instructjax.stages.common import StageError, is_main_process


RUN_CONFIG = "config.json"  # the whole resolved config a run started with
# Keys that may change when a run resumes: they change how often things happen, where it
# runs, or how the same math is laid out, never what is trained. A prefix ending in "." covers
# its whole group. `train.steps` may grow (the learning-rate schedule is recomputed for the
# new total, see `check_resume_config`), never shrink below the newest checkpoint.
RESUME_MAY_CHANGE = (
    "train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoint", "train.max_bad_steps",
    "model.remat_policy", "model.attention_impl", "eval.batch_size",
    "dry_run", "mesh.", "distributed.", "hardware.", "export_hf")
# Keys holding file paths: recorded relative to the workdir when they are inside it or a
# sibling of it (the pipeline's `../sft`, `../reward`, `../tokenizer/tokenizer.model`), so a
# run directory given once relative and once absolute, or moved whole, still resumes.
PATH_KEYS = ("init_from", "init_from_hf", "export_hf", "ppo.reward_from", "tokenizer.path",
             "data.path", "data.eval_path",
             "ppo.ptx_data_path")


class ConfigChangedError(StageError):
    """A run is resumed with settings that differ from those it started with."""


def flatten_config(config: Any) -> dict[str, Any]:
    """{"train.steps": 300, ...}: a ConfigDict (or dict) as dotted keys, values as in JSON."""
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    tree = json.loads(json.dumps(tree))  # tuples -> lists, as read back from the file
    flat: dict[str, Any] = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value
    walk(tree, "")
    return flat


def normalize_paths(flat: dict[str, Any], workdir: str) -> dict[str, Any]:
    """`flat` with PATH_KEYS values made relative to `workdir` where they lie in it or in its
    parent directory (at most one `..`), else absolute; empty values stay empty."""
    base = os.path.realpath(workdir)
    out = dict(flat)
    for key in PATH_KEYS:
        value = out.get(key)
        if not isinstance(value, str) or not value or any(c in value for c in "*?["):
            continue
        absolute = os.path.realpath(value)
        relative = os.path.relpath(absolute, base)
        out[key] = relative if not relative.startswith(os.path.join("..", "..")) else absolute
    return out


ABSENT = "<absent>"  # config_changes' value for the side that lacks a key


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} for every key that differs or is one-sided
    (ABSENT stands for the missing side)."""
    absent = ABSENT
    keys = sorted(set(saved) | set(now))
    return {k: (saved.get(k, absent), now.get(k, absent)) for k in keys
            if saved.get(k, absent) != now.get(k, absent)}


def may_change_on_resume(key: str) -> bool:
    """Whether `key` is in RESUME_MAY_CHANGE (exactly, or under one of its prefixes)."""
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed))
               for allowed in RESUME_MAY_CHANGE)


def checkpoint_steps(workdir: str) -> list[int]:
    """Committed checkpoint steps in WORKDIR/checkpoints (orbax's temporary dirs excluded)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def check_resume_config(config: Any, workdir: str, *, has_progress: bool | None = None) -> None:
    """Records the config a run starts with; refuses to resume it with other settings.

    On a fresh start (no checkpoint, or `has_progress` False) WORKDIR/config.json is (re)written.
    When there is progress to resume, the current config is compared with it (paths as
    `normalize_paths` records them): a change to any key outside RESUME_MAY_CHANGE raises
    ConfigChangedError naming every changed key, before anything in WORKDIR is touched. A key
    present on one side only (the schema changed between versions) is accepted with a note. A longer `train.steps` is allowed and announced: the
    schedule is recomputed for the new total, so from the resumed step on the learning rate
    follows the longer schedule (a stretched cosine is higher at that step than the old one
    was, and reaches min_lr_ratio at the new end). A shorter one than the newest checkpoint
    is refused.
    """
    steps = checkpoint_steps(workdir)
    if has_progress is None:
        has_progress = bool(steps)
    path = os.path.join(workdir, RUN_CONFIG)
    now = normalize_paths(flatten_config(config), workdir)
    if not has_progress or not os.path.exists(path):
        if has_progress and is_main_process():
            print(f"note: {workdir} has no recorded config (written by an older version); "
                  f"recording the current one in {path}", flush=True)
        _write_json(path, now)
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    changes = config_changes(saved, now)
    # A key only one side has comes from a schema change between versions, not from the user
    # (a misspelled key is refused before this): taken at its current value, announced.
    schema = {k for k, (a, b) in changes.items() if ABSENT in (a, b)}
    if schema and is_main_process():
        print(f"note: the config schema changed since {workdir} started (keys "
              f"{', '.join(sorted(schema))}); resuming with the current values", flush=True)
    refused = {k: v for k, v in changes.items()
               if k not in schema and not may_change_on_resume(k)}
    if refused:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigChangedError(
            f"{workdir} holds a run started with other settings ({path}); changed since: "
            f"{shown}. Resuming would train on settings the run did not start with: restore "
            f"them, or use a new --workdir. Keys that may change on resume: "
            f"{', '.join(RESUME_MAY_CHANGE)}")
    if "train.steps" in changes and steps:
        old, new = changes["train.steps"]
        if isinstance(new, int) and new < steps[-1]:
            raise ConfigChangedError(
                f"train.steps={new} is below the newest checkpoint of {workdir} (step "
                f"{steps[-1]}); use at least {steps[-1]} or a new --workdir")
        if is_main_process():
            print(f"note: train.steps {old} -> {new}: the learning-rate schedule is "
                  f"recomputed for {new} steps and followed from step {steps[-1]} on",
                  flush=True)
    if changes:
        _write_json(path, now)  # the allowed changes become the run's settings


def _write_json(path: str, content: dict) -> None:
    """Writes `content` atomically (a reader never sees half a file); process 0 only."""
    if not is_main_process():
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1, sort_keys=True, ensure_ascii=False)
    os.replace(tmp, path)
