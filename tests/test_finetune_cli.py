"""finetune_checkpoint and the finetune command: distillation, metrics, plots, resuming, options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clafuse import api
from clafuse.errors import ClafuseError, DataError
from clafuse.io.checkpoint import load_checkpoint
from tests.helpers import save_mlp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def ckpts(tmp_path: Path) -> tuple[Path, Path]:
    return save_mlp(tmp_path / "student.safetensors", 0, 16), save_mlp(tmp_path / "teacher.safetensors", 1, 48)


FAST = {"data": "digits", "batch_size": 128, "lr": 0.05}


def test_distil_with_metrics_and_plot(tmp_path: Path, ckpts: tuple[Path, Path]) -> None:
    student, teacher = ckpts
    out, metrics, plot = tmp_path / "ft.safetensors", tmp_path / "m.jsonl", tmp_path / "curves.png"
    report = api.finetune_checkpoint(student, out, epochs=2, teacher=teacher, kd_alpha=0.8, kd_temperature=2.0,
                                     metrics_out=metrics, plot=plot, **FAST)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert lines == report["history"] and [r["epoch"] for r in lines] == [1, 2]
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert not api.train_state_path(out).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert load_checkpoint(out).keys() == load_checkpoint(student).keys()

    plain = api.finetune_checkpoint(student, tmp_path / "plain.safetensors", epochs=2, **FAST)
    assert plain["history"][0]["train_loss"] != report["history"][0]["train_loss"]


def test_teacher_must_fit(tmp_path: Path, ckpts: tuple[Path, Path]) -> None:
    student, _ = ckpts
    out = tmp_path / "ft.safetensors"
    wrong_classes = save_mlp(tmp_path / "t12.safetensors", 2, 32, classes=12)
    with pytest.raises(DataError, match="12 classes but the student"):
        api.finetune_checkpoint(student, out, teacher=wrong_classes, **FAST)
    wrong_inputs = save_mlp(tmp_path / "t100.safetensors", 2, 32, inputs=100)
    with pytest.raises(DataError, match="teacher .* do not fit"):
        api.finetune_checkpoint(student, out, teacher=wrong_inputs, **FAST)
    assert not out.exists() and not api.train_state_path(out).exists()


def test_resume_gives_the_same_weights(tmp_path: Path, ckpts: tuple[Path, Path],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import clafuse.training as training

    student, _ = ckpts
    settings = {**FAST, "epochs": 3, "augment": "crop", "optimizer": "adamw", "lr": 0.01, "warmup_steps": 5}
    straight = tmp_path / "straight.safetensors"
    api.finetune_checkpoint(student, straight, **settings)

    out, metrics = tmp_path / "resumed.safetensors", tmp_path / "m.jsonl"
    real_save = training.save_train_state

    def save_then_stop(path: Path, state: dict) -> None:
        real_save(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_train_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        api.finetune_checkpoint(student, out, metrics_out=metrics, **settings)
    monkeypatch.undo()
    state_file = api.train_state_path(out)
    assert state_file.exists() and not out.exists()
    assert not metrics.exists()  # metrics appear with the checkpoint, when the run completes
    assert list(tmp_path.glob(".m.jsonl.tmp-*")) == []

    with pytest.raises(DataError, match="different settings"):
        api.finetune_checkpoint(student, out, resume=True, **{**settings, "lr": 0.02})
    other = save_mlp(tmp_path / "other.safetensors", 5, 16)
    with pytest.raises(ClafuseError, match="different checkpoint"):
        api.finetune_checkpoint(other, out, resume=True, **settings)

    report = api.finetune_checkpoint(student, out, resume=True, metrics_out=metrics, **settings)
    assert [r["epoch"] for r in report["history"]] == [1, 2, 3]
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    a, b = load_checkpoint(straight), load_checkpoint(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not state_file.exists()
    with pytest.raises(ClafuseError, match="no training state"):
        api.finetune_checkpoint(student, out, resume=True, **settings)


def test_cli_finetune_with_new_options(tmp_path: Path, ckpts: tuple[Path, Path]) -> None:
    student, teacher = ckpts
    out, metrics, plot = tmp_path / "ft.safetensors", tmp_path / "m.jsonl", tmp_path / "c.png"
    args = ["finetune", student, "--data", "digits", "-o", out, "--epochs", 2, "--batch-size", 128,
            "--teacher", teacher, "--kd-alpha", 0.7, "--kd-temperature", 3, "--nesterov", "--warmup-steps", 4,
            "--label-smoothing", 0.1, "--augment", "crop-flip", "--metrics-out", metrics, "--plot", plot, "--json"]
    env = {**os.environ, "CLAFUSE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "clafuse", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == report["history"]
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert out.exists() and not api.train_state_path(out).exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--optimizer", "adam"], "--optimizer"),
        (["--augment", "rotate"], "--augment"),
        (["--teacher-arch", "spec.json"], "--teacher-arch"),
        (["--optimizer", "adamw", "--nesterov"], "nesterov"),
        (["--resume"], "no training state"),
    ],
)
def test_cli_rejects_bad_finetune_options(tmp_path: Path, ckpts: tuple[Path, Path], extra: list[str],
                                          message: str) -> None:
    from typer.testing import CliRunner

    from clafuse.cli import app

    student, _ = ckpts
    out = tmp_path / "ft.safetensors"
    result = CliRunner().invoke(app, ["finetune", str(student), "--data", "digits", "-o", str(out), *extra])
    assert result.exit_code == 2
    assert message in result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert not out.exists()


def test_distil_from_an_ensemble_of_teachers(tmp_path: Path, ckpts: tuple[Path, Path]) -> None:
    """--teacher repeated: the student follows the teachers' mean softmax prediction (the Ensemble
    module's output is its log), recorded as both teachers; one teacher alone trains differently."""
    from clafuse.io.checkpoint import read_metadata
    from clafuse.training.objectives import Ensemble

    student, teacher = ckpts
    other = save_mlp(tmp_path / "other.safetensors", 3, 24)
    a, b = api.load_model(teacher).module(), api.load_model(other).module()
    x = torch.randn(5, 64)
    with torch.no_grad():
        mean = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
        torch.testing.assert_close(torch.softmax(Ensemble([a, b])(x), 1), mean)
    from tests.cli_runner import invoke

    out = tmp_path / "ens.safetensors"
    run = invoke("finetune", student, "-o", out, "--data", "digits", "--epochs", "1", "--batch-size", "128",
                 "--teacher", teacher, "--teacher", other, "--json")
    assert run.code == 0, run
    shas = read_metadata(out)["distilled_from"].split(",")
    assert shas == [api.load_model(teacher).sha256, api.load_model(other).sha256]
    single = api.finetune_checkpoint(student, tmp_path / "one.safetensors", epochs=1, teacher=teacher,
                                     **{**FAST, "lr": 0.01})
    assert json.loads(run.stdout)["history"][0]["train_loss"] != single["history"][0]["train_loss"]
    bad = invoke("finetune", student, "-o", tmp_path / "x.safetensors", "--data", "digits", "--teacher", teacher,
                 "--teacher", other, "--teacher-arch", "spec.json")
    assert bad.code != 0 and "one per teacher" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad
