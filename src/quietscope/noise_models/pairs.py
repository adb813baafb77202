"""Sources of ``(signal, observation)`` pixel pairs for fitting a noise model.

Each function returns two flat float32 arrays ``(s, x)`` of equal length: ``s`` the (estimated)
true signal of a pixel, ``x`` its noisy observation.
"""

from __future__ import annotations

import numpy as np

from quietscope.errors import ConfigError, InputError
from quietscope.noise_models.base import as_float_array


def pairs_from_calibration(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs from a calibration stack: many noisy images of one static sample.

    The signal of a pixel is its mean over the stack (PN2V's calibration protocol), paired
    with each of its noisy values.

    Parameters
    ----------
    stack : np.ndarray, shape (N, ...)
        ``N`` noisy images along axis 0.

    Returns
    -------
    s, x : np.ndarray
        Flat float32 arrays of ``N x`` (pixels per image) pairs.
    """
    data = as_float_array(stack, "calibration stack")
    if data.ndim < 2:
        raise InputError(
            f"calibration stack has shape {data.shape}; pass images stacked along axis 0"
        )
    n = data.shape[0]
    if n < 2:
        raise InputError(
            f"calibration stack has {n} image; need ≥2 (ideally ≥50) noisy images of a "
            "static sample"
        )
    signal = data.mean(axis=0, dtype=np.float64).astype(np.float32)
    s = np.broadcast_to(signal, data.shape).ravel()
    return s, data.astype(np.float32, copy=False).ravel()


def pairs_from_paired(noisy: np.ndarray, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs from noisy images with a clean (ground-truth) counterpart.

    Parameters
    ----------
    noisy : np.ndarray
        Noisy images.
    clean : np.ndarray
        Same shape as ``noisy``, or the shape of one of its images (``noisy.shape[1:]``)
        when ``noisy`` stacks several noisy images of the same clean image.

    Returns
    -------
    s, x : np.ndarray
        Flat float32 arrays.
    """
    x = as_float_array(noisy, "noisy")
    s = as_float_array(clean, "clean")
    if s.shape != x.shape and s.shape != x.shape[1:]:
        raise InputError(
            f"noisy has shape {x.shape} but clean has shape {s.shape}; pass a clean image "
            "of the same shape (or one clean image for a stack of noisy ones)"
        )
    s = np.broadcast_to(s, x.shape)
    return s.astype(np.float32).ravel(), x.astype(np.float32, copy=False).ravel()


def pairs_from_prediction(
    prediction: np.ndarray, data: np.ndarray, clip_percentile: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrapped pairs: a denoiser's prediction as pseudo-signal for the noisy data.

    As in Prakash et al. (2020), the pixels whose pseudo-signal lies in the lowest or
    highest ``clip_percentile`` percent are dropped: a denoiser is least reliable there.

    Parameters
    ----------
    prediction : np.ndarray
        Denoised version of ``data`` (e.g. by Noise2Void), same shape.
    data : np.ndarray
        The noisy data.
    clip_percentile : float, optional
        Percent of pixels dropped at each end of the pseudo-signal range, in ``[0, 50)``.

    Returns
    -------
    s, x : np.ndarray
        Flat float32 arrays.
    """
    s = as_float_array(prediction, "prediction")
    x = as_float_array(data, "data")
    if s.shape != x.shape:
        raise InputError(
            f"prediction has shape {s.shape} but data has shape {x.shape}; pass the "
            "prediction made for exactly this data"
        )
    if not 0 <= clip_percentile < 50:
        raise ConfigError(
            f"clip_percentile={clip_percentile} is invalid; use a percent in [0, 50), e.g. 0.5"
        )
    s, x = s.astype(np.float32).ravel(), x.astype(np.float32).ravel()
    low, high = np.percentile(s, [clip_percentile, 100 - clip_percentile])
    keep = (s >= low) & (s <= high)
    return s[keep], x[keep]
