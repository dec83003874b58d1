"""Small hostile data files under a memory cap (``ulimit -v`` of 3 GiB, in a child process; see
:func:`tests.helpers.run_capped`): each would make clafuse allocate gigabytes, and each must end in
one ``clafuse: error:`` line and exit code 2, never a MemoryError (internal error), a kill or a
traceback. The checkpoint side of the same check is in test_memory_limit.py.

The files declare their sizes truthfully except the lying ``.npz``: the compressed bombs are valid
files that decode to gigabytes of zeros, and the image folder holds valid PNGs.
"""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import MEMORY_LIMIT, deflated_zeros, gzip_zeros, npy_header, run_capped, save_mlp, write_zip


def _hostile_data(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (clafuse arguments, what the one-line refusal must say)."""
    model = str(save_mlp(root / "a.safetensors", 0, [16, 12]))
    cases = {}

    head = npy_header((1 << 38, 64))  # 64 TiB of float32 declared, 256 bytes held
    stream, crc = deflated_zeros(head, 256)
    lying = write_zip(root / "lying.npz", {"x.npy": (stream, crc, len(head) + 256)})
    cases["lying-npz"] = (["align", model, model, "--data", str(lying), "-o", str(root / "lying.json")],
                          "lying.npz: 'x': its header declares shape (274877906944, 64)")

    size = 5 << 29  # 2.5 GiB of zeros in 2.6 MB: under the 4 GiB data limit, over what the cap leaves
    assert size > MEMORY_LIMIT - (1 << 30)
    head = npy_header((size // 256, 64))
    stream, crc = deflated_zeros(head, size)
    bomb = write_zip(root / "bomb.npz", {"x.npy": (stream, crc, len(head) + size)})
    assert bomb.stat().st_size < 4 << 20
    cases["npz-bomb"] = (["align", model, model, "--data", str(bomb), "-o", str(root / "bomb.json")],
                         "bomb.npz: not enough memory to load this data")

    idx = root / "idx"  # 1.25 GiB of 8x8 uint8 images (5 GiB as float32) in 1.3 MB of gzip
    idx.mkdir()
    n = 5 << 22
    gzip_zeros(idx / "t10k-images-idx3-ubyte.gz", struct.pack(">BBBB3I", 0, 0, 8, 3, n, 8, 8), n * 64)
    gzip_zeros(idx / "t10k-labels-idx1-ubyte.gz", struct.pack(">BBBBI", 0, 0, 8, 1, n), n)
    cases["idx-bomb"] = (["eval", model, "--data", f"{idx}:test"],
                         "t10k-images-idx3-ubyte.gz (shape (20971520, 8, 8)) would take 5.0 GiB")

    first = root / "imgs" / "a" / "00.png"  # 48 black 5000x5000 PNGs of 20 KB: 4.5 GiB decoded
    first.parent.mkdir(parents=True)
    Image.new("L", (5000, 5000)).save(first)
    (root / "imgs" / "b").mkdir()
    for i in range(1, 48):
        shutil.copyfile(first, root / "imgs" / "ab"[i % 2] / f"{i:02d}.png")
    cases["png-bomb"] = (["eval", model, "--data", str(root / "imgs")],
                         "48 images of 5000x5000 would take 4.5 GiB in memory, more than the limit of 4.0 GiB")
    return cases


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is enforced as needed only on Linux")
def test_hostile_data_is_refused_in_one_line_under_a_memory_cap(tmp_path: Path) -> None:
    cases = _hostile_data(tmp_path)
    outcomes = run_capped([args for args, _ in cases.values()], env={"CLAFUSE_CACHE": str(tmp_path / "cache")})
    for (name, (_, needle)), outcome in zip(cases.items(), outcomes):
        lines = outcome["stderr"].splitlines()
        assert outcome["code"] == 2 and len(lines) == 1, (name, outcome)
        assert lines[0].startswith("clafuse: error: ") and needle in lines[0], (name, outcome)
    assert not list(tmp_path.glob("*.json"))
