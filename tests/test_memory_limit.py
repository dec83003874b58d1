"""Small hostile files must not blow up memory: the CLI runs in a child process whose address
space is capped (``RLIMIT_AS``, as ``ulimit -v`` sets it), so an allocation that a limit check
should have prevented surfaces as a failure here instead of swapping or being killed elsewhere.

The cap, 3 GiB, leaves room for importing torch and running the commands on a tiny model
(measured: ``inspect`` and ``align`` of the two-layer MLP below run under 1 GiB with one thread),
and is far below what the hostile files declare (8 GiB to 16 GiB). One child runs every case
in-process, so torch is imported once.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import run_capped



def _mlp() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"1.weight": torch.randn(16, 64, generator=g), "1.bias": torch.randn(16, generator=g),
            "3.weight": torch.randn(10, 16, generator=g), "3.bias": torch.randn(10, generator=g)}


def _hostile_files(root: Path) -> dict[str, Path]:
    files = {"ok": root / "ok.safetensors"}
    save_file(_mlp(), str(files["ok"]))

    state = _mlp()  # a 16 GiB layer stored in 4 bytes, with matching expanded neighbours
    state["1.weight"] = torch.zeros(1).expand(2**16, 2**16)
    state["1.bias"] = torch.zeros(1).expand(2**16)
    state["3.weight"] = torch.zeros(1).expand(10, 2**16)
    files["expanded"] = root / "expanded.pt"
    torch.save(state, files["expanded"])

    state = _mlp()  # a legacy torch file whose pickle declares an 8 GiB storage for 4660 floats
    state["1.weight"] = torch.randn(4660)
    legacy = root / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    raw = legacy.read_bytes()
    assert raw.count(b"M\x34\x12") == 2  # 4660 as a pickled 2-byte int: the storage's size and the shape
    files["lying-legacy"] = root / "lying-legacy.pt"
    files["lying-legacy"].write_bytes(raw.replace(b"M\x34\x12", b"J" + struct.pack("<i", 2**31 - 1)))

    header = json.dumps({"1.weight": {"dtype": "F32", "shape": [2**16, 2**16], "data_offsets": [0, 2**34]}})
    files["lying-safetensors"] = root / "lying.safetensors"
    files["lying-safetensors"].write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(64))
    files["lying-header-length"] = root / "lying-length.safetensors"
    files["lying-header-length"].write_bytes(struct.pack("<Q", 2**40) + b"{}")
    return files


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is enforced as needed only on Linux")
def test_hostile_files_are_refused_in_one_line_under_a_memory_cap(tmp_path: Path) -> None:
    files = _hostile_files(tmp_path)
    expected = {  # file -> what its one-line refusal says
        "expanded": "'1.weight' is an expanded view of shape [65536, 65536]",
        "lying-legacy": "cannot allocate the memory its tensors declare (8.0 GiB for one storage)",
        "lying-safetensors": "not a valid safetensors file",
        "lying-header-length": "not a",
    }
    cases = [["inspect", str(files["ok"])]]
    for name in expected:
        cases.append(["inspect", str(files[name])])
        cases.append(["align", str(files[name]), str(files["ok"]), "--metric", "neuron", "-o",
                      str(tmp_path / f"{name}.json")])
    outcomes = run_capped(cases)
    assert outcomes[0]["code"] == 0, outcomes[0]  # the cap leaves room for real work
    for args, outcome in zip(cases[1:], outcomes[1:]):
        name = next(n for n in expected if str(files[n]) == args[1])
        lines = outcome["stderr"].splitlines()
        assert outcome["code"] == 2 and len(lines) == 1, outcome
        assert lines[0].startswith("clafuse: error: ") and expected[name] in lines[0], outcome
    assert not list(tmp_path.glob("*.json"))
