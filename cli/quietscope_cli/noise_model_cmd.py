"""``quietscope noise-model``: fit, bootstrap and plot pixel noise models for pn2v/denoisplit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from quietscope.errors import ConfigError, OutputError, validation_message
from quietscope_cli.main import handle_errors
from quietscope_cli.options import axes_option


def _refuse_overwrite(path: str, overwrite: bool) -> None:

    if Path(path).exists() and not overwrite:
        raise OutputError(f"{path!r} already exists; pass --overwrite to replace it")


def _fit_options(fn: Any) -> Any:
    options = [
        click.option("--kind", default="gmm", show_default=True, type=click.Choice(["gmm", "histogram"]),
                     help="Gaussian mixture (smooth, few pairs suffice) or 2D histogram (PN2V; needs many pairs)."),
        click.option("--gaussians", default=3, show_default=True, type=int, help="gmm: mixture components."),
        click.option("--coeffs", default=2, show_default=True, type=int,
                     help="gmm: polynomial coefficients per parameter (2 = linear in the signal)."),
        click.option("--iterations", default=2000, show_default=True, type=int, help="gmm: optimisation steps."),
        click.option("--bins", default=256, show_default=True, type=int, help="histogram: bins per axis."),
        click.option("--min-row-pairs", default=1000, show_default=True, type=int,
                     help="histogram: signal rows with fewer pairs borrow shifted neighbouring rows (0: plain PN2V)."),
        click.option("--max-pairs", default=1_000_000, show_default=True, type=int,
                     help="(signal, observation) pixels sampled from big data."),
        click.option("--channel", default=None, type=int, help="Channel to model (required for multi-channel data)."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
                     help="Also write a PNG of the model over the fitting pairs."),
        click.option("--overwrite", is_flag=True, help="Replace an existing noise model file."),
        axes_option,
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _fit_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {
        "n_gaussian": kw["gaussians"], "n_coeff": kw["coeffs"], "n_iterations": kw["iterations"], "bins": kw["bins"],
        "min_row_pairs": kw["min_row_pairs"],
    }


def _report(model: Any, output: str) -> None:
    model.save(output)
    lo, hi = model.signal_range
    click.echo(f"noise model: {output} ({model.kind}, signal range [{lo:.6g}, {hi:.6g}])")


@click.group("noise-model")
def noise_model() -> None:
    """Fit, bootstrap and plot pixel noise models p(x|s) for --method pn2v."""


@noise_model.command("fit")
@click.option("--calibration", "stack", default=None, metavar="STACK",
              help="Noisy images of a static sample stacked along t (or z); signal = pixel-wise mean.")
@click.option("--pairs", nargs=2, default=None, metavar="NOISY CLEAN", help="Noisy image(s) and their clean counterpart.")
@click.option("--stack-axis", default=None, type=click.Choice(["t", "z"]), help="calibration: stack axis (default t if present, else z).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Noise model file to write (.json).")
@_fit_options
@handle_errors
def fit(stack: str | None, pairs: tuple[str, str] | None, stack_axis: str | None, output: str, **kw: Any) -> None:
    """Fit a noise model on a calibration stack or on noisy/clean pairs."""

    from quietscope.workflows import noise_model as sources

    if (stack is None) == (not pairs):
        raise click.UsageError("give exactly one of --calibration STACK or --pairs NOISY CLEAN")
    _refuse_overwrite(output, kw["overwrite"])
    common = dict(kind=kw["kind"], max_pairs=kw["max_pairs"], channel=kw["channel"], axes=kw["axes"],
                  plot_path=kw["plot_path"], seed=kw["seed"], **_fit_kwargs(kw))
    if stack is not None:
        model = sources.fit_from_calibration(stack, stack_axis=stack_axis, **common)
    else:
        model = sources.fit_from_pairs(pairs[0], pairs[1], **common)
    _report(model, output)


@noise_model.command("bootstrap")
@click.argument("model")
@click.argument("data")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Noise model file to write (.json).")
@click.option("--clip-percent", default=0.5, show_default=True, type=float,
              help="Pairs dropped at each end of the pseudo-signal range (%).")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Where the temporary prediction of DATA goes (default: next to the output).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-tile-voxels", default=1_500_000, show_default=True, type=int, help="Memory bound of one predicted block.")
@click.option("--threads", default=None, type=int, help="Threads of the local dask worker.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--variance-from-data", is_flag=True,
              help="GMM: rescale the residuals to DATA's own Poisson-Gaussian variance line, so the denoiser's "
                   "error does not widen the model (Poisson-Gaussian data; see docs/methods/pn2v.md).")
@_fit_options
@handle_errors
def bootstrap(model: str, data: str, output: str, clip_percent: float, work_dir: str | None, device: str,
              max_tile_voxels: int, threads: int | None, no_progress: bool, variance_from_data: bool, **kw: Any) -> None:
    """Fit a noise model on DATA with MODEL's prediction (e.g. N2V) as pseudo-signal."""

    from quietscope.workflows import noise_model as sources
    from quietscope.workflows.predict import PredictOptions

    _refuse_overwrite(output, kw["overwrite"])
    try:
        opts = PredictOptions(device=device, max_tile_voxels=max_tile_voxels, threads=threads, progress=not no_progress)
    except Exception as exc:
        raise ConfigError(f"invalid option: {validation_message(exc)}") from None
    nm = sources.bootstrap(
        model, data, kind=kw["kind"], max_pairs=kw["max_pairs"], channel=kw["channel"], axes=kw["axes"],
        clip_percentile=clip_percent, work_dir=work_dir or str(Path(output).resolve().parent),
        predict_options=opts, plot_path=kw["plot_path"], seed=kw["seed"], variance_from_data=variance_from_data,
        **_fit_kwargs(kw),
    )
    _report(nm, output)


@noise_model.command("plot")
@click.argument("noise_model_file", metavar="NOISE_MODEL")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--data", default=None, help="Noisy data the model is meant for: its range is checked against the model's.")
@click.option("--signal", default=None,
              help="With --data: its clean (or denoised) counterpart; the data is then drawn under the model.")
@click.option("--channel", default=None, type=int, help="Channel of --data (multi-channel data).")
@click.option("--max-pairs", default=1_000_000, show_default=True, type=int, help="Pixels sampled from --data.")
@click.option("--overwrite", is_flag=True, help="Replace an existing PNG.")
@axes_option
@handle_errors
def plot(noise_model_file: str, output: str, data: str | None, signal: str | None, channel: int | None,
         max_pairs: int, overwrite: bool, axes: str | None) -> None:
    """Draw NOISE_MODEL as a PNG (heat map of p(x|s) and slices), optionally over data."""

    from quietscope.workflows import noise_model as sources

    if signal is not None and data is None:
        raise click.UsageError("--signal needs --data (the noisy image it belongs to)")
    _refuse_overwrite(output, overwrite)
    covered = sources.plot_model_file(noise_model_file, output, data=data, signal=signal, channel=channel,
                                      max_pairs=max_pairs, axes=axes)
    if covered is not None:
        (lo, hi), (m_lo, m_hi) = covered
        click.echo(f"data range [{lo:.6g}, {hi:.6g}] is covered by the model's range [{m_lo:.6g}, {m_hi:.6g}]")
    click.echo(f"plot: {output}")


COMMANDS = [noise_model]
