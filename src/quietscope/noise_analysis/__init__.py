"""Know your noise: camera noise model, noise correlation, and which method to use.

All functions work on a *sample* of blocks (a list of 2D ``(y, x)`` or 3D ``(z, y, x)``
numpy arrays read from a larger image), never on whole volumes.
"""

from quietscope.noise_analysis.correlation import (
    AxisCorrelation,
    NoiseStructure,
    ResidualQuality,
    detect_structured_noise,
    noise_autocorrelation,
    raw_noise_autocorrelation,
    residual,
    residual_quality,
)
from quietscope.noise_analysis.plots import plot_autocorrelation, plot_mean_variance
from quietscope.noise_analysis.poisson_gaussian import (
    PoissonGaussianEstimate,
    estimate_poisson_gaussian,
)
from quietscope.noise_analysis.report import NoiseReport, analyse_noise, build_report

__all__ = [
    "AxisCorrelation",
    "NoiseReport",
    "NoiseStructure",
    "PoissonGaussianEstimate",
    "ResidualQuality",
    "analyse_noise",
    "build_report",
    "detect_structured_noise",
    "estimate_poisson_gaussian",
    "noise_autocorrelation",
    "plot_autocorrelation",
    "plot_mean_variance",
    "raw_noise_autocorrelation",
    "residual",
    "residual_quality",
]
