"""Which torch device a job runs on, and at which precision: one rule for training, prediction and
noise inspection."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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


# ---- precision -----------------------------------------------------------------------------
#: ``--precision`` names and the dtype autocast lowers the network's convolutions to.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """Turn ``--precision`` into the precision a network runs at on ``device``.

    ``auto`` is ``fp32`` on the CPU (bf16 autocast is slower there on CPUs without bf16 matrix
    units, and nothing may get slower on the CPU) and ``bf16`` on a CUDA GPU that supports it
    (its error against fp32 is bounded in docs/cluster.md, "precision"); fp32 elsewhere.

    Parameters
    ----------
    name : str
        ``auto``, ``fp32``, ``bf16`` or ``fp16``.
    device : torch.device
        Where the network runs.

    Returns
    -------
    str
        ``fp32``, ``bf16`` or ``fp16``.

    Raises
    ------
    ConfigError
        An unknown name, fp16 on the CPU, or bf16 on a GPU without bf16 support.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if name not in PRECISIONS:
        raise ConfigError(f"--precision {name!r} is unknown; use auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 is for CUDA GPUs; on the CPU use fp32 (default) or bf16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bfloat16 support; use fp16 or fp32")
    return name


def amp_precision(device: torch.device) -> str:
    """The precision of ``train --amp`` on ``device``: bf16 where it exists (no loss scaling
    needed: bf16 has float32's range), fp16 with a gradient scaler on older GPUs.

    Examples
    --------
    >>> amp_precision(torch.device("cpu"))
    'bf16'
    """
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def _as_fp32(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_as_fp32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _as_fp32(v) for k, v in obj.items()}
    return obj


def _autocast_hooks(dtype: torch.dtype, device_type: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    # Hooks, not a patched forward: they survive copy.deepcopy (the receptive-field probe
    # copies the method) and leave the module's own forward and state dict alone.
    state = threading.local()

    def enter(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        stack = state.__dict__.setdefault("stack", [])
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
            stack.append(None)  # float64 on purpose (receptive-field probes): left alone
            return
        ctx = torch.autocast(device_type=device_type, dtype=dtype)
        ctx.__enter__()
        stack.append(ctx)

    def leave(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        ctx = state.stack.pop()
        if ctx is None:
            return None
        ctx.__exit__(None, None, None)
        return _as_fp32(output)

    return enter, leave


def set_module_precision(module: torch.nn.Module, precision: str, device_type: str) -> torch.nn.Module:
    """Run ``module``'s forward under autocast at ``precision``, returning float32 outputs.

    Only the network itself is lowered: what the method computes from its output (the
    de-normalisation, noise-model likelihoods, posteriors, losses) stays float32. The weights
    and the state dict are unchanged (float32). ``fp32`` restores the plain forward.

    Parameters
    ----------
    module : torch.nn.Module
        A method's network (``method.net``).
    precision : str
        ``fp32``, ``bf16`` or ``fp16`` (see :func:`resolve_precision`).
    device_type : str
        ``cpu`` or ``cuda``.

    Returns
    -------
    torch.nn.Module
        The same module.

    Examples
    --------
    >>> net = torch.nn.Conv2d(1, 1, 3)
    >>> _ = set_module_precision(net, "bf16", "cpu")
    >>> net(torch.zeros(1, 1, 8, 8)).dtype
    torch.float32
    """
    for handle in module.__dict__.pop("_quietscope_precision", ()):
        handle.remove()
    if precision != "fp32":
        enter, leave = _autocast_hooks(PRECISIONS[precision], device_type)
        module._quietscope_precision = (module.register_forward_pre_hook(enter),
                                        module.register_forward_hook(leave, always_call=True))
    return module


@contextmanager
def module_precision(module: torch.nn.Module, precision: str, device_type: str) -> Iterator[torch.nn.Module]:
    """:func:`set_module_precision` for the duration of a block (training), then fp32 again."""
    set_module_precision(module, precision, device_type)
    try:
        yield module
    finally:
        set_module_precision(module, "fp32", device_type)
