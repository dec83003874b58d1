"""`fuse --target`: choosing the output architecture (teacher into student and back)."""

import numpy as np
import pytest
import torch

from clafuse import api
from clafuse.errors import ClafuseError
from clafuse.io.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import mlp


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("target")
    student, teacher = mlp([12, 8], inputs=16, classes=5, seed=0), mlp([24, 20, 16, 12], inputs=16, classes=5, seed=1)
    save_checkpoint(root / "student.safetensors", student.state_dict())
    save_checkpoint(root / "teacher.safetensors", teacher.state_dict())
    np.savez(root / "x.npz", x=np.random.default_rng(0).random((200, 16)).astype(np.float32))
    api.align([root / "student.safetensors", root / "teacher.safetensors"], root / "map.json",
              data=str(root / "x.npz"), samples=200)
    return root, student, teacher


def _keys_and_shapes(path) -> dict:
    return {k: tuple(v.shape) for k, v in load_checkpoint(path).items()}


@pytest.mark.parametrize("target, arch", [("shallow", "student"), ("A", "student"), ("deep", "teacher"),
                                          ("B", "teacher")])
def test_target_picks_the_output_architecture(pair, target: str, arch: str) -> None:
    root, student, teacher = pair
    out = root / f"fused-{target}.safetensors"
    report = api.fuse(root / "map.json", out, target=target)
    model = {"student": student, "teacher": teacher}[arch]
    assert _keys_and_shapes(out) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert report["balance"] == ("merge" if arch == "student" else "add")
    model.load_state_dict(load_checkpoint(out), strict=True)


def test_target_and_balance_must_agree(pair) -> None:
    root, _, _ = pair
    with pytest.raises(ClafuseError, match="--target shallow needs --balance merge"):
        api.fuse(root / "map.json", root / "never.safetensors", target="shallow", balance="add")
    assert not (root / "never.safetensors").exists()


def test_teacher_weight_one_into_student_width_differs_from_student(pair) -> None:
    """With all weight on the teacher, the student-shaped result is the teacher compressed, not the student."""
    root, student, _ = pair
    out = root / "compressed.safetensors"
    api.fuse(root / "map.json", out, target="shallow", weights="0,1")
    fused = load_checkpoint(out)
    assert any(not torch.equal(fused[k], v) for k, v in student.state_dict().items())


def test_weights_signal_still_uses_the_maps_calibration_data(pair) -> None:
    """The signal only chooses how neurons are matched; the correction still needs and gets the data."""
    root, _, _ = pair
    report = api.fuse(root / "map.json", root / "w.safetensors", signal="weights", target="deep")
    assert report["signal"] == "weights"
    assert report["calibration_samples"] == 200 and report["correction"] == "regress"
