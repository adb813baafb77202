"""benchmarks/ is a package with one harness: no script edits sys.path or imports another script."""

from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED = {"benchmarks.harness", "benchmarks.common", "benchmarks"}


def test_scripts_use_the_harness_only():
    problems = []
    scripts = {p.stem for p in BENCH.glob("*.py")}
    for path in sorted(BENCH.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sys" and node.attr == "path":
                problems.append(f"{path.name}:{node.lineno} touches sys.path")
            if isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
                if (top in scripts and top not in ("harness", "common")) or top in ("helpers", "box_job", "common"):
                    problems.append(f"{path.name}:{node.lineno} imports {node.module} (use benchmarks.harness)")
                if node.module.startswith("benchmarks.") and node.module not in SHARED:
                    problems.append(f"{path.name}:{node.lineno} imports another script, {node.module}")
    assert not problems, "\n".join(problems)
