"""Stages and Hugging Face model directories: start from one, and write a result as one.

A directory with `config.json` and safetensors weights (and no `run_info.json`) is a Hugging
Face checkpoint. `config.init_from_hf` (or `init_from` pointing at such a directory) starts a
stage from it: its shape and family features come from its config.json, the runtime fields
(`dtype`, `remat_policy`, `attention_impl`) and the param layout (`param_dtype`,
`scan_layers`) from `config.model`, and its tokenizer files are copied into the stage's
workdir, so every later stage reads the same tokenizer.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from instructjax.model.config import ModelConfig
from instructjax.stages.common import StageError

HF_CONFIG = "config.json"
RUN_INFO = "run_info.json"
TOKENIZER_DIR = "tokenizer"  # a stage workdir's copy of a Hugging Face tokenizer
# What a Hugging Face directory's tokenizer consists of (the weights are left behind).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")
# Fields of config.model that apply to an imported model: how it runs and how its params
# are laid out and stored, never its shape.
IMPORT_MODEL_FIELDS = ("dtype", "remat_policy", "attention_impl", "param_dtype", "scan_layers")


def is_hf_model_dir(path: str) -> bool:
    """Whether `path` is a Hugging Face checkpoint directory: config.json beside safetensors
    weights. (A stage workdir has a config.json too, the run's config, but no weights
    there and a run_info.json.)"""
    if not path or not os.path.isfile(os.path.join(path, HF_CONFIG)):
        return False
    if os.path.isfile(os.path.join(path, RUN_INFO)):
        return False
    return any(name.endswith(".safetensors") or name == "model.safetensors.index.json"
               for name in os.listdir(path))


def _hf():
    # Imported on use: the stages that never see an open model do not load safetensors.
    from instructjax.model import hf
    return hf


def hf_model_config(model_dir: str, model: dict, *, reward: bool = False) -> ModelConfig:
    """The ModelConfig of a Hugging Face checkpoint, with IMPORT_MODEL_FIELDS from `model`
    (`config.model`). reward=True reads a `...ForSequenceClassification` checkpoint.

    Raises:
        StageError naming the directory and what is unsupported.
    """
    configs = _hf().configs
    try:
        hf_config = configs.read_hf_config(model_dir)
        kinds = configs.SEQUENCE_CLASSIFICATION if reward else configs.CAUSAL_LM
        family, _ = configs.family_of(hf_config, kinds)
        cfg = configs.model_config_from_hf(hf_config, family,
                                           scan_layers=bool(model.get("scan_layers", True)))
        # e.g. attention_impl="pallas" with a Mistral window is refused here, by name
        return cfg.replace(**{k: model[k] for k in IMPORT_MODEL_FIELDS if k in model})
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise StageError(f"{model_dir}: {err}") from err


def copy_hf_tokenizer(model_dir: str, workdir: str) -> str:
    """Copies the tokenizer files of `model_dir` into WORKDIR/tokenizer/, once: a resumed
    run keeps the copy it started with. Every process copies what it does not find (a
    host-local workdir has no process 0 copy); each file lands whole (write, then rename).

    Returns:
        "tokenizer", the path relative to the workdir that run_info.json records.
    """
    present = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, name))]
    if not {"tokenizer.json", "tokenizer.model"} & set(present):
        raise StageError(f"{model_dir} holds no tokenizer.json or tokenizer.model: a Hugging "
                         "Face model needs its tokenizer files to be trained or sampled here")
    target = os.path.join(workdir, TOKENIZER_DIR)
    if os.path.isdir(target):
        return TOKENIZER_DIR
    staging = f"{target}.tmp{os.getpid()}"
    os.makedirs(staging, exist_ok=True)
    for name in present:
        shutil.copyfile(os.path.join(model_dir, name), os.path.join(staging, name))
    try:
        os.rename(staging, target)
    except OSError:  # another process renamed its identical copy first
        shutil.rmtree(staging)
    return TOKENIZER_DIR


def load_hf_transformer(model_dir: str, model_cfg: ModelConfig, mesh) -> Any:
    """Transformer params of a Hugging Face causal LM, in model_cfg.param_dtype and layout,
    each process reading only the slices its devices of `mesh` hold."""
    params, loaded_cfg, _ = _hf().load_hf(model_dir, mesh=mesh, dtype=model_cfg.param_dtype,
                                          scan_layers=model_cfg.scan_layers)
    _check_same_shape(model_dir, loaded_cfg, model_cfg)
    return params


def load_hf_reward(model_dir: str, model: dict, mesh):
    """(ModelConfig, RewardModel params) of a Hugging Face `...ForSequenceClassification`
    with one label, placed on `mesh`."""
    model_cfg = hf_model_config(model_dir, model, reward=True)
    params, loaded_cfg, _ = _hf().load_hf_reward(model_dir, mesh=mesh,
                                                 dtype=model_cfg.param_dtype,
                                                 scan_layers=model_cfg.scan_layers)
    _check_same_shape(model_dir, loaded_cfg, model_cfg)
    return model_cfg, params


def _check_same_shape(model_dir: str, loaded: ModelConfig, expected: ModelConfig) -> None:
    """The loader's config and the stage's agree on everything but IMPORT_MODEL_FIELDS and
    max_seq_len (a defensive check: both read the same config.json)."""
    skip = set(IMPORT_MODEL_FIELDS) | {"max_seq_len"}
    diff = {k: (v, getattr(expected, k)) for k, v in loaded.to_dict().items()
            if k not in skip and getattr(expected, k) != v}
    if diff:
        raise StageError(f"{model_dir}: loaded model config differs from the stage's: {diff}")


# Mixed text the tokenizer check encodes with both tokenizers.
_PROBE_TEXT = "用户：1 加 2 等于多少？\n小元：3。 Hello, world! 🙂"


def check_same_tokenizer(tokenizer, model_dir: str) -> None:
    """Refuses a model directory whose tokenizer encodes differently from `tokenizer` (a
    reward model reading another tokenizer's ids scores nonsense). A directory without
    tokenizer files cannot be checked and is accepted."""
    if not any(os.path.isfile(os.path.join(model_dir, name))
               for name in ("tokenizer.json", "tokenizer.model")):
        return
    from instructjax.data import tokenizer as tok_lib
    theirs = tok_lib.load_tokenizer(model_dir)
    if theirs.encode(_PROBE_TEXT) != tokenizer.encode(_PROBE_TEXT):
        raise StageError(f"{model_dir}'s tokenizer encodes text differently from the policy's: "
                         "the reward model must read the policy's token ids")
