"""Option sets are validated in the library: a bad value is refused from Python with a ClafuseError,
and from the shell with exit code 2 and one ``clafuse: error:`` line, before any file is read."""

from pathlib import Path

import numpy as np
import pytest
import torch

from clafuse import api
from clafuse.errors import ClafuseError, DataError
from clafuse.fusion.otfusion import FusionSettings
from clafuse.io.checkpoint import load_checkpoint
from clafuse.options import MIN_REG, Metric, choices, mixing_weights
from clafuse.training import FinetuneConfig
from tests.cli_runner import invoke
from tests.helpers import save_mlp


@pytest.mark.parametrize("change, words", [
    ({"solver": "exact"}, "--solver: 'exact' is not one of emd, sinkhorn"),
    ({"reg": 0.0}, "--reg must be greater than 0.0001"),
    ({"reg": MIN_REG}, "--reg must be greater than"),
    ({"reg": float("nan")}, "--reg must be a finite number"),
    ({"reg": float("inf")}, "--reg must be a finite number"),
    ({"reg": "0.1"}, "--reg must be a number"),
    ({"signal": "gradients"}, "--signal: 'gradients' is not one of activations, weights"),
    ({"ground": "cosine"}, "--ground"),
    ({"inserted": "drop"}, "--inserted"),
    ({"correction": "fix"}, "--correction"),
    ({"ridge": 0.0}, "ridge must be greater than 0"),
    ({"bn_reset": "yes"}, "bn_reset"),
])
def test_fusion_settings_refuse_bad_values(change: dict, words: str) -> None:
    with pytest.raises(ClafuseError) as info:
        FusionSettings(**change)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_fusion_settings_take_good_values() -> None:
    settings = FusionSettings(solver="sinkhorn", reg=2 * MIN_REG, inserted="keep", correction="none")
    assert settings.reg == 2 * MIN_REG and settings.inserted == "keep"


@pytest.mark.parametrize("change, words", [
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"epochs": 1.5}, "--epochs must be an integer"),
    ({"lr": 0.0}, "--lr must be greater than 0"),
    ({"lr": float("inf")}, "--lr must be a finite number"),
    ({"momentum": 1.0}, "--momentum must be less than 1"),
    ({"weight_decay": -1e-4}, "--weight-decay must be at least 0"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"schedule": "linear"}, "--schedule: 'linear' is not one of cosine, step, constant"),
    ({"warmup_steps": -1}, "--warmup-steps must be at least 0"),
    ({"seed": 2**64}, "--seed must be an integer from -2**63"),
    ({"optimizer": "adam"}, "--optimizer: 'adam' is not one of sgd, adamw"),
    ({"label_smoothing": 1.0}, "--label-smoothing must be less than 1"),
    ({"kd_alpha": 1.5}, "--kd-alpha must be at most 1"),
    ({"kd_temperature": float("nan")}, "--kd-temperature must be a finite number"),
    ({"augment": "flip"}, "--augment"),
    ({"precision": "fp8"}, "--precision: 'fp8' is not one of fp32, bf16, fp16"),
])
def test_finetune_config_refuses_bad_values(change: dict, words: str) -> None:
    with pytest.raises(DataError) as info:
        FinetuneConfig(**{"epochs": 1, **change})
    assert words in str(info.value)


def test_align_options_are_checked_before_reading(tmp_path: Path) -> None:
    missing = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]  # never read: the options fail first
    with pytest.raises(ClafuseError, match="--metric: 'cosine' is not one of cka, euclidean, wd, neuron"):
        api.align(missing, metric="cosine")
    with pytest.raises(ClafuseError, match="--samples must be at least 2"):
        api.align(missing, samples=1)
    with pytest.raises(ClafuseError, match="--seed must be an integer"):
        api.align(missing, seed=-(2**63) - 1)
    assert choices(Metric) == ("cka", "euclidean", "wd", "neuron")


@pytest.mark.parametrize("options, words", [
    ({"balance": "sideways"}, "--balance: 'sideways' is not one of add, merge"),
    ({"signal": "both"}, "--signal: 'both'"),
    ({"samples": 1}, "--samples must be at least 2"),
    ({"solver": "greedy"}, "--solver"),
    ({"reg": 0.0}, "--reg must be greater than 0.0001"),
    ({"dtype": "int8"}, "--dtype: 'int8' is not one of fp32, fp16, bf16"),
    ({"colour": "blue"}, "unknown fusion option"),
])
def test_fuse_options_are_checked_before_reading(tmp_path: Path, options: dict, words: str) -> None:
    with pytest.raises(ClafuseError) as info:
        api.fuse(tmp_path / "no-map.json", tmp_path / "out.safetensors", **options)
    assert words in str(info.value)


