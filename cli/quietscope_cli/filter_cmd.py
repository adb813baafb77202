"""``quietscope filter``: classic denoising filters through the chunked prediction path."""

from __future__ import annotations

from typing import Any

import click

from quietscope_cli.main import handle_errors
from quietscope_cli.options import axes_option, level_option, predict_options, predict_options_from


@click.command("filter")
@click.argument("input_uri", metavar="INPUT")
@click.option("-o", "--output", required=True, help="Output .ome.zarr (or .tif for small data).")
@click.option("--kind", required=True, type=click.Choice(["box", "gaussian", "median", "box3d"]),
              help="box/median: in-plane (per z-plane for 3D); box3d: all spatial axes; gaussian: in-plane sigma.")
@click.option("--size", default=None, type=int, help="box/box3d/median: odd footprint edge in voxels.")
@click.option("--sigma", default=None, type=float, help="gaussian: std in voxels.")
@click.option("--truncate", default=4.0, show_default=True, type=float,
              help="gaussian: kernel cut at this many sigmas (halo = ceil(truncate * sigma)).")
@predict_options
@axes_option
@level_option
@handle_errors
def filter_command(input_uri: str, output: str, kind: str, size: int | None, sigma: float | None,
                   truncate: float, axes: str | None, level: int, **kw: Any) -> None:
    """Denoise INPUT with a classic filter, block by block, into a multiscale OME-Zarr."""

    from quietscope.workflows.filter import filter_image

    res = filter_image(input_uri, output, kind, size=size, sigma=sigma, options=predict_options_from(kw),
                       truncate=truncate, axes=axes, level=level)
    click.echo(f"output: {res.output} ({res.n_blocks} blocks, halo {list(res.halo)}, {res.voxels_per_s:.3g} voxel/s)")


COMMANDS = [filter_command]
