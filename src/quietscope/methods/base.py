"""The one protocol every method honours, and the registry that maps ``--method`` names to them.

A method is a :class:`torch.nn.Module` that owns its network(s), its normalisation and any
noise model (as buffers, so that all of it lands in the model file's tensors). It sees raw
intensities (float32, input units) and never touches I/O or scheduling:

* ``training_loss(batch, generator)`` – the self-supervised loss on a batch of raw patches
  shaped ``(B, C, *patch)``; the method does its own masking/normalisation.
* ``predict(x)`` – raw tile ``(B, C, *spatial)`` -> outputs ``(B, K, *spatial)`` in output units,
  one channel per name in ``output_names``.
* ``downsampling_factor`` – tiles must start and end on multiples of it (pooling grid).
* ``extra_halo`` – halo beyond the network's receptive field (e.g. a PSF's support), per axis.

The receptive field itself is *measured* from ``predict`` (``quietscope.nets.receptive_field``),
never declared, so a method cannot get its halo wrong by forgetting a layer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from quietscope.errors import ConfigError, validation_message


class NetConfig(BaseModel):
    """U-Net shape shared by the blind-spot methods."""

    model_config = ConfigDict(extra="forbid")

    depth: int = Field(2, ge=1, le=5, description="number of down-sampling levels")
    filters: int = Field(32, ge=1, le=512, description="feature maps at the first level")
    # Off by default: with small batches of patches from images that are mostly background,
    # batch statistics swing from batch to batch and the eval-mode running statistics do not
    # match what the net was trained under; measured on the BPAE field (benchmarks/batch_norm.py,
    # docs/benchmarks.md section 3), N2V with batch norm darkened bright structures by 3-10 %
    # (33.1 vs 35.3 dB without, 2 seeds).
    batch_norm: bool = Field(False, description="batch normalisation in the U-Net's conv blocks")
    n2v2: bool = Field(False, description="blur-pool down-sampling and no top skip (N2V2)")
    z_pool: bool = Field(
        True,
        description="3D: down-sample along z as well as y/x; off for anisotropic stacks (z step "
        "several times the pixel size), which keeps z at full resolution and narrows the z halo",
    )

    def pool(self, spatial_ndim: int) -> tuple[int, ...]:
        """Per-axis pooling of the U-Net's levels (``(1, 2, 2)`` for a 3D net without z pooling)."""
        return ((2 if self.z_pool else 1), 2, 2) if spatial_ndim == 3 else (2,) * spatial_ndim


class MethodConfig(BaseModel):
    """Base configuration of a method; each method subclasses it with its own fields."""

    model_config = ConfigDict(extra="forbid")

    method: str
    spatial_ndim: int = Field(..., ge=2, le=3)
    in_channels: int = Field(1, ge=1)
    net: NetConfig = Field(default_factory=NetConfig)


