"""``quietscope calibrate``: calibrate a splitting model's std outputs on held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quietscope_cli.main import handle_errors
from quietscope_cli.options import axes_option, level_option


@click.command()
@click.argument("model")
@click.argument("data")
@click.option("--clean", "clean", multiple=True, required=True,
              help="Clean (or high-SNR) image of one channel of DATA's field, same units; repeat once per channel, in order.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Calibration report (JSON).")
@click.option("--model-out", default=None, type=click.Path(dir_okay=False),
              help="Calibrated model file to write [default: MODEL with .calibrated.qs].")
@click.option("--plot", "plot", default=None, type=click.Path(dir_okay=False),
              help="RMSE-vs-RMV plot (PNG) [default: OUTPUT with .png].")
@click.option("--bins", default=30, show_default=True, type=int, help="Equal-count bins of predicted std.")
@click.option("--samples", "n_samples", default=None, type=int, help="Posterior samples per pixel (default: the model's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing calibrated model file.")
@axes_option
@level_option
@handle_errors
def calibrate(model: str, data: str, clean: tuple[str, ...], output: str, model_out: str | None, plot: str | None,
              bins: int, n_samples: int | None, overwrite: bool, axes: str | None, level: int) -> None:
    """Fit per-channel std calibration of MODEL (denoisplit/musplit) on held-out superimposed DATA.

    Writes the report, the plot, and a copy of MODEL whose predictions carry calibrated stds.
    """

    from quietscope.workflows.calibrate import calibrate_model

    model_out = model_out or str(Path(model).with_suffix("")) + ".calibrated.qs"
    plot = plot or str(Path(output).with_suffix(".png"))
    res = calibrate_model(model, data, list(clean), model_out, plot_path=plot, n_bins=bins, n_samples=n_samples,
                          axes=axes, level=level, overwrite=overwrite)
    Path(output).write_text(json.dumps(res.to_dict(), indent=2))
    for ch in res.channels:
        click.echo(f"{ch.name}: RMSE = {ch.scale:.3g} x RMV {ch.offset:+.3g}; calibration error (ENCE) "
                   f"{ch.ence_before:.3f} -> {ch.ence_after:.3f}")
    click.echo(f"calibrated model: {model_out}; plot: {plot}")


COMMANDS = [calibrate]
