"""Checks up front: what ``fuse`` would refuse, ``align`` refuses first (different block kinds,
activations, a mapping neither balancing can carry out); ``--no-pin-first`` is refused where no
group can honour it and said where some cannot; data-free ``neuron`` costs mean something between
layers of equal width."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clafuse import api
from clafuse.arch.registry import FAMILIES
from clafuse.arch.resnet import ResNetSpec
from clafuse.arch.vgg import VGGLinear, VGGSpec
from clafuse.errors import ClafuseError
from tests.cli_runner import invoke
from tests.helpers import save_mlp, save_safetensors


def saved(path: Path, family: str, spec, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_safetensors(path, FAMILIES[family].build(spec))


def resnet(block: str, layers: list[int]) -> ResNetSpec:
    return ResNetSpec(block=block, layers=layers, widths=[4, 8], stem_width=8, stem="small", in_channels=1,
                      num_classes=10)


def vgg(config: list) -> VGGSpec:
    last = [v for v in config if v != "M"][-1]
    return VGGSpec(in_channels=1, config=config, avgpool=None, input_size=(1, 8, 8),
                   classifier=[VGGLinear(index=0, in_features=last * 4, out_features=10)])


def test_basic_and_bottleneck_resnets_are_refused_by_align(tmp_path: Path) -> None:
    a = saved(tmp_path / "basic.safetensors", "resnet", resnet("basic", [2, 2]), 0)
    b = saved(tmp_path / "bottleneck.safetensors", "resnet", resnet("bottleneck", [1, 1]), 1)
    res = invoke("align", a, b, "--metric", "neuron", "-o", tmp_path / "map.json")
    assert res.code != 0 and "cannot be fused: blocks basic vs bottleneck" in res.stderr, res
    assert res.stderr.count("\n") == 1 and not (tmp_path / "map.json").exists()


def test_mlps_with_different_activations_are_refused_by_align(tmp_path: Path) -> None:
    a, b = save_mlp(tmp_path / "a.safetensors", 0, [16, 12]), save_mlp(tmp_path / "b.safetensors", 1, [12])
    spec = json.loads(invoke("inspect", a, "--json").stdout)["spec"]
    (tmp_path / "a.json").write_text(json.dumps({**spec, "activation": "gelu"}))
    with pytest.raises(ClafuseError, match="cannot be fused: activation gelu vs relu"):
        api.align([a, b], None, archs=[tmp_path / "a.json", None], metric="neuron")


def test_no_pin_first_is_refused_where_no_group_can_honour_it(tmp_path: Path) -> None:
    a = saved(tmp_path / "a.safetensors", "resnet", resnet("basic", [2, 2]), 0)
    b = saved(tmp_path / "b.safetensors", "resnet", resnet("basic", [1, 1]), 1)
    res = invoke("align", a, b, "--metric", "neuron", "--no-pin-first", "-o", tmp_path / "map.json")
    assert res.code != 0 and "--no-pin-first cannot apply to a resnet" in res.stderr, res


def test_no_pin_first_is_honoured_where_it_can_be_and_said_where_not(tmp_path: Path) -> None:
    a = saved(tmp_path / "a.safetensors", "vgg", vgg([4, "M", 16, 8, 16, "M"]), 0)
    b = saved(tmp_path / "b.safetensors", "vgg", vgg([4, "M", 8, 16, "M"]), 1)
    pinned = api.align([a, b], None, metric="neuron")
    with pytest.warns(UserWarning, match="does not apply to features.chunk0 of a vgg"):
        unpinned = api.align([a, b], None, metric="neuron", pin_first=False)

    def chunk1(doc) -> list[int]:
        return next(g for g in doc.alignments[0].groups if g.name == "features.chunk1").mapping

    assert chunk1(pinned) == [0, 2] and chunk1(unpinned) == [1, 2]  # widths 8, 16 find their own


def test_data_free_costs_between_equal_widths_follow_relative_depth(tmp_path: Path) -> None:
    a = saved(tmp_path / "a.safetensors", "vgg", vgg([4, "M", 8, 8, 8, 8, "M"]), 0)
    b = saved(tmp_path / "b.safetensors", "vgg", vgg([4, "M", 8, 8, "M"]), 1)
    res = invoke("align", a, b, "--metric", "neuron", "-o", tmp_path / "map.json")
    assert res.code == 0, res
    doc = json.loads((tmp_path / "map.json").read_text())
    chunk1 = next(g for g in doc["alignments"][0]["groups"] if g["name"] == "features.chunk1")
    cost = np.array(chunk1["cost"])
    assert (cost > 0).sum() >= cost.size - 2  # not all zero: relative depth tells them apart
    assert cost[0].argmin() == 0 and cost[1].argmin() == 3 and chunk1["mapping"] == [0, 3]
