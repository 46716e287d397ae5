"""TruncationLog: the stages' `on_truncate` counts cut records and reports at powers of two."""

import pickle

from instructjax.data import chat_encoding


def test_counts_reports_at_powers_of_two_and_pickles(capsys):
    log = chat_encoding.TruncationLog("ppo", "ppo.max_prompt_len=8")
    for i in range(5):
        log(f"prompt cut from {20 + i} to 8 tokens")
    lines = capsys.readouterr().out.splitlines()
    assert log.count == 5 and log.first == "prompt cut from 20 to 8 tokens"
    assert [line.split("] ")[1].split(" ")[0] for line in lines] == ["1", "2", "4"]
    assert "ppo.max_prompt_len=8" in lines[0] and "first: prompt cut from 20" in lines[0]
    copy = pickle.loads(pickle.dumps(log))
    copy("again")
    assert copy.count == 6 and log.count == 5


def test_encode_prompt_reports_through_the_log():
    from instructjax.data import formats
    log = chat_encoding.TruncationLog("ppo", "max_length=20", echo=False)

    class CharTokenizer:
        bos_id, eos_id, pad_id = 2, 3, 0

        def encode(self, text):
            return [10 + ord(c) % 50 for c in text]

    template = chat_encoding.ChatTemplate("用户", "小元")
    prompt = formats.Prompt([formats.Turn("user", "x" * 100)])
    ids = chat_encoding.encode_prompt(prompt, CharTokenizer(), template, max_length=20,
                                      on_truncate=log)
    assert len(ids) <= 20 and log.count == 1 and "prompt cut from" in log.first
