"""Stage `tokenizer`: train (or copy) the sentencepiece model into WORKDIR/tokenizer.model."""

from __future__ import annotations

import os
from typing import Any

from instructjax.stages import common, pretrain


def run(config: Any, workdir: str):
    """Trains the tokenizer on the stage's corpus (the demo corpus by default)."""
    os.makedirs(workdir, exist_ok=True)
    common.check_resume_config(  # a trained tokenizer is this stage's progress
        config, workdir, has_progress=os.path.exists(os.path.join(workdir, common.TOKENIZER_FILE)))
    train_paths, _ = pretrain.corpus_paths(config, workdir)
    tokenizer = common.ensure_tokenizer(config, workdir, train_paths)
    if common.is_main_process():
        print(f"[tokenizer] {tokenizer.vocab_size} pieces -> "
              f"{os.path.join(workdir, common.TOKENIZER_FILE)}", flush=True)
    return tokenizer
