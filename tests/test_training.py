"""Evaluation, prediction ensembles and seeded SGD finetuning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clafuse.data import Dataset, load_source
from clafuse.errors import DataError
from clafuse.training import FinetuneConfig, evaluate, evaluate_ensemble, finetune, predict_logits
from tests.helpers import mlp


pytestmark = pytest.mark.usefixtures("private_cache")


def _identity_model(scale: float = 1.0) -> nn.Module:
    """A 3-class model whose logits are its (scaled) inputs, so predictions are known by construction."""
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(3) * scale)
        layer.bias.zero_()
    return layer


def _toy() -> Dataset:
    x = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.5, 0.0]])
    return Dataset(x=x, y=torch.tensor([0, 1, 2, 2]), name="toy")


def _digits() -> tuple[Dataset, Dataset]:
    return load_source("digits"), load_source("digits:val")


def _fresh_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mlp([32])


FAST = {"epochs": 3, "lr": 0.1, "batch_size": 16}


# --- evaluation ---------------------------------------------------------------------------------


def test_evaluate_known_predictions() -> None:
    ds = _toy()
    result = evaluate(_identity_model(), ds)
    assert result["accuracy"] == 0.75
    assert result["num_samples"] == 4
    assert result["loss"] == pytest.approx(float(F.cross_entropy(ds.x, ds.y)), rel=1e-6)


def test_predict_logits_batches_and_restores_mode() -> None:
    model = _fresh_mlp()
    model.train()
    x = torch.rand(10, 1, 8, 8)
    full = predict_logits(model, x)
    assert torch.allclose(full, predict_logits(model, x, batch_size=3), atol=1e-6)
    assert model.training
    assert not full.requires_grad and full.shape == (10, 10)


def test_ensemble_of_identical_models_equals_single() -> None:
    ds = _toy()
    model = _identity_model()
    single = evaluate(model, ds)
    double = evaluate_ensemble([model, _identity_model()], ds)
    assert double["accuracy"] == single["accuracy"]
    assert double["num_samples"] == single["num_samples"]
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-12)


def test_ensemble_averages_probabilities() -> None:
    ds = _toy()
    a, b = _identity_model(1.0), _identity_model(-4.0)
    probs = (F.softmax(ds.x.double(), 1) + F.softmax(-4.0 * ds.x.double(), 1)) / 2
    result = evaluate_ensemble([a, b], ds)
    assert result["accuracy"] == float((probs.argmax(1) == ds.y).double().mean())
    assert result["loss"] == pytest.approx(float(F.nll_loss(probs.log(), ds.y)), rel=1e-9)


def test_evaluate_errors() -> None:
    ds = _toy()
    with pytest.raises(DataError, match="no labels"):
        evaluate(_identity_model(), Dataset(x=ds.x, y=None, name="u"))
    with pytest.raises(DataError, match="only 3 outputs"):
        evaluate(_identity_model(), Dataset(x=ds.x, y=torch.tensor([0, 1, 2, 5]), name="wide"))
    with pytest.raises(DataError, match="cannot take inputs of shape"):
        evaluate(_identity_model(), Dataset(x=torch.zeros(4, 5), y=ds.y, name="bad"))
    with pytest.raises(DataError, match="at least one model"):
        evaluate_ensemble([], ds)
    with pytest.raises(DataError, match="disagree"):
        evaluate_ensemble([_identity_model(), nn.Linear(3, 4)], ds)


# --- learning-rate schedules and config ---------------------------------------------------------


def test_schedules() -> None:
    cosine = FinetuneConfig(epochs=2, lr=0.1)
    rates = [cosine.lr_at(s, 10, 5) for s in range(10)]
    assert rates[0] == 0.1 and all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] > 0
    assert rates[5] == pytest.approx(0.05)

    warm = FinetuneConfig(epochs=2, lr=0.1, warmup_steps=4)
    assert [warm.lr_at(s, 10, 5) for s in range(4)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert warm.lr_at(4, 10, 5) == pytest.approx(0.1)

    step = FinetuneConfig(epochs=4, lr=1.0, schedule="step")
    assert [step.lr_at(e * 3, 12, 3) for e in range(4)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    assert FinetuneConfig(epochs=3, lr=0.3, schedule="constant").lr_at(7, 9, 3) == 0.3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"epochs": 1, "lr": 0.0},
        {"epochs": 1, "momentum": 1.0},
        {"epochs": 1, "momentum": 0.0, "nesterov": True},
        {"epochs": 1, "weight_decay": -1.0},
        {"epochs": 1, "batch_size": 0},
        {"epochs": 1, "schedule": "linear"},
        {"epochs": 1, "warmup_steps": -1},
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(DataError):
        FinetuneConfig(**kwargs)


# --- finetuning ---------------------------------------------------------------------------------


def test_finetune_digits_learns_and_is_reproducible() -> None:
    train, val = _digits()
    rng_before = torch.get_rng_state()
    runs = []
    for _ in range(2):
        model = _fresh_mlp()
        seen: list[dict] = []
        result = finetune(model, train, val, FinetuneConfig(**FAST), on_epoch=seen.append)
        runs.append((model, result))
        assert seen == result.history
    torch.set_rng_state(rng_before)

    (model_a, a), (model_b, b) = runs
    assert [h["epoch"] for h in a.history] == [1, 2, 3]
    assert a.history[-1]["val_accuracy"] > 0.85
    assert a.history[-1]["val_accuracy"] > a.history[0]["val_accuracy"] - 1e-9
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in a.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in b.history]
    assert a.best_state.keys() == b.best_state.keys()
    assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))

    other = finetune(_fresh_mlp(), train, val, FinetuneConfig(**FAST, seed=1))
    assert any(not torch.equal(a.best_state[k], other.best_state[k]) for k in a.best_state)


def test_finetune_leaves_global_rng_alone() -> None:
    train, val = _digits()
    model = _fresh_mlp()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune(model, train, val, FinetuneConfig(epochs=1))
    assert torch.equal(torch.rand(3), expected)


def _run_with_snapshots(val: Dataset, epochs: int) -> tuple[nn.Module, object, list[dict]]:
    train, _ = _digits()
    model = _fresh_mlp()
    snapshots: list[dict] = []

    def snap(_: dict) -> None:
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    result = finetune(model, train, val, FinetuneConfig(epochs=epochs, lr=0.2, batch_size=32), on_epoch=snap)
    return model, result, snapshots


def test_best_state_is_epoch_with_best_val_accuracy() -> None:
    _, val = _digits()
    model, result, snapshots = _run_with_snapshots(val, epochs=4)
    accs = [h["val_accuracy"] for h in result.history]
    best = accs.index(max(accs))
    assert result.best_epoch == best + 1
    assert all(torch.equal(result.best_state[k], snapshots[best][k]) for k in snapshots[best])
    assert all(t.device.type == "cpu" for t in result.best_state.values())


def test_best_state_can_be_an_early_epoch() -> None:
    _, val = _digits()
    shifted = Dataset(x=val.x, y=(val.y + 1) % 10, name="shifted")
    model, result, snapshots = _run_with_snapshots(shifted, epochs=3)
    accs = [h["val_accuracy"] for h in result.history]
    assert result.best_epoch == accs.index(max(accs)) + 1 < 3
    best = snapshots[result.best_epoch - 1]
    assert all(torch.equal(result.best_state[k], best[k]) for k in best)
    final = model.state_dict()
    assert any(not torch.equal(result.best_state[k], final[k]) for k in final)


def test_finetune_without_val_keeps_last_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    train, _ = _digits()
    model = _fresh_mlp()
    result = finetune(model, train, None, FinetuneConfig(epochs=2, batch_size=128), progress=True)
    assert result.best_epoch == 2
    assert all(h["val_accuracy"] is None and h["val_loss"] is None for h in result.history)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in result.best_state.items())
    assert all(math.isfinite(h["train_loss"]) and h["seconds"] >= 0 for h in result.history)
    assert capsys.readouterr().out == ""


def test_finetune_errors() -> None:
    train, val = _digits()
    with pytest.raises(DataError, match="no labels"):
        finetune(_fresh_mlp(), Dataset(x=train.x, y=None, name="u"), val, FinetuneConfig(epochs=1))
    narrow = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(DataError, match="only 5 outputs"):
        finetune(narrow, train, val, FinetuneConfig(epochs=1))
    with pytest.raises(DataError, match="diverged"):
        finetune(_fresh_mlp(), train, None, FinetuneConfig(epochs=1, lr=1e20, momentum=0.0))


# --- distillation -------------------------------------------------------------------------------


class _Counting(nn.Module):
    """Wraps a model and counts its forward calls and whether it ran with gradients."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.grad_calls = 0
        self.train_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.grad_calls += int(torch.is_grad_enabled())
        self.train_calls += int(self.training)
        return self.inner(x)


