"""Entry point: `python -m experiments.run --config=configs/<name>.py --workdir=DIR`.

Parses the config (with `--config.a.b=value` overrides), checks its keys against the schema
in configs/base.py, starts multi-host JAX when asked, and runs `config.stage`.
Exit code 0 on success; 1 with a one-line reason on a user error.
"""

import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import base
from instructjax.stages.errors import user_errors  # noqa: F401 (re-exported)

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
    """Raises StageError naming the first key the stage's schema does not know, or every
    value out of its range."""
    from instructjax.stages.common import StageError
    from instructjax.stages.registry import get_stage
    get_stage(config.stage)  # unknown stage -> error naming the valid ones
    problems = unknown_keys(config, base.get_base(config.stage))
    if problems:
        key, valid = problems[0]
        hint = ""
        if config.stage == "pipeline" and "." not in key:
            hint = " (a stage's own keys are set per stage: stages.<stage>.<key>)"
        raise StageError(f"unknown config key {key!r}; valid keys here: {', '.join(valid)}{hint}")
    from instructjax.stages.config_values import check_values
    check_values(config)


def describe_bad_override(argv: list[str], err: Exception) -> str:
    """One line naming the `--config.KEY=value` override that names no key, and the valid
    keys where it goes wrong (ml_collections raises a KeyError/AttributeError for it)."""
    config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv
                 if a.startswith("--config.")]
    if config_path is None:
        return f"bad config override: {err}"
    try:
        config = runpy.run_path(config_path)["get_config"]()
    except Exception as load_err:  # the config file itself is broken: say so, keep the cause
        return f"bad config override ({err}); loading {config_path} failed: {load_err}"
    for dotted in overrides:
        node, walked = config, []
        for key in dotted.split("."):
            if not hasattr(node, "keys") or key not in node:
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none)"
                where = ".".join(walked) or "the top level"
                hint = ""
                if config.get("stage") == "pipeline" and not walked:
                    hint = " (a stage's own keys are set per stage: stages.<stage>.<key>)"
                return (f"unknown config key {dotted!r} in --config.{dotted}: {key!r} is not a "
                        f"key of {where}; valid keys there: {valid}{hint}")
            node, walked = node[key], walked + [key]
    return f"bad config override: {err}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a misspelled `--config.KEY` turned into one clear line."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as err:
        print(f"error: {describe_bad_override(argv, err)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except flags.Error as err:  # e.g. `--config.train.steps=ten`: absl names flag and value
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if not flags.FLAGS["verbosity"].present:
        # library INFO logs (TFDS writers, orbax) drown the progress lines; --verbosity=0 shows them
        logging.set_verbosity(logging.WARNING)
    try:
        check_config(config)
        if config.dry_run:  # compile for the declared mesh instead of running the stage
            from instructjax.stages import dry_run
            dry_run.run(config, _WORKDIR.value)
            return
        from instructjax.stages import common, settings
        common.initialize_distributed(settings.distributed_from(config))  # before any device
        from instructjax.stages.registry import get_stage
        get_stage(config.stage)(config, _WORKDIR.value)
    except user_errors() as err:
        logging.debug("stage failed", exc_info=True)  # shown with --verbosity=1
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
