"""``quietscope inspect-noise``: know your noise before choosing a method."""

from __future__ import annotations

import shlex

import click

from quietscope_cli.main import handle_errors
from quietscope_cli.options import axes_option, level_option, parse_ints


@click.command("inspect-noise")
@click.argument("input_uri", metavar="DATA")
@click.option("-o", "--output", "report_dir", default="noise_report", show_default=True,
              type=click.Path(file_okay=False), help="Folder for report.json and the PNG plots.")
@click.option("--blocks", "n_blocks", default=16, show_default=True, type=int,
              help="Random blocks read (the volume is never loaded whole).")
@click.option("--block-size", default="128", show_default=True,
              help="Block edge: one number or one per spatial axis (e.g. 16,128,128).")
@click.option("--offset", default=None, type=float,
              help="Known camera offset in ADU (default: measured on the darkest pixels).")
@click.option("--model", default=None, type=click.Path(dir_okay=False),
              help="Model file (.qs): judge the residual data - prediction on the same blocks.")
@click.option("--prediction", default=None,
              help="Already predicted image of DATA: judge the residual data - prediction.")
@click.option("--channel", default=0, show_default=True, type=int, help="Channel to analyse.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the block draw.")
@click.option("--device", default="cpu", show_default=True, help="Device for --model: cpu, cuda or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of text.")
@axes_option
@level_option
@handle_errors
def inspect_noise(input_uri: str, report_dir: str, n_blocks: int, block_size: str, offset: float | None,
                  model: str | None, prediction: str | None, channel: int, seed: int, device: str,
                  as_json: bool, axes: str | None, level: int) -> None:
    """Measure the noise of DATA on a sample of blocks and say which method to use.

    Fits the Poisson-Gaussian camera model (gain, offset, read noise), measures how far the
    noise is correlated along each axis, checks the assumptions of the methods and prints the
    'quietscope train' options to use. With --model or --prediction it also says whether the
    residual (data - prediction) still holds signal or structured noise.
    """

    from quietscope.workflows.inspect_noise import inspect_noise as run

    sizes = parse_ints(block_size, "--block-size")
    res = run(
        input_uri, report_dir=report_dir, n_blocks=n_blocks, block_size=sizes, offset=offset,
        model=model, prediction=prediction, axes=axes, level=level, channel=channel, seed=seed,
        device=device,
    )
    if as_json:
        click.echo(res.to_json())
        return
    click.echo(res.to_text(), nl=False)
    click.echo(f"\nCommand: {shlex.join(res.command)}")
    click.echo(f"Report and plots: {', '.join(str(p) for p in res.files.values())}")


COMMANDS = [inspect_noise]
