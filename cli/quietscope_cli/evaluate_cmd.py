"""``quietscope simulate`` (add synthetic noise) and ``quietscope evaluate`` (metrics vs ground truth)."""

from __future__ import annotations

import click

from quietscope_cli.main import handle_errors
from quietscope_cli.options import axes_option, level_option, parse_ints


@click.command()
@click.argument("clean", metavar="CLEAN")
@click.option("-o", "--output", required=True, help="Noisy OME-Zarr to write (.ome.zarr).")
@click.option("--poisson", "poisson_scale", default=None, type=float, help="Photons per intensity unit (larger: less shot noise).")
@click.option("--gauss", "gauss_rel", default=None, type=float, help="Gaussian std as a fraction of the clean image's std.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--chunks", default=None, help="Output chunks over the spatial axes, e.g. 256,256.")
@click.option("--ngff", default="0.5", show_default=True, type=click.Choice(["0.4", "0.5"]))
@click.option("--levels", "n_levels", default=None, type=int, help="Pyramid levels (default: until y,x fit one chunk).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@axes_option
@level_option
@handle_errors
def simulate(clean: str, output: str, poisson_scale: float | None, gauss_rel: float | None, seed: int,
             chunks: str | None, ngff: str, n_levels: int | None, overwrite: bool, axes: str | None, level: int) -> None:
    """Add seeded Poisson-Gaussian noise to CLEAN, chunk by chunk (same result for any chunking)."""

    from quietscope.workflows.simulate import simulate_image

    res = simulate_image(clean, output, poisson_scale, gauss_rel, seed=seed, chunks=parse_ints(chunks, "--chunks"),
                         overwrite=overwrite, axes=axes, level=level, ngff=ngff, n_levels=n_levels)
    click.echo(f"output: {res.output} {tuple(res.shape)} (clean std {[round(s, 4) for s in res.data_std]}, {res.std_source})")


@click.command()
@click.argument("prediction", metavar="PRED")
@click.argument("ground_truth", metavar="GT")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write rows and summary as JSON.")
@click.option("--per-image", is_flag=True, help="Print one row per image (t, c) before the summary.")
@click.option("--channel", default=None, type=int, help="Evaluate only this channel of PRED against a 1-channel GT.")
@click.option("--gt-axes", default=None, help="Axes of GT when its metadata lack them.")
@axes_option
@level_option
@handle_errors
def evaluate(prediction: str, ground_truth: str, json_path: str | None, per_image: bool, channel: int | None,
             gt_axes: str | None, axes: str | None, level: int) -> None:
    """PSNR, range-invariant PSNR, SSIM and SNR of PRED against GT (mean ± standard error)."""

    from quietscope.workflows.evaluate import evaluate as run
    from quietscope.workflows.evaluate import write_json

    ev = run(prediction, ground_truth, axes=axes, gt_axes=gt_axes, level=level, channel=channel)
    click.echo(ev.table(per_image=per_image))
    if json_path:
        write_json(ev, json_path)
        click.echo(f"json: {json_path}")


COMMANDS = [simulate, evaluate]