class Method(torch.nn.Module):
    """Base class of all methods. Subclasses set ``name`` and ``Config`` and implement the API."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: False for classic filters: nothing to train, nothing to normalise.
    trainable: ClassVar[bool] = True

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config
        c = config.in_channels
        # Per-channel normalisation, stored as buffers so the model file carries it.
        self.register_buffer("norm_mean", torch.zeros(c))
        self.register_buffer("norm_std", torch.ones(c))

    # ---- normalisation -------------------------------------------------------------
    def set_normalization(self, mean: Any, std: Any) -> None:
        """Set per-channel mean/std (raw units) estimated from the training data."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() != self.config.in_channels or std_t.numel() != self.config.in_channels:
            raise ConfigError(
                f"normalisation has {mean_t.numel()} channels but the method expects "
                f"{self.config.in_channels}"
            )
        self.norm_mean.copy_(mean_t)
        self.norm_std.copy_(torch.clamp(std_t, min=1e-6))

    def data_coverage_warning(self, low: float, high: float) -> str | None:
        """A warning when the training data go beyond what a fitted component knows.

        ``[low, high]`` is the signal span (1st/99th percentile of smoothed patches, raw units);
        ``None`` when all is well.
        """
        return None

    def _bcast(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        return v.reshape((1, -1) + (1,) * (ndim - 2))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw intensities to the network's units (per-channel mean and std of the training data)."""
        return (x - self._bcast(self.norm_mean, x.ndim)) / self._bcast(self.norm_std, x.ndim)

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """Network units back to raw intensities."""
        return y * self._bcast(self.norm_std, y.ndim) + self._bcast(self.norm_mean, y.ndim)

    # ---- the protocol --------------------------------------------------------------
    @property
    def output_names(self) -> list[str]:
        """Names of the output channels, written into the OME-Zarr ``omero`` metadata."""
        if self.config.in_channels == 1:
            return ["denoised"]
        return [f"denoised_ch{i}" for i in range(self.config.in_channels)]

    #: Training options this method recommends in place of the command line's generic
    #: defaults, keyed by ``quietscope train`` option name (``patch``, ``steps``, ``depth``, ...;
    #: ``params`` for ``--param`` keys); the CLI applies each one the user did not give.
    recommended_options: ClassVar[dict[str, Any]] = {}

    #: Whether the method's network can keep full z resolution (``net.z_pool = False``).
    supports_z_pool_off: ClassVar[bool] = False

    @property
    def downsampling_factor(self) -> int | tuple[int, ...]:
        """Tiles start and end on multiples of this (an int, or one value per spatial axis)."""
        return 1

    @property
    def extra_halo(self) -> tuple[int, ...]:
        return (0,) * self.config.spatial_ndim

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The self-supervised loss of one batch of raw patches ``(B, C, *spatial)``."""
        raise NotImplementedError

    def prepare_training(self, patch: tuple[int, ...]) -> tuple[int, ...]:
        """Called once before training with the ``--patch`` shape; returns the shape to sample.

        A method that needs surroundings (e.g. lateral context) asks for more, and may record
        what prediction needs later (as a buffer).
        """
        return tuple(patch)

    def validation_metrics(self, batch: torch.Tensor) -> dict[str, float]:
        """Extra numbers on the validation patches, logged at every validation.

        An entry ``"select"`` (lower is better) replaces the validation loss as the criterion of
        the kept ("best") weights, for methods whose loss does not see what matters.
        """
        return {}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predict a raw tile batch ``(B, C, *spatial)``: the named outputs, in input units."""
        raise NotImplementedError

    #: Prediction-time options a method accepts (``quietscope predict --estimate/--samples``).
    inference_options: ClassVar[tuple[str, ...]] = ()
    #: Values of the ``estimate`` option, when the method has one: ``"mmse"`` (the posterior
    #: mean, the pixel folded back in) and ``"prior"`` (the blind-spot prediction alone).
    estimate_choices: ClassVar[tuple[str, ...]] = ()

    @property
    def loss_pixel_fraction(self) -> float:
        """Share of a batch's pixels that one evaluation of :meth:`training_loss` scores:
        1 for losses over every pixel, the masked share for masking methods. Validation
        repeats the loss over more mask draws when one draw scores too few pixels.
        """
        return 1.0

    #: Whether ``predict --tta`` (mean over flips/rotations in y/x) is meaningful: False for
    #: outputs that are not a per-pixel estimate (e.g. a sample standard deviation).
    supports_tta: ClassVar[bool] = True

    def set_inference(self, **options: Any) -> None:
        """Apply prediction-time options; options the method does not know are an error."""
        for key, value in options.items():
            if value is None:
                continue
            if key not in self.inference_options:
                raise ConfigError(
                    f"method {self.name!r} has no prediction option {key!r}"
                    + (f" (it accepts: {', '.join(self.inference_options)})" if self.inference_options else "")
                )
            if key == "estimate" and value not in self.estimate_choices:
                raise ConfigError(
                    f"--estimate {value!r} is unknown for {self.name}; use {' or '.join(self.estimate_choices)}"
                )
            setattr(self, key, value)

    @property
    def predict_in_channels(self) -> int:
        """Channels of the image given to :meth:`predict` (differs from the training data's
        channels for splitting methods, which train on the separate structures).
        """
        return self.config.in_channels

    def summary(self) -> dict[str, Any]:
        """Extra facts for logs and ``quietscope info`` (override to add)."""
        return {}


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the ``--method`` registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    """The method class registered as ``name``; a ConfigError listing the names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; choose one of: {', '.join(available_methods())}"
        ) from None


def build_method(config: dict[str, Any] | MethodConfig) -> Method:
    """Validate ``config`` against the method's own pydantic model and build the method."""
    if isinstance(config, MethodConfig):
        config = config.model_dump()
    cls = get_method_class(str(config.get("method", "")))
    try:
        cfg = cls.Config.model_validate(config)
    except Exception as exc:  # pydantic.ValidationError: reduce to one line
        raise ConfigError(f"invalid configuration for method {cls.name!r}: {validation_message(exc)}") from None
    if not cfg.net.z_pool and not cls.supports_z_pool_off:
        raise ConfigError(f"method {cls.name!r} always down-samples z; drop --z-pool no (only U-Net methods keep full z resolution)")
    return cls(cfg)
