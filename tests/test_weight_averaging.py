"""Weight averaging (``TrainConfig.ema``, ``training.averaging``): the average is the EMA of the
weights the run went through, validation scores it, the model file keeps it, resume continues it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from helpers import assert_same_weights, write_ome
from quietscope.methods import build_method
from quietscope.methods.modelfile import load_model, read_manifest
from quietscope.training import loop
from quietscope.training.averaging import WeightAverage
from quietscope.workflows.train import train_model

NET = {"method": "n2v", "net": {"depth": 1, "filters": 4}}
OPTS = {"patch": (16,), "batch": 2, "steps": 12, "checkpoint_every": 4, "val_every": 3, "pool_size": 8, "lr": 1e-2}


def _image(tmp_path, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return write_ome(tmp_path / "in.ome.zarr", (100 + 10 * rng.standard_normal((48, 48))).astype(np.float32), "yx", (16, 16))


def _ema(values: list[torch.Tensor], decay: float) -> torch.Tensor:
    """EMA written out: the first value, then ``a = decay · a + (1 − decay) · v``."""
    a = values[0].clone()
    for v in values[1:]:
        a = decay * a + (1 - decay) * v
    return a


def test_average_is_the_ema_of_a_scripted_sequence_and_buffers_stay_live():
    model = torch.nn.Linear(3, 2)
    model.register_buffer("count", torch.tensor(0))
    avg = WeightAverage(model, 0.9)
    seq = [torch.full((2, 3), v) for v in (1.0, 5.0, -2.0, 3.0)]
    for i, w in enumerate(seq):
        with torch.no_grad():
            model.weight.copy_(w)
            model.bias.fill_(float(i))
        model.count.fill_(i + 1)
        avg.update(model)
    assert avg.n_averaged == 4
    state = avg.state_dict_for(model)
    torch.testing.assert_close(state["weight"], _ema(seq, 0.9))
    torch.testing.assert_close(state["bias"], _ema([torch.full((2,), float(i)) for i in range(4)], 0.9))
    assert int(state["count"]) == 4  # buffers are the live model's, not averaged
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with avg.applied(model):
        torch.testing.assert_close(model.weight, _ema(seq, 0.9))
    for k, v in model.state_dict().items():  # its own weights put back exactly
        assert torch.equal(v, own[k]), k


def test_decay_must_lie_between_0_and_1():
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(torch.nn.Linear(1, 1), 1.0)
    with pytest.raises(ValidationError):
        loop.TrainConfig(ema=1.0)
    assert loop.TrainConfig().ema is None


def test_average_of_a_splitting_vae_keeps_its_buffers():
    m = build_method({"method": "musplit", "spatial_ndim": 2, "in_channels": 2, "net": {"depth": 2, "filters": 8},
                      "latent_channels": 4})
    m.set_normalization([60.0, 40.0], [30.0, 20.0])
    avg = WeightAverage(m, 0.99)
    m.steps_seen.fill_(7)
    avg.update(m)
    state = avg.state_dict_for(m)
    assert set(state) == set(m.state_dict()) and int(state["steps_seen"]) == 7
    assert torch.equal(state["norm_std"], torch.tensor([30.0, 20.0]))


def test_train_with_ema_scores_and_keeps_the_average_and_trains_as_without(tmp_path, monkeypatch):
    """The model file holds the EMA (decay 0.8) of the weights after each of the 12 steps,
    computed here by hand; each validation scored the EMA so far; the raw weights followed the
    very trajectory of a run without averaging."""
    src = _image(tmp_path)
    plain = train_model(src, tmp_path / "plain.qs", NET, {**OPTS, "keep": "last"}, progress=False)

    raw, scored = [], []
    original = loop._train_step

    def recording(method, run, *args):
        loss = original(method, run, *args)
        raw.append({k: v.detach().clone() for k, v in method.named_parameters()})
        return loss

    def fake_validation_loss(method, batch, seed, device, draws=1):
        scored.append({k: v.detach().clone() for k, v in method.named_parameters()})
        return 1.0

    monkeypatch.setattr(loop, "_train_step", recording)
    monkeypatch.setattr(loop, "validation_loss", fake_validation_loss)
    res = train_model(src, tmp_path / "ema.qs", NET, {**OPTS, "keep": "last", "ema": 0.8}, progress=False)
    assert len(raw) == 12 and len(scored) == 4 and res.kept_step == 12
    kept, _ = load_model(tmp_path / "ema.qs")
    names = [k for k, _ in kept.named_parameters()]
    for k in names:
        seq = [r[k] for r in raw]
        torch.testing.assert_close(dict(kept.named_parameters())[k].detach(), _ema(seq, 0.8))
        for i, s in enumerate(scored):  # validations at steps 3, 6, 9, 12
            torch.testing.assert_close(s[k], _ema(seq[: 3 * (i + 1)], 0.8))
        assert torch.equal(raw[-1][k], dict(plain.method.named_parameters())[k].detach())  # training unchanged
    assert any(not torch.allclose(dict(kept.named_parameters())[k], raw[-1][k]) for k in names)
    assert read_manifest(tmp_path / "ema.qs")["train"]["ema"] == 0.8
    run, _ = loop._new_run(plain.method, loop.TrainConfig(device="cpu"), torch.device("cpu"), None)
    assert '"ema"' not in run.fingerprint and run.average is None  # checkpoints of plain runs resume as before


def test_paused_training_with_ema_resumes_to_the_uninterrupted_average(tmp_path):
    src = _image(tmp_path, 1)
    opts = {**OPTS, "keep": "last", "ema": 0.9}
    train_model(src, tmp_path / "straight.qs", NET, opts, progress=False)
    train_model(src, tmp_path / "paused.qs", NET, opts, stop_at=7, progress=False)
    train_model(src, tmp_path / "paused.qs", NET, opts, resume=True, progress=False)
    assert_same_weights(load_model(tmp_path / "straight.qs")[0], load_model(tmp_path / "paused.qs")[0])
