"""What every command shares: --normalize and the raw-pixel warning, --threads, progress on
stderr, eval's ensemble of the parents only, and byte-identical finetune outputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clafuse import progress
from clafuse.data.normalize import Normalization
from clafuse.errors import DataError
from tests.cli_runner import invoke
from tests.helpers import save_mlp


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plumbing")
    gen = np.random.default_rng(0)
    x = gen.standard_normal((96, 64)).astype(np.float32)
    np.savez(root / "d.npz", x=x, y=gen.integers(0, 10, 96))
    save_mlp(root / "a.safetensors", 0, [32, 16])
    save_mlp(root / "b.safetensors", 1, 24)
    assert invoke("align", root / "a.safetensors", root / "b.safetensors", "-o", root / "m.json",
                  "--metric", "neuron").code == 0
    assert invoke("fuse", "--map", root / "m.json", "-o", root / "f.safetensors", "--data", root / "d.npz",
                  "--samples", 64).code == 0
    return root


# --- --normalize --------------------------------------------------------------------------------


def test_normalize_parses_one_value_per_channel_presets_and_refuses_the_rest() -> None:
    assert Normalization.parse("0.5,0.25") == Normalization((0.5,), (0.25,))
    assert Normalization.parse("1,2,3,4,5,6") == Normalization((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert Normalization.parse("imagenet").mean == (0.485, 0.456, 0.406)
    for bad in ("1", "1,2,3", "a,b", "0,0", "0,-1", "nan,1"):
        with pytest.raises(DataError, match="--normalize"):
            Normalization.parse(bad)
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    out = Normalization.parse("1,2,3,2,4,8").apply(x, "test")
    assert torch.equal(out[:, 1], (x[:, 1] - 2) / 4)
    with pytest.raises(DataError, match="3 channels"):
        Normalization.parse("1,2,3,2,4,8").apply(torch.zeros(2, 1, 2, 2), "test")


def test_raw_uint8_pixels_warn_and_normalize_gives_the_standardised_numbers(tmp_path: Path) -> None:
    gen = np.random.default_rng(1)
    pixels = gen.integers(0, 256, (40, 1, 28, 28)).astype(np.uint8)
    y = gen.integers(0, 10, 40)
    np.savez(tmp_path / "raw.npz", x=pixels, y=y)
    mean, std = 0.1307 * 255, 0.3081 * 255
    np.savez(tmp_path / "std.npz", x=((pixels.astype(np.float32) - mean) / std).astype(np.float32), y=y)
    model = save_mlp(tmp_path / "m.safetensors", 0, 16, inputs=784)
    raw = invoke("eval", model, "--data", tmp_path / "raw.npz", "--json")
    assert raw.code == 0 and "raw 0-255 pixels" in raw.stderr and "--normalize 33.33,78.57" in raw.stderr
    fixed = invoke("eval", model, "--data", tmp_path / "raw.npz", "--normalize", f"{mean},{std}", "--json")
    reference = invoke("eval", model, "--data", tmp_path / "std.npz", "--json")
    assert fixed.code == 0 and "warning" not in fixed.stderr and "warning" not in reference.stderr
    got, want = json.loads(fixed.stdout)["models"][0], json.loads(reference.stdout)["models"][0]
    assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    np.savez(tmp_path / "unit.npz", x=pixels.astype(np.float32) / 255, y=y)
    unit = invoke("eval", model, "--data", tmp_path / "unit.npz")
    assert "pixels in [0, 1]" in unit.stderr and "--normalize 0.1307,0.3081" in unit.stderr


def test_align_records_the_normalization_and_fuse_reuses_it(root: Path) -> None:
    run = invoke("align", root / "a.safetensors", root / "b.safetensors", "-o", root / "mn.json", "--data",
                 root / "d.npz", "--samples", 64, "--normalize", "0.5,2")
    assert run.code == 0, str(run)
    assert json.loads((root / "mn.json").read_text())["data"]["normalize"] == [[0.5], [2.0]]
    plain = invoke("align", root / "a.safetensors", root / "b.safetensors", "-o", root / "mp.json", "--data",
                   root / "d.npz", "--samples", 64)
    assert plain.code == 0 and "normalize" not in json.loads((root / "mp.json").read_text())["data"]
    fused = invoke("fuse", "--map", root / "mn.json", "-o", root / "fn.safetensors", "--json")
    assert fused.code == 0, str(fused)
    refused = invoke("align", root / "a.safetensors", root / "b.safetensors", "-o", root / "x.json", "--metric",
                     "neuron", "--normalize", "0.5,2")
    assert refused.code == 2 and "--metric neuron" in refused.stderr


# --- eval's ensemble ----------------------------------------------------------------------------


def test_the_ensemble_row_averages_the_parents_not_the_fused_model(root: Path) -> None:
    run = invoke("eval", root / "a.safetensors", root / "b.safetensors", root / "f.safetensors", "--data",
                 root / "d.npz", "--json")
    assert run.code == 0, str(run)
    doc = json.loads(run.stdout)
    assert doc["ensemble_of"] == ["A", "B"]
    chosen = json.loads(invoke("eval", root / "a.safetensors", root / "b.safetensors", root / "f.safetensors",
                               "--data", root / "d.npz", "--ensemble-of", "A,C", "--json").stdout)
    assert chosen["ensemble_of"] == ["A", "C"] and chosen["ensemble"] != doc["ensemble"]
    alone = json.loads(invoke("eval", root / "a.safetensors", root / "f.safetensors", "--data", root / "d.npz",
                              "--json").stdout)
    assert "ensemble" not in alone
    table = invoke("eval", root / "a.safetensors", root / "b.safetensors", root / "f.safetensors", "--data",
                   root / "d.npz")
    assert "ensemble of A, B" in table.stdout


# --- finetune outputs ---------------------------------------------------------------------------


def test_two_identical_finetune_runs_write_identical_bytes(root: Path, tmp_path: Path) -> None:
    outs = []
    for name in ("one", "two"):
        out = tmp_path / f"{name}.safetensors"
        run = invoke("finetune", root / "a.safetensors", "--data", root / "d.npz", "--val", root / "d.npz",
                     "--epochs", 2, "--batch-size", 32, "-o", out, "--json")
        assert run.code == 0, str(run)
        assert all("seconds" in h for h in json.loads(run.stdout)["history"])
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# --- threads and progress -----------------------------------------------------------------------


def test_threads_are_set_and_shown_in_json(root: Path) -> None:
    before = torch.get_num_threads()
    try:
        run = invoke("inspect", root / "a.safetensors", "--threads", 1, "--json")
        assert run.code == 0 and json.loads(run.stdout)["threads"] == 1
        default = json.loads(invoke("inspect", root / "a.safetensors", "--json").stdout)["threads"]
        assert default >= 1
        bad = invoke("inspect", root / "a.safetensors", "--threads", -1)
        assert bad.code == 2 and "--threads must be at least 0" in bad.stderr
    finally:
        torch.set_num_threads(before)


def test_progress_shows_long_steps_and_layers_as_plain_lines() -> None:
    stream = io.StringIO()
    with progress.reporting(True, stream, delay=0.0):
        with progress.step("fusing"):
            for k in range(3):
                progress.advance(k + 1, 3, f"layer{k}")
    lines = stream.getvalue().splitlines()
    assert all(line.startswith(progress.PREFIX) for line in lines)
    assert lines[-1].startswith("clafuse: progress: fusing: done in ")
    assert "clafuse: progress: fusing: 3/3 (layer2)" in lines
    quiet = io.StringIO()
    with progress.reporting(True, quiet, delay=60.0):
        with progress.step("quick"):
            progress.advance(1, 1)
    assert quiet.getvalue() == ""
    progress.advance(1, 1)  # no reporter: nothing happens


def test_progress_is_quiet_with_json_unless_asked(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "DEFAULT_DELAY", 0.0)
    args = ["eval", root / "a.safetensors", "--data", root / "d.npz", "--json"]
    quiet, shown = invoke(*args), invoke(*args, "--progress")
    assert quiet.code == 0 and progress.PREFIX not in quiet.stderr
    assert shown.code == 0 and f"{progress.PREFIX}evaluating on 96 samples" in shown.stderr
    assert json.loads(shown.stdout) == json.loads(quiet.stdout)
