"""The model a chat talks to: a stage workdir of ours or a Hugging Face directory.

A pretrain, SFT or PPO workdir gives its exported params, its tokenizer and the chat
template its run was configured with (WORKDIR/config.json's `chat` section); a Hugging Face
directory gives its weights, its tokenizer and its own chat template when the tokenizer
ships one (else ChatYuan's format).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from instructjax.data import chat_encoding
from instructjax.data import tokenizer as tok_lib
from instructjax.model.config import ModelConfig

CHAT_FORMATS = ("auto", "chatyuan", "model")


@dataclasses.dataclass(frozen=True)
class ChatModel:
    """A loaded model ready to talk: config, params, tokenizer, template, where it came from."""
    model_cfg: ModelConfig
    params: Any
    tokenizer: Any
    template: Any
    source: str


def _stage_chat_section(workdir: str) -> dict:
    """The `chat` section of a stage run's recorded config ({} when none is recorded)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return dict(json.load(f).get("chat") or {})


def _template(tokenizer, chat_format: str, section: dict):
    """The chat template: the tokenizer's own ("model"), ChatYuan's with the run's role names
    ("chatyuan"), or "auto": what the run was configured with, else the tokenizer's own
    template when it has one, else ChatYuan's."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat format {chat_format!r}; choose one of {CHAT_FORMATS}")
    if chat_format == "auto":
        chat_format = section.get("format") or (
            "model" if getattr(tokenizer, "chat_template", None) else "chatyuan")
    if chat_format == "model":
        from instructjax.data import chat_template
        return chat_template.model_chat_template(tokenizer)
    names = {k: section[k] for k in ("user", "assistant") if k in section}
    return chat_encoding.ChatTemplate(**names)


def _single_device_mesh():
    from instructjax.parallel import mesh as mesh_lib
    return mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])


def load_chat_model(path: str, *, chat_format: str = "auto", dtype: str = "float32"
                    ) -> ChatModel:
    """Loads the model in `path` (stage workdir or Hugging Face directory) for chatting.

    Args:
        path: a finished pretrain / SFT / PPO workdir, or a Hugging Face model directory.
        chat_format: "auto", "chatyuan" or "model" (see `_template`).
        dtype: param dtype of an imported Hugging Face model.

    Raises:
        FileNotFoundError / StageError naming the path when it is neither.
    """
    from instructjax.stages import open_models, workdirs
    from instructjax.stages.common import StageError
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model={path!r} is not a directory")
    if open_models.is_hf_model_dir(path):
        from instructjax.model import hf
        params, model_cfg, _ = hf.load_hf(path, dtype=dtype)
        tokenizer = tok_lib.load_tokenizer(path)
        return ChatModel(model_cfg, params, tokenizer, _template(tokenizer, chat_format, {}),
                         path)
    info = workdirs.read_run_info(path)
    if info.get("stage") not in ("pretrain", "sft", "ppo"):
        raise StageError(f"{path} is a {info.get('stage')!r} stage; chat needs a language "
                         "model (a pretrain, sft or ppo workdir, or a Hugging Face directory)")
    model_cfg = ModelConfig.from_dict(info["model"])
    params = workdirs.load_transformer_params(path, model_cfg, _single_device_mesh())
    tokenizer = tok_lib.load_tokenizer(os.path.join(path, info["tokenizer"]))
    template = _template(tokenizer, chat_format, _stage_chat_section(path))
    return ChatModel(model_cfg, params, tokenizer, template, path)
