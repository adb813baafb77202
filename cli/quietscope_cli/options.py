"""Shared click options (public interface: scripts in facility pipelines call these names)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from quietscope.errors import ConfigError, validation_message


def parse_ints(text: str | None, name: str) -> tuple[int, ...] | None:
    """``"256,256"`` -> ``(256, 256)``; a clear usage error otherwise."""
    if text is None or text == "":
        return None
    try:
        values = tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=name) from None
    if not values or any(v <= 0 for v in values):
        raise click.BadParameter(f"{text!r}: values must be positive integers", param_hint=name)
    return values


def parse_floats(text: str | None, name: str) -> tuple[float, ...] | None:
    """``"2,0.2,0.2"`` -> ``(2.0, 0.2, 0.2)``; a clear usage error otherwise."""
    if text is None or text == "":
        return None
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=name) from None
    if not values or any(not v > 0 for v in values):
        raise click.BadParameter(f"{text!r}: values must be positive numbers", param_hint=name)
    return values


def axes_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--axes", default=None, help="Axes of the input when metadata lacks them, e.g. zyx or tczyx.")(fn)


def level_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--level", default=0, show_default=True, type=int, help="Resolution level of a multiscale input.")(fn)


_PREDICT_OPTIONS = [
    click.option("--chunks", default=None, help="Output chunk shape over the spatial axes, e.g. 256,256 (default: the input's)."),
    click.option("--block", default=None, help="Block shape (a multiple of --chunks); default chosen from the halo and memory."),
    click.option("--memory", default=None,
                 help="Memory per worker, e.g. 2GB: sizes blocks and the sub-tiles the net sees from the method's "
                      "measured bytes per voxel (default: 1/16 of RAM, or half a GPU's memory)."),
    click.option("--max-tile-voxels", default=None, type=int,
                 help="Instead of --memory: bound voxels of one block plus halo (1500000 for filters), no sub-tiles."),
    click.option("--dtype", default="float32", show_default=True, help="Output dtype (integers are rounded and clipped)."),
    click.option("--ngff", default="0.5", show_default=True, type=click.Choice(["0.4", "0.5"]), help="OME-NGFF version (0.5: zarr v3)."),
    click.option("--levels", "n_levels", default=None, type=int, help="Pyramid levels (default: until y,x fit one chunk)."),
    click.option("--shards", default=None, help="zarr v3 shard shape over the spatial axes (a multiple of --chunks)."),
    click.option("--scale", default=None,
                 help="Physical pixel size per spatial axis, e.g. 2,0.2,0.2 (z,y,x) for an input that lacks it (replaces the input's, with a warning)."),
    click.option("--unit", default=None, help="Unit of --scale: micrometer (default), nanometer, millimeter (um, nm, mm accepted)."),
    click.option("--overwrite", is_flag=True, help="Replace an existing output."),
    click.option("--resume", is_flag=True, help="Finish an interrupted run into the same output."),
    click.option("--scheduler", default=None, help="Address of a running dask scheduler (tcp://host:8786 or tls://... with --tls-*)."),
    click.option("--threads", default=None, type=int, help="Task threads per worker (default: 2 in-process; cores // --workers with --workers)."),
    click.option("--torch-threads", default=None, type=int,
                 help="Intra-op (torch/BLAS) threads per worker process with --workers (default: its cores / --threads)."),
    click.option("--cluster", default="local", show_default=True, type=click.Choice(["local", "slurm"]),
                 help="local: this machine; slurm: dask-jobqueue SLURM jobs from --cluster-profile (docs/cluster.md)."),
    click.option("--workers", default=None, type=int, help="local: N worker processes on 127.0.0.1; slurm: N jobs (one GPU each)."),
    click.option("--cluster-profile", default=None, type=click.Path(dir_okay=False), help="YAML cluster profile (SLURM options, TLS files)."),
    click.option("--tls-ca", default=None, type=click.Path(dir_okay=False), help="TLS CA certificate (PEM) for a tls:// scheduler."),
    click.option("--tls-cert", default=None, type=click.Path(dir_okay=False), help="TLS certificate (PEM) of this client."),
    click.option("--tls-key", default=None, type=click.Path(dir_okay=False), help="TLS private key (PEM) of this client."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--gpus", default=None,
                 help="One worker process per GPU on this machine: all, a count N, or indices 0,2 (docs/cluster.md)."),
    click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                 help="Network precision (autocast): auto = fp32 on the CPU, bf16 on a GPU that has it."),
    click.option("--max-in-flight", default=None, type=int, help="Tasks submitted at once (default 2 x worker threads)."),
    click.option("--blocks-per-task", default=None, type=int,
                 help="Blocks one dask task processes (default 1, more only when the plan exceeds 4096 blocks)."),
    click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
]


def predict_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(_PREDICT_OPTIONS):
        fn = opt(fn)
    return fn


def predict_options_from(kw: dict[str, Any]) -> Any:
    """Build validated ``PredictOptions`` from the parsed click options (consumes them from ``kw``)."""

    from quietscope.workflows.predict import PredictOptions

    values = {
        "chunks": parse_ints(kw.pop("chunks"), "--chunks"),
        "block": parse_ints(kw.pop("block"), "--block"),
        "max_tile_voxels": kw.pop("max_tile_voxels"),
        "memory": kw.pop("memory"),
        "dtype": kw.pop("dtype"),
        "ngff": kw.pop("ngff"),
        "n_levels": kw.pop("n_levels"),
        "shards": parse_ints(kw.pop("shards"), "--shards"),
        "scale": parse_floats(kw.pop("scale"), "--scale"),
        "unit": kw.pop("unit"),
        "overwrite": kw.pop("overwrite"),
        "resume": kw.pop("resume"),
        "scheduler": kw.pop("scheduler"),
        "threads": kw.pop("threads"),
        "torch_threads": kw.pop("torch_threads"),
        "cluster": kw.pop("cluster"),
        "workers": kw.pop("workers"),
        "cluster_profile": kw.pop("cluster_profile"),
        "tls_ca": kw.pop("tls_ca"),
        "tls_cert": kw.pop("tls_cert"),
        "tls_key": kw.pop("tls_key"),
        "device": kw.pop("device"),
        "gpus": kw.pop("gpus"),
        "precision": kw.pop("precision"),
        "max_in_flight": kw.pop("max_in_flight"),
        "blocks_per_task": kw.pop("blocks_per_task"),
        "progress": not kw.pop("no_progress"),
    }
    try:
        return PredictOptions(**values)
    except Exception as exc:
        raise ConfigError(f"invalid option: {validation_message(exc)}") from None
