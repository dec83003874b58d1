"""Write ``resnet_keys.json``: the state-dict keys and shapes of torchvision's resnet18, resnet34
and resnet50, in state-dict order.

Transcribed from torchvision's ``torchvision/models/resnet.py`` (v0.15+), not from clafuse, so
the golden data stays an independent reference: ``ResNet.__init__`` registers conv1, bn1, relu,
maxpool, layer1..4, avgpool, fc; ``_make_layer`` gives a stage's first block a downsample
(1x1 conv, stride, + BN) iff ``stride != 1 or inplanes != planes * expansion``; BasicBlock
registers conv1 (3x3), bn1, conv2 (3x3), bn2, downsample; Bottleneck conv1 (1x1), bn1, conv2
(3x3, carries the stride), bn2, conv3 (1x1, planes * 4), bn3, downsample. A BatchNorm2d's
state dict is weight, bias, running_mean, running_var, num_batches_tracked (a 0-d tensor).

Run ``python tests/golden/make_resnet_keys.py`` to regenerate (needs only the standard library).
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("resnet_keys.json")
MODELS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}


def _bn(prefix: str, c: int) -> list[tuple[str, list[int]]]:
    return [(f"{prefix}.weight", [c]), (f"{prefix}.bias", [c]), (f"{prefix}.running_mean", [c]),
            (f"{prefix}.running_var", [c]), (f"{prefix}.num_batches_tracked", [])]


def torchvision_resnet_keys(block: str, layers: list[int], num_classes: int = 1000) -> list[tuple[str, list[int]]]:
    expansion = 1 if block == "basic" else 4
    keys = [("conv1.weight", [64, 3, 7, 7]), *_bn("bn1", 64)]
    inplanes = 64
    for i, (planes, count) in enumerate(zip([64, 128, 256, 512], layers)):
        stride = 1 if i == 0 else 2
        for j in range(count):
            p = f"layer{i + 1}.{j}"
            if block == "basic":
                keys += [(f"{p}.conv1.weight", [planes, inplanes, 3, 3]), *_bn(f"{p}.bn1", planes),
                         (f"{p}.conv2.weight", [planes, planes, 3, 3]), *_bn(f"{p}.bn2", planes)]
            else:
                keys += [(f"{p}.conv1.weight", [planes, inplanes, 1, 1]), *_bn(f"{p}.bn1", planes),
                         (f"{p}.conv2.weight", [planes, planes, 3, 3]), *_bn(f"{p}.bn2", planes),
                         (f"{p}.conv3.weight", [planes * expansion, planes, 1, 1]),
                         *_bn(f"{p}.bn3", planes * expansion)]
            if j == 0 and (stride != 1 or inplanes != planes * expansion):
                keys += [(f"{p}.downsample.0.weight", [planes * expansion, inplanes, 1, 1]),
                         *_bn(f"{p}.downsample.1", planes * expansion)]
            inplanes = planes * expansion
    keys += [("fc.weight", [num_classes, 512 * expansion]), ("fc.bias", [num_classes])]
    return keys


def write_keys(doc: dict, out: Path) -> None:
    """``doc`` (name -> [(key, shape), ...]) as JSON with one key per line, so diffs stay readable."""
    lines = ["{"]
    for n, (name, keys) in enumerate(doc.items()):
        lines.append(f'  "{name}": [')
        lines += [f"    {json.dumps([k, s])}{',' if i < len(keys) - 1 else ''}" for i, (k, s) in enumerate(keys)]
        lines.append("  ]" + ("," if n < len(doc) - 1 else ""))
    lines.append("}")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    write_keys({name: torchvision_resnet_keys(block, layers) for name, (block, layers) in MODELS.items()}, OUT)


if __name__ == "__main__":
    main()
