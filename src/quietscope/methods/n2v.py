"""Noise2Void (Krull et al. 2019) and N2V2 (Höck et al. 2022).

Assumes noise that is pixel-wise independent given the signal and zero-mean: then the
expected value of a pixel given its neighbours (without itself) is the clean signal, and a
network trained to predict masked pixels from their surroundings learns it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from quietscope.methods.base import Method, MethodConfig, register
from quietscope.methods.masking import n2v_mask
from quietscope.nets.unet import UNet


class N2VConfig(MethodConfig):
    method: Literal["n2v", "n2v2"] = "n2v"
    masked_pixel_percentage: float = Field(0.2, gt=0, le=20, description="% of pixels masked per patch")
    roi_size: int = Field(5, ge=3, le=21, description="neighbourhood for replacement values (odd)")
    strategy: Literal["uniform", "median"] = "uniform"
    struct_mask: list[list[int]] | list[list[list[int]]] | None = Field(
        None, description="structN2V kernel (nested lists of 0/1, odd sizes, centred)"
    )

    @model_validator(mode="after")
    def _n2v2_defaults(self) -> N2VConfig:
        if self.roi_size % 2 == 0:
            raise ValueError("roi_size must be odd")
        if self.method == "n2v2":
            # N2V2 = median replacement + blur-pool + no top skip connection.
            self.strategy = "median"
            self.net.n2v2 = True
        return self


@register
class N2V(Method):
    """Blind-spot training by masking; prediction is a plain U-Net forward pass."""

    name: ClassVar[str] = "n2v"
    Config = N2VConfig

    def __init__(self, config: N2VConfig) -> None:
        super().__init__(config)
        n = config.net
        self.net = UNet(
            config.spatial_ndim,
            config.in_channels,
            config.in_channels,
            depth=n.depth,
            filters=n.filters,
            batch_norm=n.batch_norm,
            n2v2=n.n2v2,
            pool=n.pool(config.spatial_ndim),
        )

    supports_z_pool_off: ClassVar[bool] = True

    @property
    def downsampling_factor(self) -> int | tuple[int, ...]:
        return self.net.downsampling_factor

    @property
    def loss_pixel_fraction(self) -> float:
        return self.config.masked_pixel_percentage / 100.0

    def _struct(self) -> np.ndarray | None:
        s = self.config.struct_mask
        return None if s is None else np.asarray(s, dtype=bool)

    def blind_spot_mask(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """N2V masking (with the structN2V kernel when configured) of a normalised batch;
        returns ``(masked_input, mask)`` on ``x``'s device. Shared by every N2V-family method."""
        cfg = self.config
        masked, mask = n2v_mask(
            x.cpu(), cfg.masked_pixel_percentage, cfg.roi_size, cfg.strategy, generator, struct_mask=self._struct()
        )
        return masked.to(x.device), mask.to(x.device)

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.normalize(batch)
        masked, mask = self.blind_spot_mask(x, generator)
        pred = self.net(masked)
        return ((pred - x) ** 2)[mask].mean()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.denormalize(self.net(self.normalize(x)))


@register
class N2V2(N2V):
    name: ClassVar[str] = "n2v2"
