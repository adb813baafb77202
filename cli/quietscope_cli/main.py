"""The ``quietscope`` command: parse options, call the library, turn its errors into one line."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from quietscope.errors import QuietscopeError, storage_message
from quietscope_cli.options import (
    axes_option,
    level_option,
    parse_ints,
    predict_options,
    predict_options_from,
)


def _setup_logging(verbose: int, quiet: bool) -> None:
    # distributed configures its loggers from dask config when first imported (after this).
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if verbose >= 2 else "warning")
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("distributed", "tornado", "asyncio", "matplotlib", "PIL", "fsspec", "numcodecs"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    if verbose < 2:
        # A failing task is reported once, as one line, when its error reaches the client; the
        # workers' own "Compute Failed" records (tracebacks, 60 KB for a bad file) are dropped.
        logging.getLogger("distributed.worker").addFilter(_drop_task_failures)
        logging.getLogger("distributed.worker.state_machine").addFilter(_drop_task_failures)


def _drop_task_failures(record: logging.LogRecord) -> bool:
    text = str(record.msg)
    return not ("Compute Failed" in text or "ended with CancelledError" in text)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Library errors -> one ``error:`` line and exit 2; unexpected errors -> one line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:

        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except QuietscopeError as exc:
            if debug:
                raise
            click.echo(f"quietscope: error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:  # storage failed outside the library's own checks: still one line
            if debug:
                raise
            click.echo(f"quietscope: error: {storage_message(exc, exc.filename or 'a file', role='path')}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("quietscope: interrupted; finished blocks are kept, rerun with --resume to continue", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, SystemExit):
            raise
        except Exception as exc:  # a bug: still one line, traceback on request
            if debug:
                raise
            click.echo(f"quietscope: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-vv includes dask's).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="quietscope")
def cli(verbose: int, quiet: bool, debug: bool) -> None:
    """Self-supervised denoising and splitting of microscopy volumes larger than memory."""
    _setup_logging(verbose, quiet)


@cli.command()
@click.argument("input_uri", metavar="INPUT")
@axes_option
@level_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@handle_errors
def info(input_uri: str, axes: str | None, level: int, as_json: bool) -> None:
    """Describe INPUT (OME-Zarr, zarr array or TIFF), or a model file (.qs)."""
    from quietscope.workflows.info import describe

    desc = describe(input_uri, axes=axes, level=level)
    if as_json:
        click.echo(json.dumps(desc, indent=2, default=str))
        return
    for k, v in desc.items():
        click.echo(f"{k:>14}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")


@cli.command()
@click.argument("input_uri", metavar="INPUT")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model file to write (.qs).")
@click.option("--method", default="n2v", show_default=True,
              help="Method name (see 'quietscope methods'), or pn2v-boot: N2V for --steps, and PN2V branched off it "
                   "late with a bootstrapped GMM, keeping PN2V only if a self-supervised check (SURE) says it "
                   "beats N2V.")
@click.option("--init", "init", default=None, type=click.Path(dir_okay=False, exists=True),
              help="pn2v: warm-start from this N2V model (its network; PN2V's prior mean starts equal to its prediction).")
@click.option("--n2v-fraction", default=None, type=float,
              help="pn2v-boot: where PN2V branches off N2V, as a share of --steps (PN2V trains the rest from there; N2V all of them; default 0.7).")
@click.option("--compare-on", type=click.Choice(["written", "image", "slab"]), default=None,
              help="pn2v-boot: what the keep-the-better check scores: what predict writes, on windows over the whole "
                   "image (default: written); or the estimates from a masked input, on patches over the whole image "
                   "(image) or on the held-apart slab (slab).")
@click.option("--patch", default="64", show_default=True, help="Patch size: one number or one per spatial axis (16,64,64).")
@click.option("--batch", default=16, show_default=True, type=int)
@click.option("--steps", default=2000, show_default=True, type=int)
@click.option("--lr", default=4e-4, show_default=True, type=float, help="Adam learning rate (cosine schedule).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--depth", default=2, show_default=True, type=int, help="U-Net levels.")
@click.option("--filters", default=32, show_default=True, type=int, help="U-Net feature maps at the first level.")
@click.option("--n2v2", is_flag=True, help="N2V2: median replacement, blur-pool, no top skip.")
@click.option("--batch-norm", is_flag=True, help="Batch normalisation in the U-Net (off by default: it biases bright regions at small batch sizes).")
@click.option("--z-pool", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="3D: down-sample z in the U-Net; auto = no when the z step is >= 2x the pixel size (anisotropic stacks).")
@click.option("--masked-percent", default=0.2, show_default=True, type=float, help="Blind-spot pixels per patch (%).")
@click.option("--struct-mask", default=None, help="structN2V: AXIS:LENGTH (e.g. x:5) or a mask file (.npy/.tif).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float, help="Held-apart slab for validation.")
@click.option("--foreground", default=0.0, show_default=True, type=float, help="Fraction of patches biased to bright regions.")
@click.option("--checkpoint-every", default=200, show_default=True, type=int)
@click.option("--val-every", default=100, show_default=True, type=int, help="Validation loss every N steps.")
@click.option("--early-stop", default=None, type=int, help="Stop after N validations without improvement.")
@click.option("--keep", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Weights the model file keeps: those of the best validation score, or of the last step "
                   "(denoisplit/musplit recommend last).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", is_flag=True, help="Mixed precision: the network under bf16 autocast (fp16 + grad scaler on GPUs without bf16).")
@click.option("--noise-model", default=None, type=click.Path(dir_okay=False), help="pn2v/denoisplit: noise model file (JSON) from 'quietscope noise-model'.")
@click.option("--samples", "n_samples", default=None, type=int, help="pn2v: prior samples predicted per pixel.")
@click.option("--psf-sigma", default=None, help="n2v-deconv: Gaussian PSF sigma, one value or one per spatial axis.")
@click.option("--psf", default=None, type=click.Path(dir_okay=False), help="n2v-deconv: PSF image (TIFF), normalised to sum 1.")
@click.option("--positivity-lambda", default=None, type=float, help="n2v-deconv: weight of the positivity term.")
@click.option("--gain", default=None, type=float, help="bayes-poisson: ADU per photon (default: data already in photons).")
@click.option("--offset", default=None, type=float, help="bayes-poisson, n2v-deconv: camera offset (no-light level) in ADU.")
@click.option("--noise-sigma", default=None, type=float, help="bayes-gauss: known noise sigma (default: learned).")
@click.option("--param", "params", multiple=True, help="Method option KEY=VALUE (JSON value), repeatable.")
@click.option("--channels", "channels", multiple=True, type=click.Path(), help="denoisplit/musplit: image of a further structure, stacked after INPUT as a channel; repeatable.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model file.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint next to the output.")
@axes_option
@level_option
@handle_errors
def train(input_uri: str, output: str, method: str, init: str | None, n2v_fraction: float, compare_on: str | None, patch: str, batch: int, steps: int, lr: float, seed: int,
          depth: int, filters: int, n2v2: bool, batch_norm: bool, z_pool: str, masked_percent: float, struct_mask: str | None,
          val_fraction: float, foreground: float, checkpoint_every: int, val_every: int, early_stop: int | None, keep: str,
          device: str, amp: bool, noise_model: str | None, n_samples: int | None, psf_sigma: str | None, psf: str | None,
          positivity_lambda: float | None, gain: float | None, offset: float | None, noise_sigma: float | None,
          params: tuple[str, ...], channels: tuple[str, ...], overwrite: bool, resume: bool, axes: str | None, level: int) -> None:
    """Train a self-supervised model on INPUT (patches are sampled; the volume is never loaded)."""
    from click.core import ParameterSource

    from quietscope.workflows.train import apply_recommended, train_model

    user_params: dict[str, Any] = {}
    for p in params:
        if "=" not in p:
            raise click.BadParameter(f"{p!r}: expected KEY=VALUE", param_hint="--param")
        k, v = p.split("=", 1)
        try:
            user_params[k] = json.loads(v)
        except json.JSONDecodeError:
            user_params[k] = v
    # Options left at their generic default take the method's recommendation (if it has one).
    ctx = click.get_current_context()
    parsed = {"patch": patch, "batch": batch, "steps": steps, "lr": lr, "depth": depth, "filters": filters, "foreground": foreground,
              "keep": keep}
    given = {k for k in parsed if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    chosen, rec_params, notes = apply_recommended(method, parsed, given, set(user_params))
    for note in notes:
        click.echo(note, err=True)
    patch, batch, steps, lr, depth, filters, foreground, keep = (chosen[k] for k in parsed)
    method_options: dict[str, Any] = {"method": method, "net": {"depth": depth, "filters": filters, "n2v2": n2v2, "batch_norm": batch_norm,
                                                            "z_pool": {"yes": True, "no": False}.get(z_pool, "auto")},
                                      "masked_pixel_percentage": masked_percent}
    files_and_extras = {"noise_model": noise_model, "n_samples": n_samples, "psf": psf, "positivity_lambda": positivity_lambda,
                        "gain": gain, "offset": offset, "noise_sigma": noise_sigma, "struct_mask": struct_mask or None,
                        "psf_sigma": _floats(psf_sigma, "--psf-sigma")}
    method_options.update({k: v for k, v in files_and_extras.items() if v is not None})
    method_options.update({**rec_params, **user_params})
    train_options = {
        "patch": parse_ints(patch, "--patch"), "batch": batch, "steps": steps, "lr": lr, "seed": seed,
        "val_fraction": val_fraction, "foreground": foreground, "checkpoint_every": checkpoint_every,
        "val_every": val_every, "early_stop": early_stop, "keep": keep, "device": device,
    }
    if amp:
        train_options["amp"] = True
    if method == "pn2v-boot":
        from quietscope.workflows.pn2v_boot import train_pn2v_boot

        if resume or init or channels:
            raise click.UsageError("--method pn2v-boot takes neither --resume, --init nor --channels (it trains its own N2V)")
        given_boot = {"n2v_fraction": n2v_fraction, "compare_on": compare_on}
        choice = train_pn2v_boot(input_uri, output, method_options, train_options, axes=axes, level=level,
                                 overwrite=overwrite, **{k: v for k, v in given_boot.items() if v is not None})
        click.echo(f"model: {output} (kept {choice.label}: {choice.reason})")
        return
    res = train_model([input_uri, *channels] if channels else input_uri, output, method_options, train_options, axes=axes, level=level,
                      overwrite=overwrite, resume=resume, init=init)
    best = (f", best validation loss {res.best_val:.5g} at step {res.best_step}; keeps the weights of step {res.kept_step}"
            if res.best_val is not None else "")
    click.echo(f"model: {output} ({res.seconds:.0f} s{best})")


def _floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in str(text).split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} must be a number or comma-separated numbers", param_hint=name) from None


@cli.command()
@click.argument("model")
@click.argument("input_uri", metavar="INPUT")
@click.option("-o", "--output", required=True, help="Output .ome.zarr (or .tif for small data).")
@click.option("--estimate", default=None, type=click.Choice(["mmse", "prior"]), help="pn2v, bayes-poisson, bayes-gauss: the posterior mean (mmse) or the blind-spot prior mean alone (prior); default: the model file's (mmse unless pn2v-boot kept the prior mean).")
@click.option("--samples", "n_samples", default=None, type=int, help="Sampling methods: posterior samples per pixel.")
@click.option("--tta", is_flag=True, help="Test-time augmentation: average the 8 flips/rotations in y/x (8x compute).")
@predict_options
@axes_option
@level_option
@handle_errors
def predict(model: str, input_uri: str, output: str, estimate: str | None, n_samples: int | None, tta: bool,
            axes: str | None, level: int, **kw: Any) -> None:
    """Denoise INPUT with MODEL, block by block, into a multiscale OME-Zarr."""

    from quietscope.workflows.predict import predict as run

    inference = {"estimate": estimate, "n_samples": n_samples}
    res = run(model, input_uri, output, predict_options_from(kw), axes=axes, level=level, inference=inference, tta=tta)
    click.echo(f"output: {res.output} ({res.n_blocks} blocks, halo {list(res.halo)}, {res.voxels_per_s:.3g} voxel/s)")


@cli.command()
@click.option("-o", "--output", default="demo_output", show_default=True, type=click.Path(file_okay=False))
@click.option("--steps", default=300, show_default=True, type=int, help="Training steps (about a minute on 2 CPU cores).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace an existing demo output folder.")
@handle_errors
def demo(output: str, steps: int, seed: int, overwrite: bool) -> None:
    """Build a noisy sample, train N2V, predict chunked, report PSNR before/after."""

    from quietscope.workflows.demo import run_demo

    s = run_demo(output, steps=steps, seed=seed, overwrite=overwrite)
    click.echo("")
    click.echo(f"sample:   {s['sample']} {tuple(s['shape'])}")
    click.echo(f"PSNR:     noisy {s['psnr_noisy_db']:.2f} dB -> denoised {s['psnr_denoised_db']:.2f} dB "
               f"({s['psnr_denoised_db'] - s['psnr_noisy_db']:+.2f} dB)")
    click.echo(f"result:   {s['output']}   (open it in napari: napari --plugin napari-ome-zarr {s['output']})")
    click.echo(f"model:    {s['model']}")


@cli.command()
def methods() -> None:
    """List the available methods."""

    from quietscope.workflows.info import list_methods

    for name, summary in list_methods():
        click.echo(f"{name:<14} {summary}")


def _register_optional_commands() -> None:
    """Commands that live in their own modules (one per feature area)."""
    import importlib

    for mod in ("filter_cmd", "evaluate_cmd", "noise_model_cmd", "inspect_cmd", "calibrate_cmd"):
        try:
            module = importlib.import_module(f"quietscope_cli.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name == f"quietscope_cli.{mod}":
                continue
            raise
        for command in getattr(module, "COMMANDS", []):
            cli.add_command(command)


_register_optional_commands()


def main() -> None:
    cli(prog_name="quietscope")


if __name__ == "__main__":
    main()
