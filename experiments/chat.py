"""Talk to a model in the terminal, tokens streamed as they are generated.

    python -m experiments.chat --model=/tmp/ijx/ppo
    python -m experiments.chat --model=/models/Qwen2.5-0.5B-Instruct --temperature=0.7
    python -m experiments.chat --model=/tmp/ijx/ppo --prompt="1 加 2 等于多少？" --prompt="再加 3 呢？"

--model is a finished pretrain / SFT / PPO workdir or a Hugging Face directory. The history
is kept across turns and cut, oldest exchanges first, to fit the model's context with room
for --max_new_tokens. Interactive commands: /reset (forget the conversation), /speed
(toggle the tokens/s line), /quit (or end of input). With --prompt (repeatable) the turns
are scripted: each prompt is printed after ">>> " and its answer below it, then the command
exits (for scripts and tests). Decoding uses the KV cache: one forward pass per new token.
"""

import sys

from absl import app, flags, logging

_MODEL = flags.DEFINE_string("model", None, "Stage workdir or Hugging Face model directory.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Scripted user turns (non-interactive).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature (> 0).")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus mass kept (1.0 = all).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens per answer at most.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Argmax decoding instead of sampling.")
_SEED = flags.DEFINE_integer("seed", 0, "Answer t samples with seed + t.")
_SYSTEM = flags.DEFINE_string("system", "", "A system message kept at the start.")
_MAX_TURNS = flags.DEFINE_integer("max_turns", 0, "Exchanges kept at most (0 = all that fit).")
_FORMAT = flags.DEFINE_enum("chat_format", "auto", ["auto", "chatyuan", "model"],
                            "Template: the run's / the tokenizer's own / ChatYuan's.")
_SHOW_SPEED = flags.DEFINE_bool("show_speed", False, "Print tokens/s after each answer.")
flags.mark_flags_as_required(["model"])


def _speed_line(stats) -> str:
    return (f"[{stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tokens/s, "
            f"prompt {stats.prompt_tokens} tokens in {stats.prefill_seconds * 1e3:.0f} ms]")


def _answer(session, text: str, show_speed: bool) -> None:
    for piece in session.reply(text):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    for cut in session.truncations:
        print(f"[history cut to fit the context: {cut}]")
    session.truncations.clear()
    if show_speed:
        print(_speed_line(session.last_stats))
    sys.stdout.flush()


def _interactive(session, show_speed: bool, source: str) -> None:
    print(f"chatting with {source}; /reset forgets the conversation, /speed toggles tokens/s, "
          "/quit ends")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        command = line.strip()
        if command == "/quit":
            return
        if command == "/reset":
            session.reset()
            print("[conversation reset]")
        elif command == "/speed":
            show_speed = not show_speed
        elif command:
            _answer(session, line, show_speed)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from instructjax.stages.errors import user_errors
    from instructjax.chat.engine import SamplingOptions, StreamingDecoder
    from instructjax.chat.loading import load_chat_model
    from instructjax.chat.session import ChatSession
    try:
        options = SamplingOptions(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                                  top_k=_TOP_K.value, top_p=_TOP_P.value, greedy=_GREEDY.value)
        loaded = load_chat_model(_MODEL.value, chat_format=_FORMAT.value)
        decoder = StreamingDecoder(loaded.model_cfg, loaded.params, loaded.tokenizer.eos_ids)
        session = ChatSession(decoder, loaded.tokenizer, loaded.template, options,
                              system=_SYSTEM.value, max_turns=_MAX_TURNS.value or None,
                              seed=_SEED.value)
        if _PROMPT.value:
            for text in _PROMPT.value:
                print(f">>> {text}")
                _answer(session, text, _SHOW_SPEED.value)
        else:
            _interactive(session, _SHOW_SPEED.value, loaded.source)
    except (*user_errors(), ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
