"""stages/workdirs.py: the tokenizer a stage trains reads the configured text field."""

import json

from instructjax.data import tokenizer as tok_lib
from instructjax.stages import settings, workdirs


def test_tokenizer_trains_on_the_configured_text_field(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    lines = ["3 加 5 等于 8。", "7 plus 2 equals 9.", "小元：你好！", "The answer is 12."] * 10
    corpus.write_text("".join(json.dumps({"body": t, "text": ""}) + "\n" for t in lines),
                      encoding="utf-8")
    tok = settings.TokenizerSettings(path="", vocab_size=4000, model_type="bpe",
                                     max_training_lines=1000)
    trained = workdirs.ensure_tokenizer(tok, 0, str(tmp_path / "run"), [str(corpus)], "body")
    assert (tmp_path / "run" / workdirs.TOKENIZER_FILE).exists()
    # the pieces come from the "body" texts (the "text" field is empty in every record)
    reference = tok_lib.train_tokenizer(lines, tmp_path / "ref.model", 4000, seed=0)
    assert trained.vocab_size == reference.vocab_size
    assert trained.encode("7 加 2 等于 9。") == reference.encode("7 加 2 等于 9。")
