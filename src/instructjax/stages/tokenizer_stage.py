"""Stage `tokenizer`: train (or copy) the sentencepiece model into WORKDIR/tokenizer.model."""

from __future__ import annotations

import os
from typing import Any

from instructjax.stages import common, workdirs


def run(config: Any, workdir: str):
    """Trains the tokenizer on the stage's corpus (the demo corpus by default)."""
    s = workdirs.start_stage(  # a trained tokenizer is this stage's progress
        config, workdir,
        has_progress=os.path.exists(os.path.join(workdir, workdirs.TOKENIZER_FILE)))
    train_paths, _ = workdirs.corpus_paths(s.data, workdir)
    tokenizer = workdirs.ensure_tokenizer(s.tokenizer, s.seed, workdir, train_paths,
                                         s.data.text_field)
    if common.is_main_process():
        print(f"[tokenizer] {tokenizer.vocab_size} pieces -> "
              f"{os.path.join(workdir, workdirs.TOKENIZER_FILE)}", flush=True)
    return tokenizer
