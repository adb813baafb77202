"""Regenerate docs/cli.md from the click app's own help (so the reference never drifts).

Usage: .venv/bin/python docs/gen_cli_reference.py
"""

from __future__ import annotations

from pathlib import Path

import click

from quietscope_cli.main import cli


def _walk(cmd: click.Command, path: list[str]):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from _walk(cmd.commands[name], path + [name])


def main() -> None:
    lines = [
        "# CLI reference",
        "",
        "Generated from `quietscope --help` by `docs/gen_cli_reference.py`; option names are a public",
        "interface (pipelines call them) and stay stable.",
        "",
        "Exit status: 0 success; 2 a problem with the input, the options or the output (one line",
        "`quietscope: error: ...` names it and the fix); 1 an internal error; 130 interrupted.",
        "",
    ]
    for path, cmd in _walk(cli, ["quietscope"]):
        ctx = click.Context(cmd, info_name=" ".join(path))
        lines += [f"## `{' '.join(path)}`", "", "```", cmd.get_help(ctx), "```", ""]
    out = Path(__file__).with_name("cli.md")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