def test_distillation_loss_formula() -> None:
    from clafuse.training import distillation_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    temp, alpha = 3.0, 0.7
    p_t = F.softmax(t / temp, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / temp, dim=1))).sum() / 6
    expected = alpha * temp**2 * kl + (1 - alpha) * F.cross_entropy(s, y)
    assert float(distillation_loss(s, t, y, alpha, temp)) == pytest.approx(float(expected), rel=1e-5)
    assert float(distillation_loss(s, t, y, 0.0, temp)) == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-6)
    assert float(distillation_loss(s, s, y, 1.0, temp)) == pytest.approx(0.0, abs=1e-6)
    smooth = F.cross_entropy(s, y, label_smoothing=0.2)
    assert float(distillation_loss(s, t, y, 0.0, temp, 0.2)) == pytest.approx(float(smooth), rel=1e-6)


def test_finetune_with_teacher() -> None:
    train, val = _digits()
    teacher = _Counting(_fresh_mlp(5))
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    config = FinetuneConfig(epochs=1, lr=0.1, batch_size=128, kd_alpha=0.9, kd_temperature=2.0)
    distilled = finetune(_fresh_mlp(), train, val, config, teacher=teacher)
    steps = -(-len(train) // 128)
    assert teacher.calls == steps and teacher.grad_calls == 0 and teacher.train_calls == 0
    assert teacher.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    plain = finetune(_fresh_mlp(), train, val, config)
    assert any(not torch.equal(distilled.best_state[k], plain.best_state[k]) for k in plain.best_state)
    assert distilled.history[0]["train_loss"] != plain.history[0]["train_loss"]

    with pytest.raises(DataError, match="teacher has 5 classes"):
        finetune(_fresh_mlp(), train, val, config, teacher=nn.Sequential(nn.Flatten(), nn.Linear(64, 5)))


# --- optimisers, warm-up, label smoothing -------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 1, "optimizer": "adam"},
        {"epochs": 1, "optimizer": "adamw", "nesterov": True},
        {"epochs": 1, "label_smoothing": 1.0},
        {"epochs": 1, "label_smoothing": -0.1},
        {"epochs": 1, "kd_alpha": 1.5},
        {"epochs": 1, "kd_temperature": 0.0},
        {"epochs": 1, "augment": "rotate"},
    ],
)
def test_config_rejects_bad_new_values(kwargs: dict) -> None:
    with pytest.raises(DataError):
        FinetuneConfig(**kwargs)


