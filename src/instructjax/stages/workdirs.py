"""A stage's directory and the earlier stages it starts from: run records, the tokenizer,
model configs, exported params, and where a stage's data files are."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
from jax.sharding import Mesh

from instructjax.data import tokenizer as tok_lib
from instructjax.model.config import ModelConfig
from instructjax.parallel import mesh as mesh_lib
from instructjax.stages import open_models, resume_check, settings
from instructjax.stages.common import StageError, build_mesh, is_main_process, main_process_first
from instructjax.stages.settings import DataSettings, StageSettings, TokenizerSettings

RUN_INFO = "run_info.json"        # model config + tokenizer of a stage's workdir
TOKENIZER_FILE = "tokenizer.model"


def model_config(model: dict, tokenizer: tok_lib.Tokenizer) -> ModelConfig:
    """ModelConfig from `config.model` (`model`), checked against the tokenizer's vocabulary."""
    try:
        cfg = ModelConfig.from_dict(model)
    except ValueError as err:
        raise StageError(f"config.model: {err}") from err
    check_vocab(cfg, tokenizer)
    return cfg


def check_vocab(cfg: ModelConfig, tokenizer) -> None:
    """Refuses a model whose embedding has fewer rows than the tokenizer has ids."""
    if cfg.vocab_size < tokenizer.vocab_size:
        raise StageError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} ids, {getattr(tokenizer, 'model_path', tokenizer)})")


def ensure_tokenizer(tok: TokenizerSettings, seed: int, workdir: str, corpus_paths: list[str],
                     text_field: str = "text") -> tok_lib.Tokenizer:
    """Loads `tok.path`, or trains one on the `text_field` of `corpus_paths` (once per
    workdir).

    The model file is copied to WORKDIR/tokenizer.model so a stage's workdir is
    self-contained for the stages that initialise from it.
    """
    local = os.path.join(workdir, TOKENIZER_FILE)
    if tok.path:
        tokenizer = tok_lib.load_tokenizer(tok.path)
        # a Hugging Face tokenizer (tokenizer.json directory) is kept as a directory
        name = open_models.TOKENIZER_DIR if os.path.isdir(tok.path) else TOKENIZER_FILE
        if is_main_process() and os.path.abspath(tok.path) != os.path.abspath(
                os.path.join(workdir, name)):
            os.makedirs(workdir, exist_ok=True)
            copy_tokenizer(tok.path, os.path.join(workdir, name), replace=True)
        return tokenizer
    if os.path.exists(local):
        return tok_lib.load_tokenizer(local)
    os.makedirs(workdir, exist_ok=True)
    return tok_lib.train_tokenizer(corpus_paths, local, tok.vocab_size,
                                   model_type=tok.model_type, seed=seed,
                                   max_lines=tok.max_training_lines, text_field=text_field)


def start_stage(config: Any, workdir: str, *, has_progress: bool | None = None
                ) -> StageSettings:
    """What every stage does first: makes WORKDIR, refuses to resume it with changed settings
    (`resume_check`, before anything in WORKDIR changes), and converts the config, once."""
    os.makedirs(workdir, exist_ok=True)
    resume_check.check_resume_config(config, workdir, has_progress=has_progress)
    return settings.from_config(config)


def from_earlier_stage(s: StageSettings, workdir: str, expected: tuple[str, ...]
                       ) -> tuple[ModelConfig, tok_lib.Tokenizer, Mesh]:
    """(ModelConfig, Tokenizer, mesh) of a supervised stage that starts from `s.init_from`
    (one of the `expected` stages); the mesh is checked against the stage's global batch."""
    _, model_cfg, tokenizer = init_from_stage(s.init_from, s.model, workdir, expected)
    # The head counts the mesh must divide are the source model's (an imported model's
    # differ from config.model's preset).
    mesh = build_mesh(s.mesh, model_cfg.to_dict(), global_batch=s.train_batch_size,
                      micro_batches=s.loop.grad_accum_steps)
    return model_cfg, tokenizer, mesh


