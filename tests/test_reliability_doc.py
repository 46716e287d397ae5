"""docs/reliability.md stays true: every test it names exists (file, function, and the
parametrize ids it quotes), and no row says the project crashes or stays silent."""

import ast
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "reliability.md")
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(\[[^\]`]*\])?`")


def table_rows() -> list[str]:
    with open(DOC, encoding="utf-8") as f:
        return [line for line in f if line.startswith("| ") and not line.startswith("| fault")]


def defined_tests(path: str) -> set[str]:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def test_every_row_names_an_existing_test():
    rows = table_rows()
    assert len(rows) > 100
    missing = []
    for row in rows:
        ids = TEST_ID.findall(row)
        assert ids, f"row names no test: {row[:120]}"
        for path, name, _ in ids:
            if not os.path.exists(os.path.join(REPO, path)) or name not in defined_tests(path):
                missing.append(f"{path}::{name}")
    assert not missing, missing


def test_quoted_parametrize_ids_are_collected():
    """`path::name[id]` in the doc must be a test pytest collects (slow ones included)."""
    quoted = {f"{path}::{name}{param}" for row in table_rows()
              for path, name, param in TEST_ID.findall(row) if param}
    files = sorted({q.split("::")[0] for q in quoted})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-m", "slow or not slow", "-p", "no:cacheprovider", *files],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    collected = {line.strip() for line in out.stdout.splitlines() if "::" in line}
    assert collected, out.stdout[-2000:] + out.stderr[-2000:]
    assert not quoted - collected, sorted(quoted - collected)


def test_no_row_says_crash_or_silent():
    for row in table_rows():
        outcome = row.split(" | ")[-2].lower()  # the "what the project does" column
        assert "crash" not in outcome and "silent" not in outcome, row[:200]
