"""Learning-curve plot written next to every trained model."""

from __future__ import annotations

from pathlib import Path


def plot_learning_curve(history: list[dict[str, float]], path: str | Path) -> Path:
    """Training loss (smoothed) and held-out validation loss against the step, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    if len(loss):
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, label="training loss (smoothed)", color="tab:blue")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        vs, vl = zip(*val)
        ax.plot(vs, vl, "o-", label="validation loss (held-out patches)", color="tab:orange", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("self-supervised loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
