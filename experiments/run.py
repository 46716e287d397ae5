"""Entry point: `python -m experiments.run --config=configs/<name>.py --workdir=DIR`.

Parses the config (with `--config.a.b=value` overrides), checks its keys against the schema
in configs/base.py, starts multi-host JAX when asked, and runs `config.stage`.
Exit code 0 on success; 1 with a one-line reason on a user error.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import base

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics).")
flags.mark_flags_as_required(["config", "workdir"])


def unknown_keys(config, schema, prefix="") -> list[tuple[str, list[str]]]:
    """(dotted key, valid keys at that level) for every key of `config` absent from `schema`."""
    problems = []
    for key, value in config.items():
        if key not in schema:
            problems.append((prefix + key, sorted(schema.keys())))
        elif hasattr(value, "items") and hasattr(schema[key], "items"):
            problems.extend(unknown_keys(value, schema[key], prefix + key + "."))
    return problems


def check_config(config) -> None:
    """Raises StageError naming the first key that the stage's schema does not know."""
    from instructjax.stages.common import StageError
    from instructjax.stages.registry import get_stage
    get_stage(config.stage)  # unknown stage -> error naming the valid ones
    problems = unknown_keys(config, base.get_base(config.stage))
    if problems:
        key, valid = problems[0]
        raise StageError(f"unknown config key {key!r}; valid keys here: {', '.join(valid)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if not flags.FLAGS["verbosity"].present:
        # library INFO logs (TFDS writers, orbax) drown the progress lines; --verbosity=0 shows them
        logging.set_verbosity(logging.WARNING)
    from instructjax.data.jsonl import DataFormatError
    from instructjax.stages.common import StageError
    from instructjax.parallel.mesh import MeshConfigError
    try:
        check_config(config)
        if config.dry_run:  # compile for the declared mesh instead of running the stage
            from instructjax.stages import dry_run
            dry_run.run(config, _WORKDIR.value)
            return
        from instructjax.stages.common import initialize_distributed
        initialize_distributed(config.distributed)  # before anything touches a device
        from instructjax.stages.registry import get_stage
        get_stage(config.stage)(config, _WORKDIR.value)
    except (StageError, MeshConfigError, DataFormatError, FileNotFoundError) as err:
        logging.debug("stage failed", exc_info=True)  # shown with --verbosity=1
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
