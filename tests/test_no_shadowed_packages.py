"""Commands run from the repository root (`python -m experiments.run`), so every top-level
name there is importable ahead of site-packages. A top-level `kernels/` once shadowed Hugging
Face's `kernels` package, and transformers 5 failed to build even a small Qwen2 model from
the root. Our kernels live in the package (`instructjax.kernels`); these tests keep it so."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Top-level names of the repository that Python may import from the root.
ALLOWED_TOP_LEVEL = {"configs", "experiments", "benchmarks", "tests", "docs", "src", "notebooks"}


def test_no_top_level_module_shadows_an_installed_package():
    import importlib.util
    for name in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, name)
        module = name[:-3] if name.endswith(".py") else name
        if name.startswith(".") or not (os.path.isdir(path) or name.endswith(".py")):
            continue
        if name == "setup.py":
            continue
        assert module in ALLOWED_TOP_LEVEL, (
            f"top-level {name!r} would be importable as {module!r} from the repository root; "
            f"keep code in src/instructjax (allowed: {sorted(ALLOWED_TOP_LEVEL)})")
    # The names we do keep must not be real packages' names either.
    for module in ALLOWED_TOP_LEVEL:
        spec = importlib.util.find_spec(module)
        origin = os.path.abspath(spec.origin or spec.submodule_search_locations[0]) if spec else ""
        assert spec is None or origin.startswith(ROOT), (module, origin)


def test_transformers_builds_a_qwen2_model_from_the_repository_root():
    pytest.importorskip("torch", reason="torch is a test-only dependency (pip install -e .[dev])")
    pytest.importorskip("transformers", reason="transformers is a test-only dependency")
    code = ("import kernels, transformers\n"
            "assert 'site-packages' in (kernels.__file__ or ''), kernels.__file__\n"
            "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
            "m = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,"
            " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\n"
            "print(sum(p.numel() for p in m.parameters()))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip().splitlines()[-1]) > 0