def test_optimizers_warmup_and_label_smoothing() -> None:
    train, val = _digits()
    base = {"epochs": 2, "lr": 0.1, "batch_size": 128}
    runs = {
        "sgd": FinetuneConfig(**base),
        "nesterov": FinetuneConfig(**base, nesterov=True),
        "adamw": FinetuneConfig(**{**base, "lr": 0.01}, optimizer="adamw", weight_decay=0.01),
        "smooth": FinetuneConfig(**base, label_smoothing=0.2),
        "warm": FinetuneConfig(**base, warmup_steps=18),
    }
    results = {name: finetune(_fresh_mlp(), train, val, cfg) for name, cfg in runs.items()}
    assert results["adamw"].history[-1]["val_accuracy"] > 0.5  # 18 steps from random weights
    states = [r.best_state for r in results.values()]
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            assert any(not torch.equal(states[i][k], states[j][k]) for k in states[i])
    # 9 steps per epoch: the last step of epoch 1 is step 8 of an 18-step warm-up
    assert results["warm"].history[0]["lr"] == pytest.approx(0.1 * 9 / 18)
    assert results["sgd"].history[0]["lr"] < 0.1
    assert results["smooth"].history[0]["train_loss"] > results["sgd"].history[0]["train_loss"]


# --- augmentation -------------------------------------------------------------------------------