def tokenizer_name(workdir: str) -> str:
    """The workdir's tokenizer, relative to it: a Hugging Face tokenizer's directory copied
    from an imported model, else our sentencepiece file."""
    hf_dir = os.path.join(workdir, open_models.TOKENIZER_DIR)
    return open_models.TOKENIZER_DIR if os.path.isdir(hf_dir) else TOKENIZER_FILE


def write_run_info(workdir: str, stage: str, model_cfg: ModelConfig, extra: dict | None = None):
    """Records what an earlier stage's checkpoint needs to be loaded by a later stage."""
    if not is_main_process():
        return
    info = {"stage": stage, "model": dataclasses.asdict(model_cfg),
            "tokenizer": tokenizer_name(workdir), **(extra or {})}
    with open(os.path.join(workdir, RUN_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)


def _read_json(path: str, missing: str) -> dict:
    """The JSON object in `path`; StageError(`missing`) when there is no such file."""
    if not os.path.exists(path):
        raise StageError(missing)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_run_info(workdir: str) -> dict:
    """The run record of an earlier stage's workdir (clear error if it is not one)."""
    path = os.path.join(workdir, RUN_INFO)
    return _read_json(path, f"init_from={workdir!r} is not a finished stage workdir "
                            f"({path} missing)")


# Fields of config.model that may differ from the checkpoint a stage starts from: they change
# how the model runs, not its parameters.
RUNTIME_MODEL_FIELDS = ("dtype", "remat_policy", "attention_impl")


def model_config_from(run_info: dict, model: dict) -> ModelConfig:
    """The earlier stage's ModelConfig, with runtime fields taken from `config.model`."""
    shape = dict(run_info["model"])
    shape.update({k: model[k] for k in RUNTIME_MODEL_FIELDS})
    return ModelConfig.from_dict(shape)


def logical_shardings(init_boxed, mesh: Mesh) -> tuple[Any, Any]:
    """(abstract params, NamedShardings) of params created by `init_boxed(rng)`."""
    import flax.linen as nn
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = mesh_lib.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    return nn.meta.unbox(boxed), shardings


def load_params(stage_dir: str, module, mesh: Mesh) -> Any:
    """The params of `module` exported by a finished stage, placed on `mesh` as the
    module's logical axes say."""
    from instructjax.model.transformer import init_boxed_params
    from instructjax.train import checkpoint as ckpt_lib
    abstract, shardings = logical_shardings(lambda rng: init_boxed_params(module, rng), mesh)
    return ckpt_lib.load_params(stage_dir, ckpt_lib.abstract_with_shardings(abstract, shardings))


def load_transformer_params(stage_dir: str, model_cfg: ModelConfig, mesh: Mesh) -> Any:
    """Transformer params exported by a finished earlier stage (or of a Hugging Face
    checkpoint directory), placed on `mesh`."""
    from instructjax.model.transformer import Transformer
    if open_models.is_hf_model_dir(stage_dir):
        return open_models.load_hf_transformer(stage_dir, model_cfg, mesh)
    params = load_params(stage_dir, Transformer(model_cfg), mesh)
    if "trunk" in params and "embed" not in params:
        raise StageError(f"{stage_dir} holds a model with heads, not a bare Transformer")
    return params


def init_from_stage(source: str, model: dict, workdir: str, expected: tuple[str, ...]):
    """(run_info, ModelConfig, Tokenizer) of `source` (`config.init_from`): a finished earlier
    stage, or a Hugging Face checkpoint directory (run_info {"stage": "hf"}); runtime model
    fields come from `model` (`config.model`).

    The tokenizer is copied into `workdir` so this stage's directory is self-contained.
    """
    if not source:
        raise StageError(f"config.init_from is empty: point it at a finished "
                         f"{' or '.join(expected)} stage directory, or set "
                         f"config.init_from_hf to a Hugging Face model directory")
    os.makedirs(workdir, exist_ok=True)
    if open_models.is_hf_model_dir(source):
        name = main_process_first(lambda: open_models.copy_hf_tokenizer(source, workdir),
                                  "hf-tokenizer")
        model_cfg = open_models.hf_model_config(source, model)
        tokenizer = tok_lib.load_tokenizer(os.path.join(workdir, name))
        check_vocab(model_cfg, tokenizer)
        return {"stage": "hf", "tokenizer": name}, model_cfg, tokenizer
    info = read_run_info(source)
    if info.get("stage") not in expected:
        raise StageError(f"init_from={source!r} is a {info.get('stage')!r} stage; "
                         f"this stage starts from {' or '.join(expected)}")
    name = info.get("tokenizer", TOKENIZER_FILE)
    tokenizer = tok_lib.load_tokenizer(os.path.join(source, name))
    copy_tokenizer(os.path.join(source, name), os.path.join(workdir, name))
    return info, model_config_from(info, model), tokenizer


def copy_tokenizer(source: str, target: str, *, replace: bool = False) -> None:
    """Copies a tokenizer file or directory (process 0; an existing copy is kept unless
    `replace`)."""
    if not is_main_process() or (os.path.exists(target) and not replace):
        return
    if os.path.isdir(source):
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copyfile(source, target)



def demo_task_paths(data: DataSettings, workdir: str) -> dict[str, str]:
    """Writes (once, deterministically) the demo dialogue task; returns its file paths."""
    from instructjax.data import demo_task
    return demo_task.write_demo_task(os.path.join(workdir, "data", "demo_task"),
                                     seed=data.demo_seed)


def stage_data_paths(data: DataSettings, workdir: str, demo_train: str, demo_eval: str
                     ) -> tuple[list[str], list[str] | None]:
    """(train paths, eval paths or None) of `config.data`; the demo task's files when empty.

    With data.path but no data.eval_path the builders hold out data.eval_percent instead.
    """
    from instructjax.data import jsonl
    if data.path:
        train = jsonl.resolve_paths(data.path)
        return train, jsonl.resolve_paths(data.eval_path) if data.eval_path else None
    paths = demo_task_paths(data, workdir)
    return [paths[demo_train]], [paths[demo_eval]]


def corpus_paths(data: DataSettings, workdir: str) -> tuple[list[str], list[str] | None]:
    """(train paths, eval paths or None) of a pretraining corpus; the demo corpus when
    data.path is empty (written once, by process 0 first)."""
    from instructjax.data import demo_corpus, jsonl
    if not data.path:
        written = main_process_first(
            lambda: demo_corpus.write_demo_corpus(os.path.join(workdir, "data", "demo"),
                                                  seed=data.demo_seed), "demo_corpus")
        return [written["train"]], [written["eval"]]
    train = jsonl.resolve_paths(data.path)
    return train, jsonl.resolve_paths(data.eval_path) if data.eval_path else None


# The demo task's true-score eval sets, by metric-name prefix (eval/true_score.py):
#   ""          prompts_eval: new prompts (new earlier exchanges, mixed languages) whose final
#               question is one of the problems the training files ask -- held-out prompts
#               of the training distribution, as InstructGPT's evaluations use;
#   "heldout_"  prompts_heldout: problems that no SFT, comparison or PPO file asks
#               (generalisation; only the pretraining corpus states them as facts).
DEMO_EVAL_SETS = {"": "prompts_eval", "heldout_": "prompts_heldout"}


def eval_prompt_sets(data: DataSettings, num_prompts: int, workdir: str):
    """Metric prefix -> the first num_prompts prompts (formats.Prompt) of each demo eval set
    (`DEMO_EVAL_SETS`); None for user data, which has no true score."""
    from instructjax.data import dialogue_sources
    if data.path:
        return None
    paths = demo_task_paths(data, workdir)
    return {prefix: dialogue_sources.read_records(paths[name], "prompt")[0][:num_prompts]
            for prefix, name in DEMO_EVAL_SETS.items()}


REWARD_STATS = "reward_stats.json"  # mean / std of the RM score over SFT samples


def write_reward_stats(workdir: str, stats: dict) -> None:
    """Writes a reward stage's score statistics (process 0 only)."""
    if is_main_process():
        with open(os.path.join(workdir, REWARD_STATS), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)


def read_reward_stats(reward_dir: str) -> dict:
    """{"mean", "std", ...} of a finished reward stage; a clear error when missing."""
    path = os.path.join(reward_dir, REWARD_STATS)
    return _read_json(path, f"{path} is missing: the reward stage did not finish")
