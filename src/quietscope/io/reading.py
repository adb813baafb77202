"""Open images lazily: OME-Zarr (NGFF 0.4 / zarr v2 and 0.5 / zarr v3), plain zarr arrays, TIFF.

Everything is read-only and lazy: opening reads metadata only; pixels are read region by
region (:meth:`Image.read`), or through the dask array :attr:`Image.data`.
Axes are always presented in NGFF canonical order (a subset of ``tczyx``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from quietscope.errors import InputError
from quietscope.io import stores

log = logging.getLogger(__name__)

CANONICAL = "tczyx"
SPATIAL = "zyx"
_TIFF_AXES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x", "Q": "z", "I": "t"}


@dataclass(frozen=True)
class ImageRef:
    """What is needed to re-open an image in another process (cheap to pickle)."""

    uri: str
    level: int = 0
    axes: str | None = None


@dataclass
class Image:
    """A lazily read image with its axes and physical scale.

    ``array`` is the source (zarr array or compatible) in the source's axis order; ``perm``
    maps canonical axes to source axes.
    """

    ref: ImageRef
    array: Any
    axes: str
    source_axes: str
    scale: tuple[float, ...]
    units: tuple[str | None, ...]
    n_levels: int
    kind: str
    channel_names: list[str] | None = None
    metadata: dict = field(default_factory=dict)
    #: Physical position of the first voxel's centre per axis (NGFF ``translation``; zeros when absent).
    translation: tuple[float, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        src = dict(zip(self.source_axes, self.array.shape))
        return tuple(src[a] for a in self.axes)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        ch = getattr(self.array, "chunks", None) or self.array.shape
        src = dict(zip(self.source_axes, ch))
        return tuple(int(src[a]) for a in self.axes)

    @property
    def spatial_axes(self) -> str:
        return "".join(a for a in self.axes if a in SPATIAL)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(s for s, a in zip(self.shape, self.axes) if a in SPATIAL)

    @property
    def n_channels(self) -> int:
        return self.shape[self.axes.index("c")] if "c" in self.axes else 1

    @property
    def n_timepoints(self) -> int:
        return self.shape[self.axes.index("t")] if "t" in self.axes else 1

    @property
    def perm(self) -> tuple[int, ...]:
        return tuple(self.source_axes.index(a) for a in self.axes)

    @property
    def data(self) -> da.Array:
        """Dask view in canonical axis order (chunked as stored)."""
        arr = da.from_array(self.array, chunks=tuple(getattr(self.array, "chunks", None) or self.array.shape))
        return arr.transpose(self.perm)

    def read(self, slices: tuple[slice, ...]) -> np.ndarray:
        """Read a region given as canonical-order slices (one per axis of :attr:`axes`)."""
        src_slices = [slice(None)] * len(self.source_axes)
        for a, s in zip(self.axes, slices):
            src_slices[self.source_axes.index(a)] = s
        out = np.asarray(self.array[tuple(src_slices)])
        return out.transpose(self.perm)

    def read_tc(self, t: int, spatial: tuple[slice, ...], channel: int | None = None) -> np.ndarray:
        """Read ``(C, *spatial)`` at time point ``t`` (C=1 when there is no channel axis).

        With ``channel`` only that channel is read (C=1): the others' chunks are never fetched.
        """
        if channel is not None and not 0 <= channel < self.n_channels:
            raise InputError(f"channel {channel} is out of range: the image has {self.n_channels} channel(s)")
        sl: list[slice | int] = []
        for a in self.axes:
            if a == "t":
                sl.append(slice(t, t + 1))
            elif a == "c":
                sl.append(slice(None) if channel is None else slice(channel, channel + 1))
            else:
                sl.append(spatial[self.spatial_axes.index(a)])
        arr = self.read(tuple(sl))  # type: ignore[arg-type]
        if "t" in self.axes:
            arr = arr[0]
        if "c" not in self.axes:
            arr = arr[None]
        return arr

    def describe(self) -> dict[str, Any]:
        """Axes, shape, chunks, dtype, scale, units and levels, as plain data (for ``info``)."""
        return {
            "uri": self.ref.uri,
            "kind": self.kind,
            "axes": self.axes,
            "shape": list(self.shape),
            "chunks": list(self.chunks),
            "dtype": str(self.dtype),
            "scale": list(self.scale),
            "units": list(self.units),
            "translation": list(self.translation),
            "level": self.ref.level,
            "levels": self.n_levels,
            "channel_names": self.channel_names,
            "size_bytes": int(math.prod(self.shape) * self.dtype.itemsize),
        }


def validate_axes(axes: str, ndim: int, where: str) -> str:
    """Check an axes string (``tczyx`` subset, each once, matching ``ndim``); return it lowercase."""
    ax = axes.lower()
    bad = [a for a in ax if a not in CANONICAL]
    if bad or len(set(ax)) != len(ax):
        raise InputError(
            f"axes {axes!r} for {where} are invalid: use each of t, c, z, y, x at most once (e.g. --axes zyx)"
        )
    if len(ax) != ndim:
        raise InputError(
            f"axes {axes!r} name {len(ax)} axes but {where} has {ndim} dimensions; pass --axes with {ndim} letters"
        )
    if "y" not in ax or "x" not in ax:
        raise InputError(f"axes {axes!r} for {where} lack y and x; images need at least yx (e.g. --axes zyx)")
    return ax


def resolve_axes(given: str | None, named: str | None, ndim: int, where: str, source: str) -> str:
    """The source axes of an image: ``--axes`` where the metadata names none, else the metadata's.

    ``--axes`` that contradicts axes the metadata names is refused rather than obeyed: it
    would silently reinterpret the data (time read as z, channels as planes). Metadata axes
    that are not a valid ``tczyx`` set (e.g. ``dim_0``) count as not named, so ``--axes``
    still overrides them.

    Parameters
    ----------
    given : str or None
        ``--axes`` as typed.
    named : str or None
        One letter per dimension from the metadata, or None where it names no axes.
    ndim : int
        Dimensions of the array.
    where : str
        The input, for messages.
    source : str
        Which metadata named the axes, for the message (e.g. ``"OME-Zarr multiscales metadata"``).

    Raises
    ------
    InputError
        Invalid axes, or ``--axes`` contradicting the metadata.
    """
    if given is None:
        return validate_axes(named if named is not None else _default_axes(ndim, where), ndim, where)
    if named is not None and _is_valid(named, ndim) and given.lower() != named:
        raise InputError(
            f"--axes {given} contradicts the axes {named} in the {source} of {where!r}; "
            f"drop --axes (or pass --axes {named}), or correct the file's metadata if it is wrong"
        )
    return validate_axes(given, ndim, where)


def _is_valid(axes: str, ndim: int) -> bool:
    try:
        validate_axes(axes, ndim, "")
    except InputError:
        return False
    return True


def _canonical(axes: str) -> str:
    return "".join(a for a in CANONICAL if a in axes)


def _default_axes(ndim: int, where: str) -> str:
    if ndim == 2:
        return "yx"
    if ndim == 3:
        return "zyx"
    raise InputError(f"{where} has {ndim} dimensions and no axis metadata; pass --axes (e.g. --axes czyx)")


def split_uri(uri: str) -> tuple[Path, str]:
    """Split ``path.zarr/group/array`` into the store root and the path inside it."""
    p = Path(uri)
    parts = p.parts
    for i, part in enumerate(parts):
        if part.endswith(".zarr") or part.endswith(".zarr/"):
            return Path(*parts[: i + 1]), "/".join(parts[i + 1 :])
    return p, ""


def open_image(uri: str | os.PathLike, level: int = 0, axes: str | None = None) -> Image:
    """Open an image lazily.

    Parameters
    ----------
    uri
        OME-Zarr group, plain zarr array (``store.zarr/path/to/array``) or TIFF file.
    level
        Resolution level of a multiscale image (0 = full resolution).
    axes
        Overrides the axes from metadata (a ``tczyx`` subset in the data's dimension order).
    """
    uri = str(uri)
    if stores.is_url(uri) and not stores.is_local(uri):
        return _open_url(ImageRef(uri.rstrip("/"), level, axes))
    uri = str(stores.local_path(uri))
    root, inner = split_uri(uri)
    if not root.exists():
        raise InputError(f"input {uri!r} does not exist; check the path")
    ref = ImageRef(uri, level, axes)
    suffix = root.suffix.lower()
    if suffix in (".tif", ".tiff", ".btf") or uri.lower().endswith(".ome.tif"):
        return _open_tiff(ref, Path(uri))
    if root.is_dir():
        return _open_zarr(ref, root, inner)
    raise InputError(f"input {uri!r} is neither a zarr store nor a TIFF file; give an .ome.zarr, .zarr or .tif path")


def _open_url(ref: ImageRef) -> Image:
    """An OME-Zarr or zarr array at a URL (s3://, gs://, https://), read through zarr's fsspec
    store; credentials come from the environment and profile files, never from quietscope.
    """
    if ref.uri.lower().endswith((".tif", ".tiff", ".btf")):
        raise InputError(f"input {ref.uri!r}: TIFF inputs must be local files; copy it here or convert it to OME-Zarr")
    stores.filesystem(ref.uri)  # a missing s3fs/gcsfs/aiohttp is named here, not as a zarr error
    return _open_zarr(ref, Path(), "", location=ref.uri)


def _open_zarr(ref: ImageRef, root: Path, inner: str, location: str | None = None) -> Image:
    import zarr

    try:
        node = zarr.open(store=location or (str(root / inner) if inner else str(root)), mode="r")
    except Exception as exc:  # zarr raises several types for "not a zarr"
        raise InputError(f"cannot open {ref.uri!r} as zarr ({type(exc).__name__}: {exc}); is it a zarr store?") from None
    if isinstance(node, zarr.Array):
        attrs = dict(node.attrs)
        names = getattr(node.metadata, "dimension_names", None) or attrs.get("_ARRAY_DIMENSIONS")
        named = "".join(str(n)[0] for n in names) if names and all(names) else None
        if named is None and ref.axes is None:
            log.info("no axis metadata in %s: assuming %s (override with --axes)", ref.uri, _default_axes(node.ndim, ref.uri))
        src_axes = resolve_axes(ref.axes, named, node.ndim, ref.uri, "zarr dimension names")
        if ref.level != 0:
            raise InputError(f"{ref.uri!r} is a single array, not a multiscale image; drop --level")
        return _make(ref, node, src_axes, None, None, 1, "zarr-array", None, attrs)
    attrs = dict(node.attrs)
    ome = attrs.get("ome", attrs)
    ms = ome.get("multiscales")
    if not ms:
        arrays = sorted(k for k, _ in node.arrays())
        hint = f" (it contains arrays {arrays[:5]}: give one as {ref.uri}/NAME)" if arrays else ""
        raise InputError(f"{ref.uri!r} is a zarr group without OME-NGFF multiscales metadata{hint}")
    ms0 = ms[0]
    datasets = ms0["datasets"]
    if not 0 <= ref.level < len(datasets):
        raise InputError(f"--level {ref.level} does not exist in {ref.uri!r}: it has levels 0..{len(datasets) - 1}")
    ds = datasets[ref.level]
    arr = node[ds["path"]]
    axes_meta = ms0.get("axes")
    named = None  # NGFF 0.3 and earlier: axes absent
    if axes_meta is not None:
        named = "".join((a["name"] if isinstance(a, dict) else a)[0].lower() for a in axes_meta)
    src_axes = resolve_axes(ref.axes, named, arr.ndim, ref.uri, "OME-Zarr multiscales metadata")
    scale, translation = _transforms(ds, ms0, arr.ndim)
    units = None
    if axes_meta is not None and all(isinstance(a, dict) for a in axes_meta):
        units = [a.get("unit") for a in axes_meta]
    channels = None
    omero = ome.get("omero")
    if omero and omero.get("channels"):
        channels = [c.get("label", f"ch{i}") for i, c in enumerate(omero["channels"])]
    return _make(ref, arr, src_axes, scale, units, len(datasets), "ome-zarr", channels, attrs, translation)


def _transforms(ds: dict, ms0: dict, ndim: int) -> tuple[list[float] | None, list[float]]:
    """Scale and translation of one dataset (NGFF: the dataset's, then the multiscale-wide ones)."""
    scale: list[float] | None = None
    translation = [0.0] * ndim
    for t in ds.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            translation = [float(v) for v in t["translation"]]
    for t in ms0.get("coordinateTransformations", []):  # applied after the dataset's
        if t.get("type") == "scale" and scale is not None:
            scale = [a * float(b) for a, b in zip(scale, t["scale"])]
            translation = [a * float(b) for a, b in zip(translation, t["scale"])]
        elif t.get("type") == "translation":
            translation = [a + float(b) for a, b in zip(translation, t["translation"])]
    return scale, translation


def _open_tiff(ref: ImageRef, path: Path) -> Image:
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            n_levels = len(series.levels)
            tiff_axes = series.axes
            axes_source = _tiff_axes_source(tf, series)
            scale_xy = _tiff_pixel_size(tf)
            ij = tf.imagej_metadata or {}
    except Exception as exc:
        raise InputError(f"cannot read TIFF {str(path)!r}: {exc}") from None
    check_tiff_complete(path)
    if not 0 <= ref.level < n_levels:
        raise InputError(f"--level {ref.level} does not exist in {str(path)!r}: it has levels 0..{n_levels - 1}")
    store = tifffile.imread(path, aszarr=True, level=ref.level)
    arr = zarr.open(store, mode="r")
    if ref.axes:
        named = "".join(_TIFF_AXES[a] for a in tiff_axes) if axes_source else None
        src_axes = resolve_axes(ref.axes, named, arr.ndim, ref.uri, axes_source or "")
    else:
        try:
            src_axes = "".join(_TIFF_AXES[a] for a in tiff_axes)
            src_axes = validate_axes(src_axes, arr.ndim, ref.uri)
        except (KeyError, InputError):
            raise InputError(
                f"TIFF {str(path)!r} has axes {tiff_axes!r} that quietscope cannot map; pass --axes (e.g. --axes zyx)"
            ) from None
    scale = [1.0] * arr.ndim
    units: list[str | None] = [None] * arr.ndim
    if scale_xy is not None:
        for a in "yx":
            if a in src_axes:
                scale[src_axes.index(a)] = scale_xy
                units[src_axes.index(a)] = "micrometer"
    if "z" in src_axes and ij.get("spacing"):
        scale[src_axes.index("z")] = float(ij["spacing"])
        units[src_axes.index("z")] = "micrometer"
    return _make(ref, arr, src_axes, scale, units, n_levels, "tiff", None, {})


def check_tiff_complete(path: Path, max_decode_bytes: int = 64 << 20) -> None:
    """Refuse a truncated or corrupt TIFF at open, in one line (not at the first block read).

    Every page's pixel data must lie inside the file (truncated copies fail here), and the last
    page must decode (corrupt compressed data fails here) when it is smaller than
    ``max_decode_bytes``.

    Raises
    ------
    InputError
        The file is truncated or its last page cannot be decoded.
    """
    import tifffile

    size = path.stat().st_size
    problems = _TiffProblems()
    tiff_log = logging.getLogger("tifffile")
    tiff_log.addHandler(problems)
    try:
        with tifffile.TiffFile(path) as tf:
            last, end = None, 0
            for page in tf.pages:
                offsets, counts = page.dataoffsets, page.databytecounts
                if offsets:
                    end = max(end, max(o + c for o, c in zip(offsets, counts)))
                last = page
            if problems.messages:  # tifffile logs, and drops, pages whose offsets lie past the end
                raise InputError(f"TIFF {str(path)!r} is truncated or damaged ({problems.messages[0]}); "
                                 "copy it again from the source")
            if end > size:
                raise InputError(f"TIFF {str(path)!r} is truncated: its pixel data needs {end} bytes but the file has "
                                 f"{size}; copy it again from the source")
            if last is not None and getattr(last, "nbytes", 0) <= max_decode_bytes:
                last.asarray()
    except InputError:
        raise
    except Exception as exc:  # tifffile and its codecs raise many types for damaged data
        raise InputError(f"TIFF {str(path)!r} is corrupt ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "copy it again from the source") from None
    finally:
        tiff_log.removeHandler(problems)


class _TiffProblems(logging.Handler):
    """Collects the errors tifffile logs (instead of raising) while a file is checked."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().split("> ", 1)[-1])


def _tiff_axes_source(tf: Any, series: Any) -> str | None:
    """Which metadata of a TIFF names its axes (ImageJ, OME, tifffile's own), or None.

    tifffile reports axes for every file, but for files without such metadata they are its
    guesses (``Q`` unknown, ``I`` image sequence, ``S`` for a short first dimension), which
    ``--axes`` may override.
    """
    axes = series.axes
    if any(a not in _TIFF_AXES or a in "QI" for a in axes):
        return None
    if series.kind == "imagej":
        return "ImageJ metadata"
    if series.kind == "ome":
        return "OME-XML metadata"
    if series.kind == "shaped" and any("axes" in m for m in (tf.shaped_metadata or ())):
        return "tifffile metadata"
    return None


def _tiff_pixel_size(tf: Any) -> float | None:
    """Pixel size in micrometres from the resolution tags, or None when unknown.

    A resolution of exactly 1 pixel per unit is what writers put when they know nothing (the
    TIFF default, and ImageJ's "pixel" calibration); read as a measurement it would make a
    1 cm pixel. It is treated as unknown (scale 1, no unit), and so is an ImageJ file without
    a unit.
    """
    try:
        page = tf.pages[0]
        num, den = page.tags["XResolution"].value
        unit = page.tags.get("ResolutionUnit")
        if num <= 0:
            return None
        if num == den:
            log.info("%s: resolution of 1 pixel per unit is a writer's default, not a measurement: "
                     "pixel size unknown (pass --scale to set it)", tf.filehandle.name)
            return None
        size = den / num
        ij = tf.imagej_metadata
        if ij and ij.get("unit") in ("micron", "um", "µm", "\\u00B5m"):
            return float(size)
        if ij is not None and ij.get("unit") in (None, "", "pixel"):
            log.info("%s: ImageJ calibration without a unit: pixel size unknown (pass --scale to set it)", tf.filehandle.name)
            return None
        if unit is not None and int(unit.value) == 3:  # centimetre
            return float(size * 1e4)
        return float(size) if ij else None
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _make(
    ref: ImageRef,
    arr: Any,
    src_axes: str,
    scale: list[float] | None,
    units: list[str | None] | None,
    n_levels: int,
    kind: str,
    channels: list[str] | None,
    attrs: dict,
    translation: list[float] | None = None,
) -> Image:
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "uif" or dtype.kind == "c":
        raise InputError(
            f"{ref.uri!r} has dtype {dtype}, which is not a real number type; convert it to uint/int/float first"
        )
    canon = _canonical(src_axes)
    scale = scale or [1.0] * len(src_axes)
    units = units or [None] * len(src_axes)
    s_map = dict(zip(src_axes, scale))
    u_map = dict(zip(src_axes, units))
    t_map = dict(zip(src_axes, translation or [0.0] * len(src_axes)))
    return Image(
        ref=ref,
        array=arr,
        axes=canon,
        source_axes=src_axes,
        scale=tuple(float(s_map[a]) for a in canon),
        units=tuple(u_map[a] for a in canon),
        n_levels=n_levels,
        kind=kind,
        channel_names=channels,
        metadata=json.loads(json.dumps(attrs, default=str)),
        translation=tuple(float(t_map[a]) for a in canon),
    )
