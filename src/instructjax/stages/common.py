"""Pieces every stage needs: errors, mesh, tokenizer, model config, run records."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, TypeVar

import jax
from jax.sharding import Mesh

from instructjax.data import tokenizer as tok_lib
from instructjax.model.config import ModelConfig
from instructjax.parallel import mesh as mesh_lib

RUN_INFO = "run_info.json"        # model config + tokenizer of a stage's workdir
TOKENIZER_FILE = "tokenizer.model"


class StageError(ValueError):
    """A user-facing problem with a stage's config or inputs (printed as one line)."""


def is_main_process() -> bool:
    """True on the process that writes logs, summaries and run records."""
    return jax.process_index() == 0


def initialize_distributed(dist: Any) -> bool:
    """Starts multi-process JAX from `config.distributed`; returns whether it did.

    With `dist.enabled` and a `coordinator_address` ("host:port"), every process passes the
    same address and `num_processes` and its own `process_id`. With an empty address JAX
    finds them itself: the JAX_COORDINATOR_ADDRESS environment variable or a supported
    cluster (SLURM, Open MPI, Cloud TPU, GKE). Call once, before anything touches a device.
    """
    if not dist.enabled:
        return False
    if dist.coordinator_address:
        if not 0 <= int(dist.process_id) < int(dist.num_processes):
            raise StageError(f"distributed.process_id={dist.process_id} must be in "
                             f"[0, distributed.num_processes={dist.num_processes})")
        jax.distributed.initialize(str(dist.coordinator_address), int(dist.num_processes),
                                   int(dist.process_id))
    else:
        jax.distributed.initialize()
    return True


T = TypeVar("T")


def main_process_first(fn: Callable[[], T], name: str) -> T:
    """Runs `fn` on process 0, then on the others, then lets everyone go on.

    For preparing files in a shared workdir (demo data, TFDS builds): process 0 writes them
    alone, the others find them there (or write their own copy on a host-local disk), and no
    process reads a file another one is still writing. `name` labels the barriers.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils
    result = fn() if is_main_process() else None
    multihost_utils.sync_global_devices(f"{name}:main-done")
    if not is_main_process():
        result = fn()
    multihost_utils.sync_global_devices(f"{name}:all-done")
    return result


def build_mesh(config: Any) -> Mesh:
    """The device mesh of `config.mesh`, checked against the batch and head counts."""
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    mesh_lib.check_fits(mesh, global_batch=int(config.train.batch_size),
                        num_heads=int(config.model.num_heads),
                        num_kv_heads=int(config.model.num_kv_heads),
                        micro_batches=int(config.train.grad_accum_steps))
    return mesh


def model_config(config: Any, tokenizer: tok_lib.Tokenizer) -> ModelConfig:
    """ModelConfig from `config.model`, checked against the tokenizer's vocabulary."""
    try:
        cfg = ModelConfig.from_dict(config.model.to_dict())
    except ValueError as err:
        raise StageError(f"config.model: {err}") from err
    if cfg.vocab_size < tokenizer.vocab_size:
        raise StageError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} pieces, {tokenizer.model_path})")
    return cfg


def ensure_tokenizer(config: Any, workdir: str, corpus_paths: list[str]) -> tok_lib.Tokenizer:
    """Loads `config.tokenizer.path`, or trains one on `corpus_paths` (once per workdir).

    The model file is copied to WORKDIR/tokenizer.model so a stage's workdir is
    self-contained for the stages that initialise from it.
    """
    local = os.path.join(workdir, TOKENIZER_FILE)
    if config.tokenizer.path:
        tokenizer = tok_lib.load_tokenizer(config.tokenizer.path)
        if is_main_process() and os.path.abspath(config.tokenizer.path) != os.path.abspath(local):
            os.makedirs(workdir, exist_ok=True)
            shutil.copyfile(config.tokenizer.path, local)
        return tokenizer
    if os.path.exists(local):
        return tok_lib.load_tokenizer(local)
    os.makedirs(workdir, exist_ok=True)
    return tok_lib.train_tokenizer(
        corpus_paths, local, int(config.tokenizer.vocab_size),
        model_type=str(config.tokenizer.model_type), seed=int(config.seed),
        max_lines=int(config.tokenizer.max_training_lines))


