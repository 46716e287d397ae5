"""The exception types that are the user's to fix, for the commands' one-line errors."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix: printed as one line, exit code 1.

    Anything else is a bug of ours and keeps its traceback.
    """
    from instructjax.data.chat_template import ChatTemplateError
    from instructjax.data.jsonl import DataFormatError
    from instructjax.model import hf
    from instructjax.parallel.mesh import MeshConfigError
    from instructjax.stages.common import StageError
    from instructjax.train.checkpoint import CheckpointMismatchError, CheckpointSaveError
    from instructjax.train.divergence import DivergenceError
    from instructjax.train.host_state import ProcessCountMismatchError
    return (StageError, MeshConfigError, DataFormatError, FileNotFoundError,
            CheckpointMismatchError, CheckpointSaveError, DivergenceError,
            ProcessCountMismatchError, hf.UnsupportedCheckpointError,
            hf.CheckpointMismatchError, ChatTemplateError)
