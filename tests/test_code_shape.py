"""The layering docs/architecture.md promises, checked on the source itself.

- No function in `stages/` or `train/` is longer than 80 lines (`python tests/test_code_shape.py`
  prints the five longest there and in the whole package).
- Nothing below the stages (model, data, rlhf, train, eval, parallel, kernels) imports
  ml_collections or reads a `config.<section>`: they take the frozen dataclasses that
  `stages/settings.py` converts the config into, once.
- No `int(config...)`-style cast outside that conversion.
"""

import ast
import pathlib
import re
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "src" / "instructjax"
BELOW_THE_STAGES = ("model", "data", "rlhf", "train", "eval", "parallel", "kernels")
MAX_LINES = 80


def function_lengths(root: pathlib.Path) -> list[tuple[int, str]]:
    """(lines, "path:function") of every function under `root`, longest first."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1,
                             f"{path.relative_to(PACKAGE.parent)}:{node.name}"))
    return sorted(rows, reverse=True)


def code_lines(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line number, line) of `path` with docstrings and comments left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstring_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
                and isinstance(node.value.value, str):
            docstring_lines.update(range(node.lineno, node.end_lineno + 1))
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(i, line.split("#")[0]) for i, line in enumerate(lines, 1)
            if i not in docstring_lines]


def test_no_function_in_stages_or_train_is_longer_than_80_lines():
    too_long = [row for folder in ("stages", "train")
                for row in function_lengths(PACKAGE / folder) if row[0] > MAX_LINES]
    assert not too_long, too_long


def test_nothing_below_the_stages_takes_the_ml_collections_config():
    found = []
    section = re.compile(r"\bconfig\.(train|ppo|model|data|eval|chat|reward|sft|tokenizer|mesh|"
                         r"hardware|distributed)\b")
    for folder in BELOW_THE_STAGES:
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            for number, line in code_lines(path):
                if "ml_collections" in line or section.search(line):
                    found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not found, found


def test_config_values_are_cast_only_at_the_boundary():
    cast = re.compile(r"\b(int|float|bool|str)\((config|p|train|hw|dist)\.")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "settings.py":
            continue
        for number, line in code_lines(path):
            if cast.search(line):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not found, found


if __name__ == "__main__":
    top = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print("longest in stages/ and train/:")
    for lines, name in sorted(function_lengths(PACKAGE / "stages")
                              + function_lengths(PACKAGE / "train"), reverse=True)[:top]:
        print(f"{lines:4d}  {name}")
    print("longest in the package:")
    for lines, name in function_lengths(PACKAGE)[:top]:
        print(f"{lines:4d}  {name}")
