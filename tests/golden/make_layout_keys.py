"""Write ``layout_keys.json``: the state-dict keys and shapes, in state-dict order, of layouts
people have besides torchvision's: timm's resnet18d and resnet50d, timm's vgg11_bn, a VGG of
nested Sequentials and an MLP with BatchNorm1d.

Transcribed from the libraries' documented module layouts, not from clafuse, so the golden data
stays an independent reference:

* timm ``resnet.py`` (``resnet18d``/``resnet50d``: ``stem_width=32, stem_type='deep',
  avg_down=True``): ``conv1`` is ``Sequential(Conv2d(in, 32, 3, s2), BN, ReLU, Conv2d(32, 32),
  BN, ReLU, Conv2d(32, 64))`` (indices 0, 1, 3, 4, 6), then ``bn1``; blocks register conv1, bn1,
  conv2, bn2 (conv3, bn3 for Bottleneck) and, where ``stride != 1 or inplanes != planes *
  expansion``, ``downsample_avg``: ``Sequential(AvgPool2d or Identity, Conv2d 1x1, BN)``, so the
  conv is ``downsample.1`` and the BN ``downsample.2``; then ``fc``.
* timm ``vgg.py`` (``vgg11_bn``): ``features`` as torchvision's ``make_layers`` (conv with bias,
  BN, ReLU; 'M' one index), ``pre_logits`` a ``ConvMlp`` (``fc1`` Conv2d(512, 4096, 7), ``fc2``
  Conv2d(4096, 4096, 1), both with bias) and ``head`` a ``ClassifierHead`` whose ``fc`` is
  Linear(4096, classes).
* a VGG written as one ``Sequential`` per chunk, each ``(Conv2d, BatchNorm2d, ReLU)*n, MaxPool2d``
  (``features.S.I``), with torchvision's classifier; and ``nn.Sequential(Linear, BatchNorm1d,
  ReLU, ..., Linear)`` MLPs.

A BatchNorm's state dict is weight, bias, running_mean, running_var, num_batches_tracked (0-d).
Run ``python tests/golden/make_layout_keys.py`` to regenerate (standard library only); the
functions take sizes, so tests build small variants of the same layouts.
"""

from __future__ import annotations

from pathlib import Path

from make_resnet_keys import write_keys

OUT = Path(__file__).with_name("layout_keys.json")
Keys = list[tuple[str, list[int]]]
VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def bn(prefix: str, c: int) -> Keys:
    return [(f"{prefix}.weight", [c]), (f"{prefix}.bias", [c]), (f"{prefix}.running_mean", [c]),
            (f"{prefix}.running_var", [c]), (f"{prefix}.num_batches_tracked", [])]


def timm_resnet_d(block: str, layers: list[int], widths: list[int] = (64, 128, 256, 512), stem: int = 32,
                  in_chans: int = 3, num_classes: int = 1000) -> Keys:
    expansion = 1 if block == "basic" else 4
    inplanes = widths[0]
    keys = [("conv1.0.weight", [stem, in_chans, 3, 3]), *bn("conv1.1", stem), ("conv1.3.weight", [stem, stem, 3, 3]),
            *bn("conv1.4", stem), ("conv1.6.weight", [inplanes, stem, 3, 3]), *bn("bn1", inplanes)]
    for i, (planes, count) in enumerate(zip(widths, layers)):
        stride = 1 if i == 0 else 2
        for j in range(count):
            p = f"layer{i + 1}.{j}"
            if block == "basic":
                keys += [(f"{p}.conv1.weight", [planes, inplanes, 3, 3]), *bn(f"{p}.bn1", planes),
                         (f"{p}.conv2.weight", [planes, planes, 3, 3]), *bn(f"{p}.bn2", planes)]
            else:
                keys += [(f"{p}.conv1.weight", [planes, inplanes, 1, 1]), *bn(f"{p}.bn1", planes),
                         (f"{p}.conv2.weight", [planes, planes, 3, 3]), *bn(f"{p}.bn2", planes),
                         (f"{p}.conv3.weight", [planes * expansion, planes, 1, 1]), *bn(f"{p}.bn3", planes * expansion)]
            if j == 0 and (stride != 1 or inplanes != planes * expansion):
                keys += [(f"{p}.downsample.1.weight", [planes * expansion, inplanes, 1, 1]),
                         *bn(f"{p}.downsample.2", planes * expansion)]
            inplanes = planes * expansion
    return keys + [("fc.weight", [num_classes, inplanes]), ("fc.bias", [num_classes])]


def vgg_features(cfg: list, in_chans: int = 3) -> tuple[Keys, int]:
    keys, i, prev = [], 0, in_chans
    for v in cfg:
        if v == "M":
            i += 1
            continue
        keys += [(f"features.{i}.weight", [v, prev, 3, 3]), (f"features.{i}.bias", [v]), *bn(f"features.{i + 1}", v)]
        i, prev = i + 3, v
    return keys, prev


def timm_vgg_bn(cfg: list = VGG11, hidden: int = 4096, kernel: int = 7, in_chans: int = 3,
                num_classes: int = 1000) -> Keys:
    keys, last = vgg_features(cfg, in_chans)
    return keys + [("pre_logits.fc1.weight", [hidden, last, kernel, kernel]), ("pre_logits.fc1.bias", [hidden]),
                   ("pre_logits.fc2.weight", [hidden, hidden, 1, 1]), ("pre_logits.fc2.bias", [hidden]),
                   ("head.fc.weight", [num_classes, hidden]), ("head.fc.bias", [num_classes])]


def nested_vgg_bn(cfg: list = VGG11, hidden: int = 4096, positions: int = 49, in_chans: int = 3,
                  num_classes: int = 1000) -> Keys:
    keys, prev, s, i = [], in_chans, 0, 0
    for v in cfg:
        if v == "M":
            s, i = s + 1, 0
            continue
        keys += [(f"features.{s}.{i}.weight", [v, prev, 3, 3]), (f"features.{s}.{i}.bias", [v]),
                 *bn(f"features.{s}.{i + 1}", v)]
        i, prev = i + 3, v
    return keys + [("classifier.0.weight", [hidden, prev * positions]), ("classifier.0.bias", [hidden]),
                   ("classifier.3.weight", [hidden, hidden]), ("classifier.3.bias", [hidden]),
                   ("classifier.6.weight", [num_classes, hidden]), ("classifier.6.bias", [num_classes])]


def mlp_bn(widths: list[int] = (256, 128), inputs: int = 784, classes: int = 10) -> Keys:
    keys, prev, i = [], inputs, 0
    for w in widths:
        keys += [(f"{i}.weight", [w, prev]), (f"{i}.bias", [w]), *bn(f"{i + 1}", w)]
        i, prev = i + 3, w
    return keys + [(f"{i}.weight", [classes, prev]), (f"{i}.bias", [classes])]


def main() -> None:
    doc = {"timm_resnet18d": timm_resnet_d("basic", [2, 2, 2, 2]),
           "timm_resnet50d": timm_resnet_d("bottleneck", [3, 4, 6, 3]),
           "timm_vgg11_bn": timm_vgg_bn(), "nested_vgg11_bn": nested_vgg_bn(), "mlp_bn": mlp_bn()}
    write_keys(doc, OUT)


if __name__ == "__main__":
    main()
