"""Weight averaging: an exponential moving average (EMA) of a method's parameters.

torch's own :class:`torch.optim.swa_utils.AveragedModel` with
:func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` holds the average:
``avg ← decay · avg + (1 − decay) · weights`` after every optimiser step, starting from the
weights of the first step. Only parameters are averaged; buffers (normalisation, step counters,
noise models) are always the live model's, so the averaged weights can be put into the method
itself (:meth:`WeightAverage.applied`, :meth:`WeightAverage.state_dict_for`) and scored or
saved like its own.

A decay ``d`` averages over about ``1 / (1 − d)`` steps (0.999: ~1000 steps, the last 693
holding half the weight).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """An exponential moving average of ``module``'s parameters, updated by :meth:`update`."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.model = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=False)

    @property
    def n_averaged(self) -> int:
        """Updates so far (0: the average holds nothing yet)."""
        return int(self.model.n_averaged)

    def update(self, module: torch.nn.Module) -> None:
        """Fold ``module``'s current parameters into the average (call after each optimiser step)."""
        self.model.update_parameters(module)

    def state_dict_for(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s state dict (detached copies) with the averaged parameters in place of its own."""
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if self.n_averaged == 0:
            return state
        averaged = dict(self.model.module.named_parameters())
        for name, _ in module.named_parameters():
            state[name] = averaged[name].detach().to(state[name].device).clone()
        return state

    @contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[None]:
        """Within the block ``module`` holds the averaged parameters; its own are put back after."""
        own = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.state_dict_for(module))
        try:
            yield
        finally:
            module.load_state_dict(own)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds to continue the average exactly."""
        return {"decay": self.decay, "average": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state["decay"]) != self.decay:
            raise ValueError(f"the checkpoint's average has decay {state['decay']}, this run {self.decay}")
        self.model.load_state_dict(state["average"])