def test_finetune_options_are_checked_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ClafuseError, match="--optimizer: 'lbfgs'"):
        api.finetune_checkpoint(tmp_path / "missing.safetensors", tmp_path / "out.safetensors", data="digits",
                                optimizer="lbfgs")


@pytest.mark.parametrize("text, words", [
    ("inf,1", "must be finite numbers: inf"),
    ("1e309,0", "must be finite numbers: inf"),
    ("nan,1", "must be finite numbers: nan"),
    ("-1,2", "must be non-negative"),
    ("0,0", "must not all be zero"),
    ("1,2,3", "must be 2 non-negative numbers"),
])
def test_weights_refused(text: str, words: str) -> None:
    with pytest.raises(ClafuseError, match=words):
        api.parse_weights(text, 2)


def test_huge_weights_are_scaled_by_their_maximum() -> None:
    assert api.parse_weights("1e308,1e308", 2) == [1e308, 1e308]
    assert mixing_weights([1e308, 1e308]) == [1.0, 1.0]
    assert mixing_weights([1e308, 0.5e308]) == [1.0, 0.5]


def _run_bad(*args: object) -> str:
    run = invoke(*args)
    assert run.code == 2, str(run)
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clafuse: error: "), str(run)
    return lines[0]


@pytest.fixture(scope="module")
def fuse_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("options")
    for name, widths, seed in (("deep", [12, 10, 8], 0), ("shallow", [12, 8], 1)):
        save_mlp(root / f"{name}.safetensors", seed, widths, inputs=16, classes=5)
    np.savez(root / "x.npz", x=np.random.default_rng(0).random((100, 16)).astype(np.float32))
    api.align([root / "deep.safetensors", root / "shallow.safetensors"], root / "map.json",
              data=str(root / "x.npz"), samples=100)
    return root / "map.json"


@pytest.mark.parametrize("args, words", [
    (["--weights=inf,1"], "--weights must be finite numbers: inf"),
    (["--weights=1e309,0"], "--weights must be finite numbers: inf"),
    (["--reg", "0"], "--reg must be greater than 0.0001"),
    (["--reg", "nan"], "--reg must be a finite number"),
    (["--solver", "greedy"], "--solver: 'greedy' is not one of emd, sinkhorn"),
    (["--correction", "fix"], "--correction: 'fix' is not one of regress, repair, none"),
    (["--samples", "1"], "--samples must be at least 2"),
])
def test_cli_fuse_refuses_bad_options(fuse_map: Path, args: list[str], words: str) -> None:
    out = fuse_map.parent / "never.safetensors"
    assert words in _run_bad("fuse", "--map", fuse_map, "-o", out, *args)
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["align", "a.pt", "b.pt", "-o", "m.json", "--metric", "cosine"], "--metric: 'cosine' is not one of"),
    (["align", "a.pt", "b.pt", "-o", "m.json", "--samples", "1"], "--samples must be at least 2"),
    (["finetune", "a.pt", "--data", "digits", "-o", "o.safetensors", "--optimizer", "adam"], "--optimizer: 'adam'"),
    (["finetune", "a.pt", "--data", "digits", "-o", "o.safetensors", "--lr", "-1"], "--lr must be greater than 0"),
    (["finetune", "a.pt", "--data", "digits", "-o", "o.safetensors", "--epochs", "0"], "--epochs must be at least 1"),
    (["finetune", "a.pt", "--data", "digits", "-o", "o.safetensors", "--kd-alpha", "2"], "--kd-alpha must be at most"),
    (["finetune", "a.pt", "--data", "digits", "-o", "o.safetensors", "--precision", "fp8"], "--precision: 'fp8'"),
    (["schema", "model"], "schema: 'model' is not one of map"),
])
def test_cli_refuses_bad_options_of_every_command(tmp_path: Path, args: list[str], words: str) -> None:
    assert words in _run_bad(*args)


def test_cli_huge_weights_fuse_like_equal_ones(fuse_map: Path) -> None:
    root = fuse_map.parent
    for name, weights in (("huge", "1e308,1e308"), ("ones", "1,1")):
        run = invoke("fuse", "--map", fuse_map, "-o", root / f"{name}.safetensors", f"--weights={weights}", "--json")
        assert run.code == 0, str(run)
    huge, ones = load_checkpoint(root / "huge.safetensors"), load_checkpoint(root / "ones.safetensors")
    assert huge.keys() == ones.keys()
    assert all(torch.equal(huge[k], ones[k]) for k in huge)