def write_run_info(workdir: str, stage: str, model_cfg: ModelConfig, extra: dict | None = None):
    """Records what an earlier stage's checkpoint needs to be loaded by a later stage."""
    if not is_main_process():
        return
    info = {"stage": stage, "model": dataclasses.asdict(model_cfg), "tokenizer": TOKENIZER_FILE,
            **(extra or {})}
    with open(os.path.join(workdir, RUN_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)


def read_run_info(workdir: str) -> dict:
    """The run record of an earlier stage's workdir (clear error if it is not one)."""
    path = os.path.join(workdir, RUN_INFO)
    if not os.path.exists(path):
        raise StageError(f"init_from={workdir!r} is not a finished stage workdir ({path} missing)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# Fields of config.model that may differ from the checkpoint a stage starts from: they change
# how the model runs, not its parameters.
RUNTIME_MODEL_FIELDS = ("dtype", "remat_policy", "attention_impl")


def model_config_from(run_info: dict, config: Any) -> ModelConfig:
    """The earlier stage's ModelConfig, with runtime fields taken from `config.model`."""
    shape = dict(run_info["model"])
    shape.update({k: config.model[k] for k in RUNTIME_MODEL_FIELDS})
    return ModelConfig.from_dict(shape)


def logical_shardings(init_boxed, mesh: Mesh) -> tuple[Any, Any]:
    """(abstract params, NamedShardings) of params created by `init_boxed(rng)`."""
    import flax.linen as nn
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = mesh_lib.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    return nn.meta.unbox(boxed), shardings


def load_transformer_params(stage_dir: str, model_cfg: ModelConfig, mesh: Mesh) -> Any:
    """Transformer params exported by a finished earlier stage, placed on `mesh`."""
    import jax.numpy as jnp
    from instructjax.model.transformer import Transformer
    from instructjax.train import checkpoint as ckpt_lib
    model = Transformer(model_cfg)
    abstract, shardings = logical_shardings(
        lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"], mesh)
    target = ckpt_lib.abstract_with_shardings(abstract, shardings)
    params = ckpt_lib.load_params(stage_dir, target)
    if "trunk" in params and "embed" not in params:
        raise StageError(f"{stage_dir} holds a model with heads, not a bare Transformer")
    return params


def init_from_stage(config: Any, workdir: str, expected: tuple[str, ...]):
    """(run_info, ModelConfig, Tokenizer) of `config.init_from`, a finished earlier stage.

    The tokenizer is copied into `workdir` so this stage's directory is self-contained.
    """
    source = config.init_from
    if not source:
        raise StageError(f"config.init_from is empty: point it at a finished "
                         f"{' or '.join(expected)} stage directory")
    info = read_run_info(source)
    if info.get("stage") not in expected:
        raise StageError(f"init_from={source!r} is a {info.get('stage')!r} stage; "
                         f"this stage starts from {' or '.join(expected)}")
    tokenizer_path = os.path.join(source, info.get("tokenizer", TOKENIZER_FILE))
    tokenizer = tok_lib.load_tokenizer(tokenizer_path)
    os.makedirs(workdir, exist_ok=True)
    local = os.path.join(workdir, TOKENIZER_FILE)
    if is_main_process() and not os.path.exists(local):
        shutil.copyfile(tokenizer_path, local)
    return info, model_config_from(info, config), tokenizer


def demo_task_paths(config: Any, workdir: str) -> dict[str, str]:
    """Writes (once, deterministically) the demo dialogue task; returns its file paths."""
    from instructjax.data import demo
    return demo.write_demo_task(os.path.join(workdir, "data", "demo_task"),
                                seed=int(config.data.demo_seed))


def stage_data_paths(config: Any, workdir: str, demo_train: str, demo_eval: str
                     ) -> tuple[list[str], list[str] | None]:
    """(train paths, eval paths or None) of `config.data`; the demo task's files when empty.

    With data.path but no data.eval_path the builders hold out data.eval_percent instead.
    """
    from instructjax.data import jsonl
    if config.data.path:
        train = jsonl.resolve_paths(config.data.path)
        return train, jsonl.resolve_paths(config.data.eval_path) if config.data.eval_path else None
    paths = demo_task_paths(config, workdir)
    return [paths[demo_train]], [paths[demo_eval]]


# ------------------------------------------------------------------------------ resume checks

RUN_CONFIG = "config.json"  # the whole resolved config a run started with
# Keys that may change when a run resumes: they change how often things happen, where it
# runs, or how the same math is laid out, never what is trained. A prefix ending in "." covers
# its whole group. `train.steps` may grow (the learning-rate schedule is recomputed for the
# new total, see `check_resume_config`), never shrink below the newest checkpoint.
RESUME_MAY_CHANGE = (
    "train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoint", "train.max_bad_steps",
    "model.remat_policy", "model.attention_impl", "eval.batch_size",
    "dry_run", "mesh.", "distributed.", "hardware.")
# Keys holding file paths: recorded relative to the workdir when they are inside it or a
# sibling of it (the pipeline's `../sft`, `../reward`, `../tokenizer/tokenizer.model`), so a
# run directory given once relative and once absolute, or moved whole, still resumes.
PATH_KEYS = ("init_from", "ppo.reward_from", "tokenizer.path", "data.path", "data.eval_path",
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
