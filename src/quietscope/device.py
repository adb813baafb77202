"""Which torch device a job runs on: one rule for training, prediction and noise inspection."""

from __future__ import annotations

import torch

from quietscope.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """Turn a device name into a :class:`torch.device`.

    Parameters
    ----------
    name : str
        ``"auto"`` (CUDA when a GPU is visible, else the CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``.

    Returns
    -------
    torch.device
        The device to run on.

    Raises
    ------
    ConfigError
        When the name is unknown, or CUDA is asked for and no GPU is visible.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA GPU is visible; use --device cpu or auto")
    return dev
