"""Open and describe images; create multiscale outputs; read and write regions. No torch here."""

from quietscope.io.reading import Image, ImageRef, open_image, validate_axes
from quietscope.io.validation import check_finite_sample
from quietscope.io.writing import (
    OutputSpec,
    build_pyramid,
    cast_to,
    check_output_path,
    create_ome_zarr,
    open_level,
    remove_output,
    write_tiff,
)

__all__ = [
    "Image",
    "ImageRef",
    "OutputSpec",
    "build_pyramid",
    "cast_to",
    "check_finite_sample",
    "check_output_path",
    "create_ome_zarr",
    "open_image",
    "open_level",
    "remove_output",
    "validate_axes",
    "write_tiff",
]
