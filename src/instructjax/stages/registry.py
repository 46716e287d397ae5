"""Maps `config.stage` to the function that runs it."""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

from instructjax.stages.common import StageError

# stage name -> module with `run(config, workdir)`; imported lazily so that a stage's heavy
# dependencies load only when it runs.
STAGES = {
    "tokenizer": "instructjax.stages.tokenizer_stage",
    "pretrain": "instructjax.stages.pretrain",
    "sft": "instructjax.stages.sft",
    "reward": "instructjax.stages.reward",
    "ppo": "instructjax.stages.ppo",
    "pipeline": "instructjax.stages.pipeline",
}


# The pipeline's stages, in the order they run (each in WORKDIR/<stage>/).
PIPELINE_ORDER = ("tokenizer", "pretrain", "sft", "reward", "ppo")
# Stages whose result is a model, exported to `config.export_hf` when set.
EXPORTABLE = ("pretrain", "sft", "reward", "ppo")


def _run_then_export(run: Callable[[Any, str], Any], config: Any, workdir: str) -> Any:
    result = run(config, workdir)
    from instructjax.stages import export
    export.export_if_asked(config, workdir)
    return result


def get_stage(name: str) -> Callable[[Any, str], Any]:
    """The `run(config, workdir)` of stage `name`; a clear error for an unknown one."""
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; valid stages: {sorted(STAGES)}")
    run = importlib.import_module(STAGES[name]).run
    return functools.partial(_run_then_export, run) if name in EXPORTABLE else run
