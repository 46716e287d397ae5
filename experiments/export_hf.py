"""Writes a finished stage as a Hugging Face model directory.

    python -m experiments.export_hf --workdir=/tmp/ijx/ppo --out=/tmp/ijx_policy_hf

A pretrain, SFT or PPO workdir becomes `<Family>ForCausalLM`, a reward workdir
`<Family>ForSequenceClassification` with one label; both load offline with
`transformers.AutoModelFor...from_pretrained(out)`. The same export runs at the end of a
stage when its config sets `export_hf=DIR`. Exit code 1 with a one-line reason on a user
error (not a stage workdir, an unfinished run).
"""

import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished stage's workdir.")
_OUT = flags.DEFINE_string("out", None, "The Hugging Face directory to write.")
_MAX_SHARD_MB = flags.DEFINE_integer("max_shard_mb", 5000,
                                     "Split safetensors files above this many MB.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from instructjax.stages.errors import user_errors
    from instructjax.stages import export
    try:
        out = export.export_stage(_WORKDIR.value, _OUT.value,
                                  max_shard_bytes=_MAX_SHARD_MB.value * 10**6)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
