"""Chat with an imported Hugging Face model: the session's greedy answers equal
transformers' `generate` on the prompt its chat template renders, turn after turn, and the
command answers a scripted two-turn conversation. (The pipeline's PPO workdir is chatted with
in tests/experiments/test_pipeline_command.py.)"""
import os
import subprocess
import sys

import pytest

from instructjax.chat.engine import SamplingOptions, StreamingDecoder
from instructjax.chat.loading import load_chat_model
from instructjax.chat.session import ChatSession
from instructjax.model.hf.random_model import write_random_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = ["用户：你好\n小元：你好！有什么可以帮你？", "Hello, how are you? I am fine. 🙂",
         "1 加 2 等于 3。 12 plus 7 is 19."] * 40
TURNS = ("你好，1 加 2 等于多少？", "And in English?")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    write_random_hf_model(path, "qwen2", TEXTS, tokenizer_vocab=500, seed=1)
    return str(path)


def test_greedy_answers_equal_transformers_generate_turn_after_turn(qwen_dir):
    torch = pytest.importorskip("torch", reason="transformers is the reference")
    transformers = pytest.importorskip("transformers", reason="the reference")
    loaded = load_chat_model(qwen_dir)
    assert loaded.template.__class__.__name__ == "JinjaChatTemplate"  # the model's ChatML
    decoder = StreamingDecoder(loaded.model_cfg, loaded.params, loaded.tokenizer.eos_ids)
    options = SamplingOptions(max_new_tokens=10, greedy=True)
    session = ChatSession(decoder, loaded.tokenizer, loaded.template, options)
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    messages = []
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
        assert session.prompt_ids(text) == list(ids)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                 eos_token_id=list(loaded.tokenizer.eos_ids),
                                 pad_token_id=loaded.tokenizer.pad_id)
        expected = hf_tok.decode(out[0, len(ids):], skip_special_tokens=True)
        answer = session.answer(text)
        assert answer == expected, (text, answer, expected)
        messages.append({"role": "assistant", "content": answer})


def test_chat_command_answers_a_scripted_conversation(qwen_dir):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.chat", f"--model={qwen_dir}", "--greedy",
         "--max_new_tokens=6", *[f"--prompt={t}" for t in TURNS]],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert [line for line in lines if line.startswith(">>> ")] == [f">>> {t}" for t in TURNS]


def test_chat_command_refuses_a_missing_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.chat",
                          f"--model={tmp_path / 'nowhere'}", "--prompt=hi"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 1 and "is not a directory" in out.stderr, out.stderr[-2000:]


def test_history_is_cut_oldest_first_to_fit_the_context(tmp_path):
    write_random_hf_model(tmp_path, "qwen2", TEXTS, tokenizer_vocab=500, seed=2,
                          max_seq_len=192)
    loaded = load_chat_model(str(tmp_path))
    decoder = StreamingDecoder(loaded.model_cfg, loaded.params, loaded.tokenizer.eos_ids)
    options = SamplingOptions(max_new_tokens=8, greedy=True)
    session = ChatSession(decoder, loaded.tokenizer, loaded.template, options)
    questions = [f"问题 {i}：{i} 加 {i} 等于多少？ What is {i} plus {i}?" for i in range(6)]
    for question in questions:
        session.answer(question)
        assert len(session.prompt_ids("再来一个")) <= 192 - 8
    assert session.truncations, "six exchanges do not fit 184 tokens: some had to be cut"
    # the newest exchange survives the cut, the oldest does not
    prompt = loaded.tokenizer.decode(session.prompt_ids("再来一个"))
    assert questions[-1] in prompt and questions[0] not in prompt
