"""Checkpoints as other tools write them: prefixes, renamed layers, extra tensors, training
wrappers (Lightning ``.ckpt``, tutorial dicts) and whole pickled models; key handling recorded in
the map and applied by fuse; outputs written back in the input's own form (``--keep-wrapper``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clafuse import api
from clafuse.errors import ClafuseError
from clafuse.io.checkpoint import load_checkpoint
from clafuse.io.keys import KeyMap, common_prefixes
from tests.cli_runner import invoke


class SmallVGG(nn.Module):
    """torchvision's VGG layout (``features.N`` conv/BN/ReLU/pool, ``classifier.N`` Linears) for
    1x16x16 inputs and 5 classes."""

    def __init__(self, convs: list, hidden: list[int], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        channels = 1
        for width in convs:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        dims = [channels * 16, *hidden, 5]
        classifier: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            classifier += [nn.Linear(a, b), nn.ReLU()]
        self.classifier = nn.Sequential(*classifier[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class Wrapped(nn.Module):
    """A training module around a network, as Lightning users write it: ``model.`` + a loss buffer."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net
        self.criterion = nn.CrossEntropyLoss(weight=torch.ones(5))


DEEP = [4, 4, "M", 6, "M"]
SHALLOW = [4, "M", 6, "M"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    gen = np.random.default_rng(0)
    np.savez(root / "x.npz", x=gen.standard_normal((32, 1, 16, 16)).astype(np.float32), y=np.arange(32) % 5)
    return root


def _state(convs: list, seed: int) -> dict[str, torch.Tensor]:
    return SmallVGG(convs, [8], seed).state_dict()


# --- the key map itself ---------------------------------------------------------------------------


def test_key_map_ignores_strips_and_renames_in_that_order_and_inverts_exactly() -> None:
    names = ["model.conv_layers.0.weight", "model.fc_layers.0.weight", "criterion.weight", "model.extra.bias"]
    keys = KeyMap.from_options("model.", [r"^conv_layers\.=features.", r"^fc_layers\.(\d+)=classifier.\1"],
                               [r"\.extra\."])
    plan = keys.apply(names)
    assert plan.names == {"features.0.weight": "model.conv_layers.0.weight",
                          "classifier.0.weight": "model.fc_layers.0.weight"}
    assert plan.ignored == ["criterion.weight", "model.extra.bias"]
    assert all(plan.original(new) == old for new, old in plan.names.items())
    assert KeyMap.model_validate(json.loads(keys.model_dump_json())) == keys


@pytest.mark.parametrize("options, message", [
    ((None, ["a"], []), "not OLD=NEW"),
    ((None, ["(=x"], []), "not a valid regular expression"),
    ((None, [r"a=\2"], []), "replacement"),
    ((None, [], ["[z"]), "--ignore-keys"),
])
def test_bad_key_options_are_refused_with_the_option_named(options, message: str) -> None:
    with pytest.raises(ClafuseError, match=message):
        KeyMap.from_options(*options)


def test_renames_that_collide_and_prefixes_that_match_nothing_are_refused() -> None:
    with pytest.raises(ClafuseError, match="the same name"):
        KeyMap.from_options(None, ["^(a|b)=c"]).apply(["a.weight", "b.weight"])
    with pytest.raises(ClafuseError, match="no tensor name starts with 'net.'"):
        KeyMap.from_options("net.").apply(["model.weight"])


def test_common_prefixes_never_empty_a_name() -> None:
    assert common_prefixes(["a.b.c.w", "a.b.d.w"]) == ["a.", "a.b."]
    assert common_prefixes(["a.w", "b.w"]) == []
    assert common_prefixes(["a.b", "a.b"]) == ["a."]


# --- detection with key handling ----------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["model.", "net.", "backbone.", "module.model."])
def test_a_shared_prefix_is_stripped_when_the_rest_detects(root: Path, prefix: str) -> None:
    path = root / f"prefixed-{prefix.replace('.', '_')}.safetensors"
    save_file({prefix + k: v for k, v in _state(DEEP, 0).items()}, str(path))
    run = invoke("inspect", path, "--json")
    assert run.code == 0, str(run)
    doc = json.loads(run.stdout)
    assert doc["family"] == "vgg" and doc["depth"] == 4
    # The reader removes DataParallel's module. itself; the rest is the automatic strip.
    assert doc["keys"]["strip_prefix"] == prefix.removeprefix("module.")


def test_custom_layer_names_fit_with_renames(root: Path) -> None:
    state = {k.replace("features.", "conv_layers.").replace("classifier.", "fc_layers."): v
             for k, v in _state(SHALLOW, 1).items()}
    path = root / "custom.safetensors"
    save_file(state, str(path))
    refused = invoke("inspect", path)
    assert refused.code == 2 and "conv_layers (14), fc_layers (4)" in refused.stderr
    assert "--rename" in refused.stderr and refused.stderr.count("\n") == 1
    run = invoke("inspect", path, "--rename", r"^conv_layers\.=features.", "--rename", r"^fc_layers\.=classifier.",
                 "--json")
    assert run.code == 0, str(run)
    assert json.loads(run.stdout)["family"] == "vgg"


def test_an_extra_tensor_is_named_as_the_culprit_and_can_be_ignored(root: Path) -> None:
    path = root / "extra.pt"
    torch.save({**_state(DEEP, 0), "normalizer.mean": torch.zeros(3)}, path)
    refused = invoke("inspect", path)
    assert refused.code == 2
    assert "1 tensor (normalizer.mean (3,)) does not fit the vgg layout" in refused.stderr
    assert r"--ignore-keys '^normalizer\.'" in refused.stderr
    run = invoke("inspect", path, "--ignore-keys", r"^normalizer\.", "--json")
    assert run.code == 0, str(run)
    assert json.loads(run.stdout)["ignored_keys"] == ["normalizer.mean"]


def test_a_whole_pickled_model_is_refused_with_how_to_resave_it(tmp_path: Path) -> None:
    torch.save(nn.Sequential(nn.Linear(4, 3)), tmp_path / "whole.pt")
    run = invoke("inspect", tmp_path / "whole.pt")
    assert run.code == 2 and "torch.save(model.state_dict(), path)" in run.stderr
    assert run.stderr.count("\n") == 1


# --- recorded in the map, applied by fuse, written back in the input's form ----------------------


@pytest.fixture(scope="module")
def wrapped(root: Path) -> dict[str, object]:
    """A Lightning-style .ckpt (model. prefix, a loss buffer, optimizer state) and a tutorial dict."""
    deep = Wrapped(SmallVGG(DEEP, [8], 0)).state_dict()
    ckpt = {"epoch": 4, "global_step": 40, "pytorch-lightning_version": "2.6.0", "state_dict": deep,
            "hyper_parameters": {"lr": 0.1}, "optimizer_states": [{"state": {}, "param_groups": []}],
            "lr_schedulers": [], "loops": {"fit_loop": {"epoch": 4}}}
    torch.save(ckpt, root / "deep.ckpt")
    shallow = {"net." + k: v for k, v in _state(SHALLOW, 1).items()}
    torch.save({"model_state_dict": shallow, "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 2},
               root / "shallow.pt")
    run = invoke("align", root / "deep.ckpt", root / "shallow.pt", "-o", root / "map.json", "--data",
                 root / "x.npz", "--samples", 32, "--ignore-keys", r"^criterion\.", "--json")
    assert run.code == 0, str(run)
    plain = invoke("fuse", "--map", root / "map.json", "-o", root / "plain.safetensors", "--json")
    assert plain.code == 0, str(plain)
    return {"deep": deep, "shallow": shallow, "ckpt": ckpt}


def test_the_map_records_each_models_key_handling(root: Path, wrapped) -> None:
    doc = json.loads((root / "map.json").read_text())
    deep, shallow = doc["models"]
    assert deep["keys"] == {"strip_prefix": "model.", "rename": [], "ignore": [r"^criterion\."]}
    assert shallow["keys"]["strip_prefix"] == "net."


def test_fuse_reads_with_the_maps_key_handling_and_writes_family_names_by_default(root: Path, wrapped) -> None:
    fused = load_file(root / "plain.safetensors")
    assert set(fused) == set(_state(DEEP, 0))


def test_keep_wrapper_round_trips_a_lightning_checkpoint(root: Path, wrapped) -> None:
    out = root / "fused.ckpt"
    run = invoke("fuse", "--map", root / "map.json", "-o", out, "--keep-wrapper", "--json")
    assert run.code == 0, str(run)
    assert json.loads(run.stdout)["kept_wrapper"]["dropped"] == ["optimizer_states", "lr_schedulers"]
    got = torch.load(out, weights_only=True)
    ckpt = wrapped["ckpt"]
    assert set(got) == set(ckpt) - {"optimizer_states", "lr_schedulers"} | {"clafuse"}
    assert got["epoch"] == 4 and got["hyper_parameters"] == {"lr": 0.1} and got["loops"] == ckpt["loops"]
    assert list(got["state_dict"]) == list(ckpt["state_dict"])  # same names, same order
    assert torch.equal(got["state_dict"]["criterion.weight"], torch.ones(5))  # ignored: copied through
    plain = load_file(root / "plain.safetensors")
    for key, value in plain.items():
        assert torch.equal(got["state_dict"][f"model.{key}"], value)
    module = Wrapped(SmallVGG(DEEP, [8], 5))
    module.load_state_dict(got["state_dict"], strict=True)  # the code that wrote it loads it back
    assert json.loads(got["clafuse"]["inputs"])[0]["path"] == "deep.ckpt"
    # and clafuse reads its own output again
    assert invoke("inspect", out, "--ignore-keys", r"^criterion\.").code == 0


def test_keep_wrapper_round_trips_a_tutorial_dict_and_needs_a_torch_output(root: Path, tmp_path: Path) -> None:
    state = {"net." + k: v for k, v in _state(DEEP, 2).items()}
    torch.save({"model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 2},
               tmp_path / "tutorial.pt")
    save_file(_state(SHALLOW, 3), str(tmp_path / "partner.safetensors"))
    assert invoke("align", tmp_path / "tutorial.pt", tmp_path / "partner.safetensors", "-o", tmp_path / "m.json",
                  "--data", root / "x.npz", "--samples", 32).code == 0
    refused = invoke("fuse", "--map", tmp_path / "m.json", "-o", tmp_path / "s.safetensors", "--keep-wrapper")
    assert refused.code == 2 and "'model_state_dict'" in refused.stderr and ".ckpt or .pt" in refused.stderr
    assert not (tmp_path / "s.safetensors").exists()
    out = tmp_path / "fused.pt"
    run = invoke("fuse", "--map", tmp_path / "m.json", "-o", out, "--keep-wrapper")
    assert run.code == 0, str(run)
    got = torch.load(out, weights_only=True)
    assert set(got) == {"model_state_dict", "epoch", "clafuse"}
    assert list(got["model_state_dict"]) == list(state)
    net = SmallVGG(DEEP, [8], 3)
    net.load_state_dict({k.removeprefix("net."): v for k, v in got["model_state_dict"].items()}, strict=True)


def test_report_reads_a_fused_checkpoint_written_in_the_inputs_form(root: Path, wrapped, tmp_path: Path) -> None:
    assert invoke("fuse", "--map", root / "map.json", "-o", tmp_path / "fused.ckpt", "--keep-wrapper").code == 0
    run = invoke("report", root / "map.json", "--fused", tmp_path / "fused.ckpt", "-o", tmp_path / "r.html", "--json")
    assert run.code == 0, str(run)


def test_finetune_keeps_the_wrapper_too(root: Path, wrapped, tmp_path: Path) -> None:
    out = tmp_path / "tuned.ckpt"
    run = invoke("finetune", root / "deep.ckpt", "--data", root / "x.npz", "--val", root / "x.npz", "-o", out,
                 "--ignore-keys", r"^criterion\.", "--keep-wrapper", "--batch-size", 16, "--json")
    assert run.code == 0, str(run)
    got = torch.load(out, weights_only=True)
    assert list(got["state_dict"]) == list(wrapped["ckpt"]["state_dict"]) and "optimizer_states" not in got


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
def test_lightning_loads_the_fused_checkpoint_back(root: Path, wrapped, tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")

    class Lit(pl.LightningModule):
        def __init__(self, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = SmallVGG(DEEP, [8], 7)
            self.criterion = nn.CrossEntropyLoss(weight=torch.ones(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch, index):
            x, y = batch
            return self.criterion(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    data = np.load(root / "x.npz")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(data["x"]),
                                                                        torch.from_numpy(data["y"])), batch_size=16)
    ckpt_path = tmp_path / "lit.ckpt"
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(Lit(), loader)
    trainer.save_checkpoint(ckpt_path)
    assert "optimizer_states" in torch.load(ckpt_path, weights_only=True)
    partner = tmp_path / "partner.safetensors"
    save_file(_state(SHALLOW, 1), str(partner))
    assert invoke("align", ckpt_path, partner, "-o", tmp_path / "m.json", "--data", root / "x.npz", "--samples", 32,
                  "--ignore-keys", r"^criterion\.").code == 0
    out = tmp_path / "fused.ckpt"
    run = invoke("fuse", "--map", tmp_path / "m.json", "-o", out, "--keep-wrapper")
    assert run.code == 0, str(run)
    back = Lit.load_from_checkpoint(out)
    assert back.hparams.lr == 0.1
    fused = torch.load(out, weights_only=True)["state_dict"]
    for key, value in back.state_dict().items():
        assert torch.equal(value, fused[key])
    assert not torch.equal(fused["model.features.0.weight"], torch.load(ckpt_path)["state_dict"]["model.features.0.weight"])


def test_the_api_takes_the_same_key_handling(root: Path, wrapped) -> None:
    model = api.load_model(root / "deep.ckpt", keys=KeyMap(ignore=[r"^criterion\."]))
    assert model.keys.strip_prefix == "model." and model.ignored == ["criterion.weight"]
    assert set(model.state_dict) == set(load_checkpoint(root / "plain.safetensors"))
