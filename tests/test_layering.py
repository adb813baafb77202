"""House rules the import-linter contracts cannot state: no hidden imports, short functions.

import-linter (pyproject.toml, run by `make test`) checks the direction of imports; it cannot
see imports hidden inside functions, which are how cycles used to be dodged, so this test does.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "src" / "quietscope", ROOT / "cli" / "quietscope_cli"]

#: Documented optional dependencies: (file, imported module) pairs allowed inside a function.
#: runner/testing.UNetProcessor imports torch (via nets.unet) only when it is built, so that
#: worker processes running the torch-free processors of that module never import torch.
ALLOWED_LOCAL_IMPORTS = {("runner/testing.py", "quietscope.nets.unet")}


def _allowed(rel: str, package: str, module: str) -> bool:
    # The CLI imports its workflow inside the command that runs it: importing every workflow
    # (torch, dask, zarr, matplotlib) at start-up made `quietscope --help` and `info` take
    # ~9 s of CPU instead of 0.2 s. The contract still limits the CLI to quietscope.workflows.
    if package == "quietscope_cli":
        return module == "quietscope.workflows" or module.startswith("quietscope.workflows.")
    return (rel, module) in ALLOWED_LOCAL_IMPORTS

#: Longest function body allowed (lines, docstring excluded), and the functions still above it.
MAX_BODY = 60


def _functions():
    for pkg in PACKAGES:
        for path in sorted(pkg.rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield pkg.name, path.relative_to(pkg).as_posix(), node


def test_no_project_imports_inside_functions():
    found = []
    for package, rel, fn in _functions():
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mod = node.module
                if (mod == "quietscope" or mod.startswith(("quietscope.", "quietscope_cli"))) and not _allowed(rel, package, mod):
                    found.append(f"{rel}:{node.lineno} {fn.name} imports {mod}")
    assert not found, "imports of the project inside functions (hoist them, or document an optional dependency):\n" + "\n".join(found)


def _body_lines(fn: ast.FunctionDef) -> int:
    body = fn.body
    first = body[0]
    doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str)
    start = body[1].lineno if doc and len(body) > 1 else first.lineno
    return fn.end_lineno - start + 1


def test_functions_stay_short():
    long = [f"{rel}:{fn.lineno} {fn.name} ({_body_lines(fn)} lines)" for _, rel, fn in _functions() if _body_lines(fn) > MAX_BODY]
    assert not long, f"functions over {MAX_BODY} lines of body (split them):\n" + "\n".join(long)


def test_cli_starts_without_importing_the_engine():
    """`quietscope --help` must not pay for torch, dask or zarr."""
    import subprocess
    import sys

    code = "import sys, quietscope_cli.main; print(','.join(m for m in ('torch', 'distributed', 'zarr') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"the CLI imports {out} at start-up"
