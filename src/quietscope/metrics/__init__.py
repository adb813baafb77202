"""Image-quality metrics (PSNR, range-invariant PSNR, SSIM, SNR) and helpers to report them."""

from quietscope.metrics.image_quality import (
    affine_fit,
    mean_and_sem,
    psnr,
    range_invariant_psnr,
    snr,
    ssim,
)

__all__ = ["affine_fit", "mean_and_sem", "psnr", "range_invariant_psnr", "snr", "ssim"]
