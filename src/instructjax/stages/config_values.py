"""Range checks of config values, run before a stage touches anything.

The schema (configs/base.py) catches misspelled keys; this catches values no run can use
(a zero batch, a negative learning rate, top_p of 2), which would otherwise surface as a
division by zero, a shape error deep inside jit, or, worse, a run that trains quietly on
nonsense. Every violation is reported at once, each naming its key and the valid range.
"""

from __future__ import annotations

from typing import Any, Callable

from instructjax.stages.common import StageError

Rule = tuple[str, Callable[[Any], bool], str]


def _at_least(bound: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= bound), f">= {bound}"


def _positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > 0), "> 0"


def _within(low: float, high: float, *, high_open: bool = False, low_open: bool = False
            ) -> tuple[Callable[[Any], bool], str]:
    def ok(v):
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return ok, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"one of {list(choices)}"


def _rules() -> list[Rule]:
    spec = {
        "seed": _at_least(0),
        "train.steps": _at_least(1), "train.batch_size": _at_least(1),
        "train.learning_rate": _positive(), "train.warmup_steps": _at_least(0),
        "train.decay": _one_of("cosine", "linear", "constant"),
        "train.min_lr_ratio": _within(0, 1), "train.weight_decay": _at_least(0),
        "train.b1": _within(0, 1, high_open=True), "train.b2": _within(0, 1, high_open=True),
        "train.eps": _positive(), "train.grad_clip": _at_least(0),
        "train.grad_accum_steps": _at_least(1), "train.eval_every": _at_least(1),
        "train.eval_batches": _at_least(1), "train.log_every": _at_least(1),
        "train.checkpoint_every": _at_least(1), "train.keep_checkpoints": _at_least(1),
        "train.max_bad_steps": _at_least(0),
        "data.seq_len": _at_least(2), "data.eval_percent": _within(0, 100, high_open=True),
        "tokenizer.vocab_size": _at_least(16), "tokenizer.max_training_lines": _at_least(1),
        "tokenizer.model_type": _one_of("bpe", "unigram"),
        "chat.max_turns": _at_least(1),
        "reward.num_responses": ((lambda v: v == 0 or v >= 2), "0 (the data's largest K) or >= 2"),
        "reward.stats_samples": _at_least(1),
        "ppo.prompts_per_iteration": _at_least(1), "ppo.num_samples": _at_least(1),
        "ppo.minibatch_size": _at_least(1), "ppo.epochs": _at_least(1),
        "ppo.max_prompt_len": _at_least(3), "ppo.max_new_tokens": _at_least(1),
        "ppo.temperature": _positive(), "ppo.top_k": _at_least(0),
        "ppo.top_p": _within(0, 1, low_open=True),
        "ppo.gamma": _within(0, 1), "ppo.lam": _within(0, 1),
        "ppo.clip_eps": _positive(), "ppo.value_clip_eps": _positive(),
        "ppo.vf_coef": _at_least(0), "ppo.entropy_coef": _at_least(0),
        "ppo.kl_estimator": _one_of("k1", "k3"), "ppo.kl_controller": _one_of("adaptive", "fixed"),
        "ppo.init_kl_coef": _at_least(0), "ppo.kl_target": _positive(),
        "ppo.kl_horizon": _positive(), "ppo.reward_clip": _at_least(0),
        "ppo.ptx_coef": _at_least(0), "ppo.ptx_batch_size": _at_least(1),
        "ppo.critic_learning_rate": _positive(),
        "ppo.frozen_dtype": _one_of("float32", "bfloat16", "float16"),
        "chat.format": _one_of("chatyuan", "model"),
        "eval.num_prompts": _at_least(1), "eval.batch_size": _at_least(1),
        "eval.max_prompt_len": _at_least(3), "eval.max_new_tokens": _at_least(1),
        "eval.temperature": _positive(), "eval.top_k": _at_least(0),
        "eval.top_p": _within(0, 1, low_open=True), "eval.num_samples": _at_least(1),
        "mesh.data": ((lambda v: v == -1 or v >= 1), "-1 (the remaining devices) or >= 1"),
        "mesh.fsdp": ((lambda v: v == -1 or v >= 1), "-1 (the remaining devices) or >= 1"),
        "mesh.tensor": ((lambda v: v == -1 or v >= 1), "-1 (the remaining devices) or >= 1"),
    }
    return [(key, check, text) for key, (check, text) in spec.items()]


RULES = _rules()


def _lookup(config: Any, dotted: str) -> tuple[bool, Any]:
    node = config
    for key in dotted.split("."):
        if not hasattr(node, "keys") or key not in node:
            return False, None
        node = node[key]
    return True, node


def value_problems(config: Any, prefix: str = "") -> list[str]:
    """'key=value must be RANGE' for every value of `config` outside its range.

    A pipeline config is checked stage by stage (keys named `stages.<stage>.<key>`).
    """
    problems = []
    for key, ok, allowed in RULES:
        present, value = _lookup(config, key)
        if not present:
            continue
        try:
            good = ok(value)
        except TypeError:  # e.g. a string where a number belongs
            good = False
        if not good:
            problems.append(f"{prefix}{key}={value!r} must be {allowed}")
    if "stages" in config:
        for name in config.stages:
            problems += value_problems(config.stages[name], f"{prefix}stages.{name}.")
    return problems


def check_values(config: Any) -> None:
    """Raises StageError naming every out-of-range value (key, value and valid range)."""
    problems = value_problems(config)
    if problems:
        raise StageError("invalid config value(s): " + "; ".join(problems))