def test_augment_batch_crops_and_flips() -> None:
    from clafuse.training import augment_batch

    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8) + 1
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert augment_batch(x, "none", gen) is x and torch.equal(gen.get_state(), state)

    outs = [augment_batch(x, mode, torch.Generator().manual_seed(s)) for mode in ("crop", "crop-flip")
            for s in range(20)]
    flips = []
    for n, out in enumerate(outs):
        assert out.shape == x.shape
        for img, src in zip(out, x):
            padded = F.pad(src, (2, 2, 2, 2))
            crops = [padded[:, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
            plain = any(torch.equal(img, c) for c in crops)
            flipped = any(torch.equal(img, c.flip(-1)) for c in crops)
            assert plain or (flipped and n >= 20)  # flips only with crop-flip
            flips.append(flipped and not plain)
    assert any(not torch.equal(c, x) for c in outs[:20])
    assert 5 < sum(flips) < 35  # about half of the 40 crop-flip images
    again = augment_batch(x, "crop-flip", torch.Generator().manual_seed(3))
    assert torch.equal(again, outs[23])

    big = torch.ones(3, 1, 28, 28)
    shifted = augment_batch(big, "crop", torch.Generator().manual_seed(1))
    assert shifted.shape == big.shape and (shifted == 0).any()
    assert int((shifted[:, 0] == 0).all(dim=1).sum(dim=1).max()) <= 4  # at most 4 padded columns
    with pytest.raises(DataError, match="N, C, H, W"):
        augment_batch(torch.zeros(4, 64), "crop", gen)


def test_finetune_with_augmentation() -> None:
    train, val = _digits()
    config = FinetuneConfig(epochs=1, lr=0.1, batch_size=128, augment="crop-flip")
    a = finetune(_fresh_mlp(), train, val, config)
    b = finetune(_fresh_mlp(), train, val, config)
    plain = finetune(_fresh_mlp(), train, val, FinetuneConfig(epochs=1, lr=0.1, batch_size=128))
    assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)
    assert any(not torch.equal(a.best_state[k], plain.best_state[k]) for k in a.best_state)
    flat = Dataset(x=train.x.flatten(1), y=train.y, name="flat")
    with pytest.raises(DataError, match="augmentation needs images"):
        finetune(_fresh_mlp(), flat, None, config)


# --- resuming -----------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    from clafuse.training import load_train_state, save_train_state

    train, val = _digits()
    config = FinetuneConfig(epochs=3, lr=0.05, batch_size=128, augment="crop-flip", nesterov=True)
    straight_model = _dropout_mlp()
    straight = finetune(straight_model, train, val, config)

    path = tmp_path / "run.state.pt"

    def stop_after_two(record: dict) -> None:
        if record["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(_dropout_mlp(), train, val, config, on_epoch=stop_after_two,
                 on_state=lambda s: save_train_state(path, s))
    state = load_train_state(path)
    assert state["epoch"] == 2 and len(state["history"]) == 2

    resumed_model = _dropout_mlp()
    seen: list[dict] = []
    resumed = finetune(resumed_model, train, val, config, resume_from=state, on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [3]
    assert all(torch.equal(p, q) for p, q in zip(straight_model.state_dict().values(),
                                                  resumed_model.state_dict().values()))
    assert resumed.best_epoch == straight.best_epoch
    assert all(torch.equal(straight.best_state[k], resumed.best_state[k]) for k in straight.best_state)
    strip = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)

    with pytest.raises(DataError, match="different settings.*lr"):
        finetune(_dropout_mlp(), train, val, FinetuneConfig(epochs=3, lr=0.01, batch_size=128,
                                                             augment="crop-flip", nesterov=True), resume_from=state)


def test_train_state_file_errors(tmp_path: Path) -> None:
    from clafuse.errors import ClafuseError
    from clafuse.training import load_train_state

    with pytest.raises(ClafuseError, match="no training state"):
        load_train_state(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a state")
    with pytest.raises(ClafuseError, match="cannot read training state"):
        load_train_state(junk)
    other = tmp_path / "other.pt"
    torch.save({"a": 1}, other)
    with pytest.raises(ClafuseError, match="not a clafuse training state"):
        load_train_state(other)
