"""Data-parallel finetuning under torchrun (2 CPU processes, gloo) and mixed precision.

Two processes with a global batch must train the same weights as one process with that batch: the
MLP with augmentation, distillation and batches that do not split evenly, and a VGG with BatchNorm
(global batch statistics) across an interruption and ``--resume``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clafuse import api
from clafuse.arch.registry import FAMILIES
from clafuse.arch.vgg import VGGLinear, VGGSpec
from clafuse.io.checkpoint import load_checkpoint
from tests.helpers import save_mlp, save_safetensors, without_progress

TOL = {"rtol": 0, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("private_cache")


def _vgg_bn(path: Path) -> Path:
    """A tiny VGG with BatchNorm for the 1x8x8 digits and no dropout (its masks differ per rank)."""
    spec = VGGSpec(in_channels=1, config=[8, "M", 16, "M"], batch_norm=True, avgpool=None, input_size=(1, 8, 8),
                   classifier=[VGGLinear(index=0, in_features=64, out_features=10)])
    torch.manual_seed(0)
    return save_safetensors(path, FAMILIES["vgg"].build(spec))


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "CLAFUSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _torchrun(tmp_path: Path, args: list[object], script: list[str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m clafuse ARGS`` (or ``SCRIPT ARGS``) on a free port."""
    target = script if script is not None else ["-m", "clafuse"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target,
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300, cwd=tmp_path)


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype
        torch.testing.assert_close(x[k], y[k], **TOL, msg=lambda m: f"{k}: {m}")


def _clafuse_lines(stderr: str) -> list[str]:
    return [line for line in without_progress(stderr).splitlines() if line.startswith("clafuse:")]


def test_two_processes_train_like_one_with_the_global_batch(tmp_path: Path) -> None:
    student, teacher = save_mlp(tmp_path / "s.safetensors", 0, 16), save_mlp(tmp_path / "t.safetensors", 1, 32)
    # 1078 training digits in batches of 37: parts of 18 and 19, and a last batch of 5 (2 and 3).
    settings = {"epochs": 2, "batch_size": 37, "lr": 0.05, "augment": "crop-flip", "kd_alpha": 0.7}
    one = tmp_path / "one.safetensors"
    single = api.finetune_checkpoint(student, one, data="digits", teacher=teacher, **settings)

    two, metrics = tmp_path / "two.safetensors", tmp_path / "m.jsonl"
    proc = _torchrun(tmp_path, ["finetune", student, "--data", "digits", "-o", two, "--teacher", teacher,
                                "--epochs", 2, "--batch-size", 37, "--lr", 0.05, "--augment", "crop-flip",
                                "--kd-alpha", 0.7, "--metrics-out", metrics, "--json"])
    assert proc.returncode == 0, proc.stderr
    assert not _clafuse_lines(proc.stderr)
    report = json.loads(proc.stdout)  # one document: only rank 0 prints
    _assert_same_weights(one, two)
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == report["history"]
    for a, b in zip(single["history"], report["history"]):
        assert a["train_accuracy"] == b["train_accuracy"] and a["val_accuracy"] == b["val_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    assert not api.train_state_path(two).exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


STOP_AFTER_FIRST_EPOCH = """
import sys
import clafuse.training as training
from clafuse.cli import main

real_save = training.save_train_state

def save_then_stop(path, state):
    real_save(path, state)
    raise KeyboardInterrupt

training.save_train_state = save_then_stop
main(sys.argv[1:])
"""


def _digits_npz(tmp_path: Path) -> tuple[Path, Path]:
    """300 training and 200 validation digits: few steps, as rounding differences between one and two
    processes grow over many steps through ReLU and max-pool ties in a conv net."""
    from clafuse.data import load_source

    ds = load_source("digits")
    paths = tmp_path / "train.npz", tmp_path / "val.npz"
    for path, rows in zip(paths, (slice(0, 300), slice(300, 500))):
        np.savez(path, x=ds.x[rows].numpy(), y=ds.y[rows].numpy())
    return paths


def test_batchnorm_and_resume_under_ddp_match_one_process(tmp_path: Path) -> None:
    ckpt = _vgg_bn(tmp_path / "vgg.safetensors")
    train, val = _digits_npz(tmp_path)
    settings = {"epochs": 2, "batch_size": 100, "lr": 0.05, "augment": "crop"}
    one = tmp_path / "one.safetensors"
    api.finetune_checkpoint(ckpt, one, data=str(train), val=str(val), **settings)

    two = tmp_path / "two.safetensors"
    args = ["finetune", ckpt, "--data", train, "--val", val, "-o", two, "--epochs", 2, "--batch-size", 100,
            "--lr", 0.05, "--augment", "crop", "--json"]
    script = tmp_path / "stop.py"
    script.write_text(STOP_AFTER_FIRST_EPOCH)
    stopped = _torchrun(tmp_path, args, script=[str(script)])
    assert stopped.returncode != 0
    assert api.train_state_path(two).exists() and not two.exists()

    resumed = _torchrun(tmp_path, [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert [h["epoch"] for h in json.loads(resumed.stdout)["history"]] == [1, 2]
    assert not api.train_state_path(two).exists()
    _assert_same_weights(one, two)  # BatchNorm running statistics included


def test_an_error_on_one_rank_stops_all_with_one_line(tmp_path: Path) -> None:
    ckpt = save_mlp(tmp_path / "s.safetensors", 0, 16)
    out = tmp_path / "out.safetensors"
    # Only rank 0 opens the metrics file, so only rank 0 fails; rank 1 must not wait for it forever.
    proc = _torchrun(tmp_path, ["finetune", ckpt, "--data", "digits", "-o", out, "--metrics-out",
                                tmp_path / "missing" / "m.jsonl"])
    assert proc.returncode != 0
    lines = _clafuse_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("clafuse: error: cannot write"), proc.stderr
    assert not out.exists()


def test_bf16_trains_close_to_fp32(tmp_path: Path) -> None:
    ckpt = save_mlp(tmp_path / "s.safetensors", 0, 32)
    settings = {"data": "digits", "epochs": 2, "batch_size": 64, "lr": 0.2}
    fp32, bf16 = tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors"
    single = api.finetune_checkpoint(ckpt, fp32, **settings)
    report = api.finetune_checkpoint(ckpt, bf16, precision="bf16", **settings)
    a, b = load_checkpoint(fp32), load_checkpoint(bf16)
    assert all(b[k].dtype == torch.float32 and torch.isfinite(b[k]).all() for k in b)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0.05)
    assert report["history"][-1]["val_accuracy"] > 0.8
    assert report["history"][-1]["val_accuracy"] == pytest.approx(single["history"][-1]["val_accuracy"], abs=0.02)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on CUDA")
def test_fp16_on_cpu_is_a_clean_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from clafuse.cli import app

    ckpt = save_mlp(tmp_path / "s.safetensors", 0, 16)
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(app, ["finetune", str(ckpt), "--data", "digits", "-o", str(out), "--precision", "fp16"])
    assert result.exit_code == 2
    text = result.stderr if result.stderr_bytes is not None else result.output
    assert text.strip().splitlines() == ["clafuse: error: precision fp16 needs a CUDA GPU (this run is on cpu); "
                                         "use bf16 on the CPU"]
    assert not out.exists()
