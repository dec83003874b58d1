"""Property tests of calibration and evaluation data: whatever arrays an ``.npz`` holds (any shape,
dtype and values, with or without labels), ``align``, ``fuse`` and ``eval`` on a tiny MLP pair end
either in success or in exit code 2 with one ``clafuse: error:`` line, never a traceback, an
internal error or a warning from Python.

Derandomized with no example database, as tests/test_fuzz.py; ``CLAFUSE_FUZZ_SCALE`` multiplies
the number of examples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.cli_runner import Outcome, invoke
from tests.helpers import save_mlp

SCALE = float(os.environ.get("CLAFUSE_FUZZ_SCALE", "1"))
FEATURES = 6


def fuzz(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def assert_clean(res: Outcome, out: Path | None = None) -> None:
    """Exit 0 with nothing on stderr (and the output written), or exit 2 with one error line (and none)."""
    assert "Traceback" not in res.stdout + res.stderr, str(res)
    if res.code == 0:
        assert res.stderr == "", str(res)
        if out is not None:
            assert out.is_file(), str(res)
        return
    assert res.code == 2, str(res)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clafuse: error: "), str(res)
    if out is not None:
        assert not out.exists(), str(res)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A deep and a shallow MLP on FEATURES inputs and 3 classes, and a map of them on good data."""
    root = tmp_path_factory.mktemp("fuzzdata")
    deep = save_mlp(root / "deep.safetensors", 0, [5, 4], inputs=FEATURES, classes=3)
    shallow = save_mlp(root / "shallow.safetensors", 1, 5, inputs=FEATURES, classes=3)
    good = root / "good.npz"
    np.savez(good, x=np.random.default_rng(0).normal(size=(30, FEATURES)), y=np.arange(30) % 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAFUSE_CACHE", str(root / "cache"))
        res = invoke("align", deep, shallow, "--data", good, "--samples", 10, "-o", root / "map.json")
    assert res.code == 0, str(res)
    return {"root": root, "deep": deep, "shallow": shallow, "map": root / "map.json"}


_DTYPES = st.one_of(
    hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.boolean_dtypes(),
    hnp.complex_number_dtypes(), hnp.byte_string_dtypes(max_len=3), hnp.unicode_string_dtypes(max_len=3),
    hnp.datetime64_dtypes(),
)
# Mostly the right number of features, sometimes a wrong one, another rank or no samples.
_SHAPES = st.one_of(
    st.tuples(st.integers(0, 12), st.just(FEATURES)),
    st.tuples(st.integers(0, 12), st.sampled_from([2, 3])).map(lambda s: (s[0], s[1], FEATURES // s[1])),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7),
)
_LABEL_DTYPES = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                          hnp.boolean_dtypes(), hnp.unicode_string_dtypes(max_len=2))


@st.composite
def datasets(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """``x`` of any dtype and shape, values anywhere (NaN, infinities, extremes included), and
    optional labels: usually small valid classes, sometimes anything."""
    x = draw(hnp.arrays(draw(_DTYPES), draw(_SHAPES)))
    arrays = {"x": x}
    n = x.shape[0] if x.ndim else 0
    choice = draw(st.sampled_from(["none", "valid", "valid", "any"]))
    if choice == "valid":
        arrays["y"] = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 2)))
    elif choice == "any":
        shape = draw(st.sampled_from([(n,), (n, 1), (max(n - 1, 0),)]))
        arrays["y"] = draw(hnp.arrays(draw(_LABEL_DTYPES), shape))
    return arrays


@fuzz(60)
@given(arrays=datasets(), samples=st.integers(2, 6))
@example(arrays={"x": np.zeros((8, FEATURES)), "y": np.zeros(8, np.int64)}, samples=4)
@example(arrays={"x": np.zeros(FEATURES)}, samples=2)
@example(arrays={"x": np.full((8, FEATURES), 3e38, np.float32) * np.sign(np.arange(-24, 24)).reshape(8, 6)},
         samples=8)
@example(arrays={"x": np.ones((8, FEATURES)), "y": np.full(8, 2**64 - 1, np.uint64)}, samples=2)
@example(arrays={"x": np.ones((8, FEATURES)), "y": np.full(8, 1e30)}, samples=2)
def test_any_calibration_arrays(world: dict[str, Path], arrays: dict[str, np.ndarray], samples: int,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAFUSE_CACHE", str(world["root"] / "cache"))
    root = world["root"]
    data = root / "fuzz.npz"
    np.savez(data, **arrays)
    out_map, out_fused = root / "fuzz-map.json", root / "fuzz-fused.safetensors"
    for out in (out_map, out_fused):
        out.unlink(missing_ok=True)
    assert_clean(invoke("align", world["deep"], world["shallow"], "--data", data, "--samples", samples,
                        "-o", out_map), out_map)
    assert_clean(invoke("fuse", "--map", world["map"], "--data", data, "--samples", samples, "-o", out_fused),
                 out_fused)
    assert_clean(invoke("eval", world["deep"], world["shallow"], "--data", data))
