"""A finished stage's result as a Hugging Face model directory.

Pretrain, SFT and PPO export their policy as `<Family>ForCausalLM`; the reward stage its
model as `<Family>ForSequenceClassification` with one label (the form TRL and OpenRLHF
read). The directory holds config.json, safetensors weights (sharded above a size),
generation_config.json and the tokenizer's files, and loads offline in
`transformers.AutoModelForCausalLM` / `AutoModelForSequenceClassification`. The family is
the one that expresses the model exactly (model/hf/configs.export_family).
"""

from __future__ import annotations

import json
import os

import jax

from instructjax.data import tokenizer as tok_lib
from instructjax.model.config import ModelConfig
from instructjax.parallel import mesh as mesh_lib
from instructjax.stages import workdirs
from instructjax.stages.common import StageError, is_main_process
from instructjax.train import checkpoint as ckpt_lib

# Safetensors files are split above this size (Hugging Face's default shard size is 5 GB).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def export_stage(stage_dir: str, out_dir: str, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Writes the finished stage in `stage_dir` to `out_dir` as a Hugging Face directory.

    Args:
        stage_dir: a pretrain, SFT, reward or PPO workdir whose run finished (its exported
            params exist).
        out_dir: the directory written (created; weights already there are replaced).
        max_shard_bytes: safetensors files are split above this many bytes.

    Returns:
        out_dir.

    Raises:
        StageError: not a stage workdir, a stage without a model, or an unfinished run.
    """
    from instructjax.model import hf
    from instructjax.model.heads import RewardModel
    info = workdirs.read_run_info(stage_dir)
    stage = info.get("stage")
    if stage not in ("pretrain", "sft", "reward", "ppo"):
        raise StageError(f"{stage_dir} is a {stage!r} stage: only pretrain, sft, reward and "
                         "ppo results are models")
    if not os.path.isdir(os.path.join(stage_dir, ckpt_lib.PARAMS_DIR)):
        raise StageError(f"{stage_dir}: the {stage} run has not finished (no "
                         f"{ckpt_lib.PARAMS_DIR}/ yet); resume it, then export")
    model_cfg = ModelConfig.from_dict(info["model"])
    tokenizer = tok_lib.load_tokenizer(os.path.join(stage_dir, info["tokenizer"]))
    # One local device: the export gathers every tensor on this host anyway (every process
    # reads the params, process 0 writes).
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
    if stage == "reward":
        params = workdirs.load_params(stage_dir, RewardModel(model_cfg), mesh)
        save = hf.save_hf_reward
    else:
        params = workdirs.load_transformer_params(stage_dir, model_cfg, mesh)
        save = hf.save_hf
    if is_main_process():
        save(params, model_cfg, out_dir, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
    return out_dir


EXPORT_RECORD = "instructjax_export.json"  # in the export: which params it was written from


def _params_stamp(workdir: str) -> dict:
    path = os.path.abspath(os.path.join(workdir, ckpt_lib.PARAMS_DIR))
    return {"params": path, "mtime_ns": os.stat(path).st_mtime_ns}


def export_if_asked(config, workdir: str) -> None:
    """After a stage ran: exports it to `config.export_hf` when that is set and the run
    finished (a stopped run exports when it is resumed to the end). An export already
    written from the same exported params is kept."""
    from instructjax.stages import settings
    target = settings.from_config(config).export_hf
    if not target or not os.path.isdir(os.path.join(workdir, ckpt_lib.PARAMS_DIR)):
        return
    record = os.path.join(target, EXPORT_RECORD)
    stamp = _params_stamp(workdir)
    if os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            if json.load(f) == stamp:
                return
    export_stage(workdir, target)
    if is_main_process():
        with open(record, "w", encoding="utf-8") as f:
            json.dump(stamp, f)
        print(f"[export] {workdir} -> {target} (Hugging Face format)", flush=True)
