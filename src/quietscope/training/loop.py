"""A plain torch training loop: sampled patches, Adam, cosine schedule, checkpoints, resume,
and optionally an exponential moving average of the weights (``ema``, :mod:`training.averaging`).

Resuming is exact: the checkpoint holds the weights, the optimizer state and the torch
generators' states, and patch pool ``i`` (re-drawn at checkpoint boundaries) is a pure function
of (seed, i) (``training/prefetch.py``), so a run killed and resumed ends with the same weights
as one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from quietscope.device import amp_precision, resolve_device, set_module_precision
from quietscope.errors import ConfigError, ModelError
from quietscope.io.reading import Image
from quietscope.methods.base import Method
from quietscope.training.averaging import WeightAverage
from quietscope.training.prefetch import PoolPrefetcher
from quietscope.training.sampler import PatchSampler, estimate_statistics, split_train_val

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Training options (validated at the edge, stored in the model file)."""

    model_config = ConfigDict(extra="forbid")

    patch: tuple[int, ...] = (64, 64)
    batch: int = Field(16, ge=1)
    steps: int = Field(2000, ge=1)
    lr: float = Field(4e-4, gt=0)
    seed: int = 0
    val_fraction: float = Field(0.1, ge=0, lt=0.9)
    val_patches: int = Field(32, ge=1)
    val_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    pool_size: int = Field(512, ge=1, description="patches held in memory, re-drawn every checkpoint_every steps")
    foreground: float = Field(0.0, ge=0, le=1)
    augment: bool = True
    early_stop: int | None = Field(None, ge=1, description="stop after this many validations without improvement")
    keep: Literal["best", "last"] = Field(
        "best", description="weights the model keeps: those of the best validation loss, or of the last step"
    )
    ema: float | None = Field(
        None, gt=0, lt=1,
        description="decay of an exponential moving average of the weights, updated every step (0.999: ~1000 steps); "
                    "validation scores the average and the model keeps it (keep=last: the average at the end)",
    )
    device: str = "auto"
    amp: bool = Field(False, description="mixed precision: the network under bf16 autocast (fp16 + grad scaler on GPUs without bf16)")


def pool_patches(config: TrainConfig) -> int:
    """Patches read per pool: ``pool_size``, but never more than the pool's steps can draw.

    A pool serves ``min(checkpoint_every, steps)`` steps of ``batch`` draws; reading more patches
    than that only costs reads (512 patches for a 3-step run was most of its time). At the
    defaults (16 × 200 draws per pool) the cap is far above ``pool_size`` and changes nothing.
    """
    return max(1, min(config.pool_size, config.batch * min(config.checkpoint_every, config.steps)))


@dataclass
class TrainResult:
    method: Method
    history: list[dict[str, float]] = field(default_factory=list)
    best_val: float | None = None
    best_step: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    stopped_early: bool = False
    kept_step: int | None = None
    #: The run stopped at ``stop_at``, before its last step; its checkpoint continues it.
    paused_at: int | None = None


def lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    """Linear warm-up then cosine decay to 5 % (a pure function of the step: resumable)."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@dataclass
class _Run:
    """The mutable state of one training run: what a checkpoint holds besides the weights."""

    opt: torch.optim.Optimizer
    gen: torch.Generator
    scaler: Any
    fingerprint: str
    ckpt: Path | None
    start_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: tuple[float, int, Any] = (math.inf, -1, None)
    bad_vals: int = 0
    #: The moving average of the weights (``TrainConfig.ema``), or None.
    average: WeightAverage | None = None

    def save(self, method: Method, step: int) -> None:
        if self.ckpt is not None:
            _save_checkpoint(self.ckpt, method, self.opt, self.gen, step, self.history, self.best, self.bad_vals,
                             self.fingerprint, self.scaler, self.average)

    def scored(self, method: Method) -> Any:
        """Context in which ``method`` holds the weights validation scores and the model keeps:
        the moving average when there is one, else its own."""
        return self.average.applied(method) if self.average is not None else contextlib.nullcontext()


def _prepare_data(image: Image, method: Method, config: TrainConfig, device: torch.device) -> tuple[Any, Any, int, dict]:
    """Normalisation, the patch sampler and the held-apart validation batch."""
    # The method may sample more than the patch (e.g. lateral context around it).
    patch = method.prepare_training(tuple(config.patch))
    train_region, val_region = split_train_val(image.spatial_shape, patch, config.val_fraction)
    stats = estimate_statistics(image, patch, seed=config.seed)
    method.set_normalization(stats["mean"], stats["std"])
    coverage = method.data_coverage_warning(stats["signal_p01"], stats["signal_p99"])
    if coverage:
        log.warning("%s", coverage)
    log.info(
        "normalisation: mean %s, std %s (from %d sampled patches); device %s",
        _fmt(stats["mean"]), _fmt(stats["std"]), stats["n_patches"], device,
    )
    method.to(device)
    sampler = PatchSampler(
        image, patch, train_region, foreground=config.foreground,
        threshold=stats["foreground_threshold"] if config.foreground > 0 else None, augment=config.augment,
    )
    val_batch, val_draws = None, 1
    if val_region is not None:
        val_sampler = PatchSampler(image, patch, val_region, augment=False)
        val_batch = torch.from_numpy(val_sampler.sample(config.val_patches, np.random.default_rng(config.seed + 1)))
        n_val = val_batch.shape[0] * math.prod(val_batch.shape[2:])
        val_draws = validation_draws(method.loss_pixel_fraction, n_val,
                                     max_draws=validation_draw_budget(config.val_every, config.batch, config.val_patches))
        log.info("validation every %d steps on %d held-apart patches: %d mask draw(s), ~%d pixels scored",
                 config.val_every, val_batch.shape[0], val_draws, round(val_draws * method.loss_pixel_fraction * n_val))
    return sampler, val_batch, val_draws, stats


def _new_run(method: Method, config: TrainConfig, device: torch.device, checkpoint: str | Path | None) -> tuple[_Run, str]:
    """Optimiser, generators (seeded), gradient scaler, and the fingerprint checkpoints carry."""
    opt = torch.optim.Adam(method.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    # amp and ema left out when off: checkpoints of earlier versions still resume.
    train_fields = config.model_dump(mode="json", exclude={k for k in ("amp", "ema") if not getattr(config, k)})
    fingerprint = json.dumps({"method": method.config.model_dump(mode="json"), "train": train_fields}, sort_keys=True)
    precision = amp_precision(device) if config.amp else "fp32"
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if config.amp:
        log.info("mixed precision: the network under %s autocast%s; losses and noise models in float32", precision,
                 " with a gradient scaler" if scaler else "")
    run = _Run(opt, gen, scaler, fingerprint, Path(checkpoint) if checkpoint else None)
    if config.ema is not None:
        run.average = WeightAverage(method, config.ema)
        log.info("weights averaged (EMA, decay %g: ~%d steps); validation scores the average and the model keeps it",
                 config.ema, round(1 / (1 - config.ema)))
    return run, precision


def _resume(run: _Run, method: Method) -> None:
    """Load the checkpoint into ``method`` and ``run`` (it must belong to the same configuration)."""
    if run.ckpt is None or not run.ckpt.exists():
        raise ConfigError(f"--resume: no checkpoint at {str(run.ckpt)!r}; start without --resume")
    state = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    if state["fingerprint"] != run.fingerprint:
        raise ModelError("--resume: the checkpoint belongs to a different configuration; use the same options or start fresh")
    method.load_state_dict(state["method"])
    run.opt.load_state_dict(state["optimizer"])
    run.gen.set_state(state["torch_gen"])
    torch.set_rng_state(state["torch_global"])
    run.start_step = int(state["step"])
    run.history = json.loads(state["history"])
    run.best = (float(state["best_val"]), int(state["best_step"]), state.get("best_state"))
    run.bad_vals = int(state["bad_vals"])
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    if run.average is not None:
        run.average.load_state_dict(state["average"])
    log.info("resumed from %s at step %d", run.ckpt, run.start_step)


def _train_step(method: Method, run: _Run, pool: torch.Tensor, config: TrainConfig, device: torch.device, step: int) -> float:
    for g in run.opt.param_groups:
        g["lr"] = lr_at(step, config.steps, config.lr)
    idx = torch.randint(0, pool.shape[0], (config.batch,), generator=run.gen)
    method.train()
    loss = method.training_loss(pool[idx].to(device), run.gen)
    if not torch.isfinite(loss):
        raise ConfigError(f"training diverged at step {step} (loss {loss.item()}); lower --lr or check the data")
    run.opt.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        loss.backward()
        run.opt.step()
    if run.average is not None:
        run.average.update(method)
    return float(loss.item())


def _validate(method: Method, run: _Run, rec: dict[str, float], val_batch: torch.Tensor, val_draws: int,
              config: TrainConfig, device: torch.device) -> None:
    """Score the held-apart batch into ``rec`` and keep the best weights by the method's criterion
    (with ``ema``, the averaged weights are scored and kept)."""
    with run.scored(method):
        rec["val_loss"] = validation_loss(method, val_batch, config.seed, device, val_draws)
        extra = _validation_metrics(method, val_batch, device)
        rec.update(extra)
        if extra:
            log.info("step %d: val_loss %.5g, %s", rec["step"], rec["val_loss"], ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))
        criterion = rec.get("select", rec["val_loss"])
        if criterion < run.best[0]:
            run.best = (criterion, int(rec["step"]), {k: v.detach().cpu().clone() for k, v in method.state_dict().items()})
            run.bad_vals = 0
        else:
            run.bad_vals += 1


def _keep_weights(method: Method, run: _Run, config: TrainConfig) -> int:
    """Load the weights the model file keeps; return their step."""
    # The best validation weights, not the last (as CSBDeep keeps weights_best): a blind-spot
    # net trained long on a small image over-fits it. Measured: bayes-poisson on a 192² crop at
    # 5 photons, which puts every pixel into the loss, peaks after ~500 steps and is 6.5 dB worse
    # after 3000 (docs/benchmarks.md, section 3); the held-apart validation slab sees it.
    best, history = run.best, run.history
    if best[2] is None or config.keep != "best":
        if run.average is not None:  # "last" is the average at the end
            method.load_state_dict(run.average.state_dict_for(method))
            log.info("keeping the moving average of the weights (EMA, decay %g) at step %d", run.average.decay, len(history))
        return len(history)
    method.load_state_dict(best[2])
    if best[1] < len(history):
        log.info("keeping the weights of step %d (best validation %s %.5g; later validations were higher); "
                 "--keep last keeps the last", best[1], "score" if any("select" in r for r in history) else "loss", best[0])
    return best[1]


def _loop(method: Method, run: _Run, prefetcher: PoolPrefetcher, val: tuple[Any, int], config: TrainConfig,
          device: torch.device, bar: Any, stop: int) -> bool:
    """The training steps from ``run.start_step`` up to ``stop``; returns whether it stopped early."""
    val_batch, val_draws = val
    pool = None
    for step in range(run.start_step, stop):
        if step % config.checkpoint_every == 0 or pool is None:
            if step > run.start_step:
                run.save(method, step)
            pool = torch.from_numpy(prefetcher.get(step // config.checkpoint_every))
        rec = {"step": step + 1, "loss": _train_step(method, run, pool, config, device, step)}
        if val_batch is not None and ((step + 1) % config.val_every == 0 or step + 1 == config.steps):
            _validate(method, run, rec, val_batch, val_draws, config, device)
            bar.set_postfix(loss=f"{rec['loss']:.4g}", val=f"{rec['val_loss']:.4g}")
        run.history.append(rec)
        bar.update(1)
        if config.early_stop is not None and run.bad_vals >= config.early_stop:
            log.info("early stop at step %d: no validation improvement in %d checks", step + 1, run.bad_vals)
            return True
    return False


def train(
    image: Image,
    method: Method,
    config: TrainConfig,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainResult:
    """Train ``method`` on patches sampled from ``image``.

    ``checkpoint`` is a file written every ``checkpoint_every`` steps; with ``resume`` training
    continues from it (it must belong to the same configuration). ``stop_at`` pauses the run
    after that many steps of its ``config.steps`` (same learning-rate schedule, same patches):
    the checkpoint is written at that step, so a later ``resume`` ends exactly where the
    uninterrupted run would (``pn2v-boot`` branches PN2V off an unfinished N2V this way).
    """
    from tqdm.auto import tqdm

    if stop_at is not None and not 0 < stop_at <= config.steps:
        raise ConfigError(f"stop_at {stop_at} must lie in 1..{config.steps} (the run's steps)")
    if stop_at is not None and checkpoint is None:
        raise ConfigError("stop_at pauses a run to be resumed: give a checkpoint file")
    stop = config.steps if stop_at is None else stop_at
    device = resolve_device(config.device)
    sampler, val_batch, val_draws, stats = _prepare_data(image, method, config, device)
    run, precision = _new_run(method, config, device, checkpoint)
    if resume:
        _resume(run, method)
    # Pool i is a pure function of (seed, i), read by a few threads (chunk reads and decompression
    # release the GIL) while the network trains on pool i - 1: a big store on slow disks no longer
    # stalls training at every redraw, and a resumed run reads the very pools it would have read.
    prefetcher = PoolPrefetcher(sampler, pool_patches(config), seed=config.seed, workers=min(4, os.cpu_count() or 1),
                                count=-(-config.steps // config.checkpoint_every))
    t0 = time.perf_counter()
    bar = tqdm(total=config.steps, initial=run.start_step, disable=not progress, desc="train", unit="step")
    set_module_precision(method.net, precision, device.type)
    try:
        stopped_early = _loop(method, run, prefetcher, (val_batch, val_draws), config, device, bar, stop)
    finally:
        set_module_precision(method.net, "fp32", device.type)
        bar.close()
        prefetcher.close()
    paused = stop < config.steps and not stopped_early
    if paused:  # before the kept weights are loaded: the checkpoint holds the run's own state
        run.save(method, stop)
    kept_step = _keep_weights(method, run, config)
    if not paused:
        run.save(method, config.steps)
    method.eval()
    best = run.best
    return TrainResult(
        method=method,
        history=run.history,
        best_val=None if math.isinf(best[0]) else best[0],
        best_step=None if best[1] < 0 else best[1],
        stats=stats,
        seconds=time.perf_counter() - t0,
        stopped_early=stopped_early,
        kept_step=kept_step,
        paused_at=stop if paused else None,
    )


#: Pixels a validation scores at least, when its patches hold that many. One N2V mask draw at
#: the usual 2 % over 32 patches of 32² scores ~650 pixels, and the loss then moves more from
#: check to check than the model does: keeping the "best" of such checks kept N2V weights
#: 0.65 and 0.73 dB worse than its last step in two of six runs (docs/benchmarks.md, section 3).
VAL_MIN_PIXELS = 20_000
#: ... but no more draws than this: each is a forward pass over every validation patch.
VAL_MAX_DRAWS = 64


def validation_draw_budget(val_every: int, batch: int, val_patches: int) -> int:
    """Most mask draws a validation may take so that it costs about a sixth of the training
    between two checks (a draw is a forward pass over ``val_patches`` patches; a training
    step a forward and backward pass, ~3 forwards, over ``batch`` patches)."""
    return max(1, min(VAL_MAX_DRAWS, (val_every * batch) // (2 * val_patches)))


def validation_draws(
    fraction: float, n_pixels: int, min_pixels: int = VAL_MIN_PIXELS, max_draws: int = VAL_MAX_DRAWS
) -> int:
    """How many loss evaluations (mask draws) a validation averages.

    Parameters
    ----------
    fraction : float
        Share of the pixels one evaluation scores (:attr:`Method.loss_pixel_fraction`).
    n_pixels : int
        Spatial pixels in the validation patches, all patches together.
    min_pixels : int
        Scored pixels to reach; never more draws than it takes to score each pixel about once.
    max_draws : int
        Upper bound on the draws (N2V's default 0.2 % on 32 patches of 64² would need 77).

    Returns
    -------
    int
        At least 1.
    """
    per_draw = max(fraction * n_pixels, 1.0)
    return int(max(1, min(max_draws, math.ceil(1.0 / fraction), math.ceil(min_pixels / per_draw))))


def validation_loss(method: Method, batch: torch.Tensor, seed: int, device: torch.device, draws: int = 1) -> float:
    """The self-supervised loss on held-apart patches, over fixed masks (comparable over time).

    Masking methods score only their masked pixels, so the loss is averaged over ``draws``
    fixed mask draws (:func:`validation_draws` says how many).
    """
    method.eval()
    gen = torch.Generator().manual_seed(seed + 12345)
    # Copied to the device once per validation, not once per draw.
    chunks = [batch[i : i + 8].to(device) for i in range(0, batch.shape[0], 8)]
    losses = []
    with torch.no_grad():
        for _ in range(draws):
            for chunk in chunks:
                losses.append(float(method.training_loss(chunk, gen)))
    return float(np.mean(losses))


def _validation_metrics(method: Method, batch: torch.Tensor, device: torch.device) -> dict[str, float]:
    """The method's own validation numbers (:meth:`Method.validation_metrics`), in eval mode."""
    method.eval()
    with torch.no_grad():
        return {k: float(v) for k, v in method.validation_metrics(batch.to(device)).items()}


def _save_checkpoint(ckpt, method, opt, gen, step, history, best, bad_vals, fingerprint, scaler=None, average=None) -> None:
    state = {
        "fingerprint": fingerprint,
        "method": method.state_dict(),
        "optimizer": opt.state_dict(),
        "torch_gen": gen.get_state(),
        "torch_global": torch.get_rng_state(),
        "step": step,
        "history": json.dumps(history),
        "best_val": best[0],
        "best_step": best[1],
        "bad_vals": bad_vals,
    }
    if best[2] is not None:
        state["best_state"] = best[2]
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if average is not None:
        state["average"] = average.state_dict()
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(ckpt)


def _fmt(values: Any) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
