"""Interrupting ``fuse``, ``finetune`` or ``align`` never leaves a truncated output under the requested name.

Every command writes through :func:`clafuse.io.atomic.atomic_output`: a temp file beside the
target, named ``.NAME.tmp-XXXXXXXX`` (8 hex digits), fsynced, then renamed over ``NAME``. So:

- SIGTERM or Ctrl-C (SIGINT) ends a run with exit code 130, the one line ``clafuse: interrupted``,
  no output and no temp file; an existing output is left as it was.
- SIGKILL cannot be handled: the requested name holds either nothing (or its previous content) or a
  complete file, identical to an uninterrupted run's. A temp file being written at that moment
  stays behind; it is hidden and named as above, and a later run is not disturbed by it.

The commands run as real subprocesses. ``fuse`` works on ~30 MB checkpoints, so that its output
takes a moment to write and can be caught mid-write: the test polls for the temp file, freezes the
process with SIGSTOP, checks that the rename has not happened yet, then signals it. ``finetune`` and
``align`` write small files, so they run under a wrapper that pauses just before the output's
rename (the last moment at which an interruption can matter).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from clafuse import api
from clafuse.io.checkpoint import load_checkpoint, read_metadata
from clafuse.training import load_train_state
from tests.helpers import without_progress

REPO = Path(__file__).resolve().parents[1]
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-[0-9a-f]{8}$")
WIDE_INPUTS = 60_000  # the first layer holds 128 x 60k floats: ~31 MB per checkpoint
TIMEOUT = 240

# Runs the CLI, but pauses for a minute just before the rename that puts PAUSE_TARGET in place,
# after writing the name of the finished temp file to PAUSE_MARKER.
PAUSING_MAIN = """
import os, sys, time
from pathlib import Path

real_replace = os.replace

def paused_replace(src, dst, *args, **kwargs):
    if Path(dst).name == os.environ["PAUSE_TARGET"]:
        Path(os.environ["PAUSE_MARKER"]).write_text(str(src))
        time.sleep(60)
    return real_replace(src, dst, *args, **kwargs)

os.replace = paused_replace
from clafuse.cli import main
main(sys.argv[1:])
"""


def _default_sigint() -> None:
    """Children of a non-interactive shell inherit an ignored SIGINT, under which Python installs
    no KeyboardInterrupt handler; a terminal's Ctrl-C reaches clafuse with the default one."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.returncode}\nstdout: {self.stdout[-1500:]}\nstderr: {self.stderr[-1500:]}"


_RUNNING: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_stray_processes() -> Iterator[None]:
    """Kill any subprocess a failed test left running."""
    yield
    while _RUNNING:
        proc = _RUNNING.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


class Clafuse:
    """One ``clafuse`` subprocess."""

    def __init__(self, args: list[object], cwd: Path, env: dict[str, str], pause_before: Path | None = None) -> None:
        argv = [str(a) for a in args]
        env = dict(env)
        if pause_before is not None:
            self.marker: Path | None = pause_before.parent / f"paused-{pause_before.name}"
            self.marker.unlink(missing_ok=True)
            env.update(PAUSE_TARGET=pause_before.name, PAUSE_MARKER=str(self.marker))
            cmd = [sys.executable, "-c", PAUSING_MAIN, *argv]
        else:
            self.marker = None
            cmd = [sys.executable, "-m", "clafuse", *argv]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=_default_sigint)
        _RUNNING.append(self.proc)

    def wait_until(self, condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        """Poll ``condition`` every millisecond or so; False if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return condition()
            time.sleep(0.001)
        raise AssertionError(f"timed out after {timeout} s")

    def paused(self) -> bool:
        """Wait until the wrapper pauses before the rename; False if the run ended without pausing."""
        assert self.marker is not None
        return self.wait_until(self.marker.exists)

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.proc.send_signal(signal.SIGCONT)

    def finish(self) -> Finished:
        stdout, stderr = self.proc.communicate(timeout=TIMEOUT)
        return Finished(self.proc.returncode, stdout, stderr)


def temps(out: Path) -> list[Path]:
    """Temp files of ``out`` in its folder."""
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def fingerprint(path: Path) -> str:
    """A digest of a checkpoint's tensors (names, dtypes, shapes, values) and metadata, which does not
    depend on the order a writer puts them in."""
    h = hashlib.sha256(json.dumps(sorted(read_metadata(path).items())).encode())
    for key, value in sorted(load_checkpoint(path).items()):
        h.update(f"{key} {value.dtype} {tuple(value.shape)}".encode())
        h.update(value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


def strays(folder: Path, before: set[str], out: Path) -> list[Path]:
    """Files that appeared in ``folder`` since ``before`` was listed, other than ``out`` itself."""
    return sorted(p for p in folder.iterdir() if p.name not in before and p != out)


def assert_interrupted(done: Finished, out: Path, before: bytes | None = None) -> None:
    """SIGTERM/SIGINT: exit 130, one line, no temp file, and ``out`` as it was (absent or ``before``)."""
    assert done.returncode == 130, str(done)
    assert without_progress(done.stderr) == "clafuse: interrupted\n", str(done)
    assert "Traceback" not in done.stdout + done.stderr
    assert temps(out) == [], str(done)
    if before is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == before


def assert_killed_cleanly(done: Finished, out: Path, reference: str, listed: set[str],
                          before: bytes | None = None) -> list[Path]:
    """SIGKILL: ``out`` is absent (or still ``before``) or complete and identical to the reference run's;
    all that appeared beside it since ``listed`` are temp files clearly named after it, which are returned."""
    assert done.returncode == -signal.SIGKILL, str(done)
    if out.exists() and (before is None or out.read_bytes() != before):
        assert fingerprint(out) == reference, "a killed run left an output that differs from an uninterrupted run's"
    leftovers = strays(out.parent, listed, out)
    for tmp in leftovers:
        found = TEMP_NAME.match(tmp.name)
        assert found and found["target"] == out.name, f"{tmp.name} left behind, not clearly a temp file of {out.name}"
    return leftovers


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("cache")
    base = {k: v for k, v in os.environ.items() if k not in ("CLAFUSE_DEBUG", "PYTHONPATH")}
    base.update(PYTHONPATH=str(REPO), CLAFUSE_CACHE=str(cache), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                COLUMNS="200", NO_COLOR="1")
    return base


# --- fuse: big enough to be caught mid-write ----------------------------------------------------


@dataclass
class WideFuse:
    root: Path
    args: Callable[[Path], list[object]]
    reference: str  # fingerprint of the uninterrupted run's output
    seconds: float  # how long the uninterrupted run took
    old: bytes  # content of an existing output that an interrupted run must leave alone


def _wide_mlp(widths: list[int], seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    dims = [WIDE_INPUTS, *widths, 10]
    layers = [nn.Linear(i, o) for i, o in zip(dims, dims[1:])]
    return {f"{2 * k}.{name}": p.detach().contiguous() for k, layer in enumerate(layers)
            for name, p in layer.named_parameters()}


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Iterator[WideFuse]:
    root = tmp_path_factory.mktemp("wide")
    save_file(_wide_mlp([128, 64, 64], 0), str(root / "deep.safetensors"))
    save_file(_wide_mlp([128, 64], 1), str(root / "shallow.safetensors"))
    api.align([root / "deep.safetensors", root / "shallow.safetensors"], root / "map.json", metric="neuron")

    def args(out: Path) -> list[object]:
        return ["fuse", "--map", root / "map.json", "-o", out, "--signal", "weights", "--correction", "none"]

    out = root / "reference.safetensors"
    run = Clafuse(args(out), root, env)
    done = run.finish()
    assert done.returncode == 0 and without_progress(done.stderr) == "", str(done)
    assert set(load_checkpoint(out)) == set(load_checkpoint(root / "deep.safetensors"))
    yield WideFuse(root, args, fingerprint(out), time.monotonic() - run.started, b"an older output")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _catch_mid_write(run: Clafuse, out: Path, replaced: int | None) -> bool:
    """Freeze ``run`` once its temp file has data and before the rename onto ``out``; False if the
    write was missed (the run is then left to finish)."""
    def renamed() -> bool:
        return out.exists() and (replaced is None or out.stat().st_ino != replaced)

    def writing() -> bool:
        return any(_size(tmp) > 0 for tmp in temps(out))

    while run.wait_until(writing):
        run.proc.send_signal(signal.SIGSTOP)
        if writing() and not renamed():
            return True
        run.proc.send_signal(signal.SIGCONT)
        if renamed():
            return False
    return False


def _signal_mid_write(wide: WideFuse, env: dict[str, str], sig: int) -> tuple[Finished, Path, set[str]]:
    """Run fuse over an existing output and send ``sig`` while it writes the replacement (up to three tries)."""
    out = wide.root / sig.name / "fused.safetensors"
    out.parent.mkdir()
    for _ in range(3):
        out.write_bytes(wide.old)
        listed = {p.name for p in out.parent.iterdir()}
        run = Clafuse(wide.args(out), wide.root, env)
        caught = _catch_mid_write(run, out, out.stat().st_ino)
        if caught:
            run.send(sig)
        done = run.finish()
        if caught:
            return done, out, listed
        assert done.returncode == 0, str(done)
    pytest.fail("never caught fuse while it was writing its output")


def test_fuse_signalled_mid_write(wide: WideFuse, env: dict[str, str]) -> None:
    """An existing output survives a run that is killed or terminated while writing its replacement;
    SIGKILL leaves the one temp file being written, SIGTERM nothing (SIGINT: see the finetune test)."""
    signals = [signal.SIGKILL, signal.SIGTERM]
    with ThreadPoolExecutor(len(signals)) as pool:
        results = dict(zip(signals, pool.map(lambda sig: _signal_mid_write(wide, env, sig), signals)))
    done, out, listed = results.pop(signal.SIGKILL)
    leftovers = assert_killed_cleanly(done, out, wide.reference, listed, before=wide.old)
    assert out.read_bytes() == wide.old and len(leftovers) == 1
    for done, out, _ in results.values():
        assert_interrupted(done, out, before=wide.old)


def test_fuse_killed_at_any_time(wide: WideFuse, env: dict[str, str]) -> None:
    """SIGKILL at other points of a run (loading, fusing, writing or done, depending on the machine's speed)."""
    outcomes = []
    for i, fraction in enumerate([0.4, 0.85]):
        out = wide.root / f"timed-{i}.safetensors"
        listed = {p.name for p in wide.root.iterdir()}
        run = Clafuse(wide.args(out), wide.root, env)
        time.sleep(fraction * wide.seconds)
        run.proc.kill()
        done = run.finish()
        if done.returncode == 0:  # finished before the kill
            assert fingerprint(out) == wide.reference
            outcomes.append("finished")
            continue
        leftovers = assert_killed_cleanly(done, out, wide.reference, listed)
        outcomes.append("complete" if out.exists() else "partial temp" if leftovers else "nothing")
    assert "nothing" in outcomes or "partial temp" in outcomes, outcomes


# --- finetune and align: paused just before the rename --------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    root = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    for name, hidden in (("a.safetensors", 32), ("b.safetensors", 16)):
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / name))
    return root


FINETUNE = {"data": "digits", "epochs": 1, "batch_size": 128, "lr": 0.05}


def _finetune_args(root: Path, out: Path) -> list[object]:
    return ["finetune", root / "a.safetensors", "--data", FINETUNE["data"], "--epochs", FINETUNE["epochs"],
            "--batch-size", FINETUNE["batch_size"], "--lr", FINETUNE["lr"], "-o", out]


def test_finetune_interrupted_or_killed_before_the_rename(small: Path, env: dict[str, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C keeps the training state for --resume and leaves no output; after SIGKILL only a temp
    file is left, and resuming then writes exactly the weights of an uninterrupted run."""
    interrupted, killed = small / "ft-int.safetensors", small / "ft-kill.safetensors"
    listed = {p.name for p in small.iterdir()}
    runs = {out: Clafuse(_finetune_args(small, out), small, env, pause_before=out) for out in (interrupted, killed)}
    monkeypatch.setenv("CLAFUSE_CACHE", env["CLAFUSE_CACHE"])
    reference = small / "ft-ref.safetensors"
    api.finetune_checkpoint(small / "a.safetensors", reference, **FINETUNE)
    for out, run in runs.items():
        assert run.paused(), str(run.finish())
        assert Path(run.marker.read_text()).parent == small and TEMP_NAME.match(Path(run.marker.read_text()).name)
        run.send(signal.SIGINT if out == interrupted else signal.SIGKILL)
    done = {out: run.finish() for out, run in runs.items()}

    assert_interrupted(done[interrupted], interrupted)
    assert load_train_state(api.train_state_path(interrupted))["epoch"] == FINETUNE["epochs"]

    others = {reference.name, api.train_state_path(interrupted).name, api.train_state_path(killed).name,
              *(run.marker.name for run in runs.values())}
    leftovers = assert_killed_cleanly(done[killed], killed, fingerprint(reference), listed | others)
    assert not killed.exists() and len(leftovers) == 1
    api.finetune_checkpoint(small / "a.safetensors", killed, resume=True, **FINETUNE)
    got, want = load_checkpoint(killed), load_checkpoint(reference)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not api.train_state_path(killed).exists()
    assert temps(killed) == leftovers  # the stale temp file did not disturb the new run


def test_align_signalled_before_the_rename(small: Path, env: dict[str, str]) -> None:
    listed = {p.name for p in small.iterdir()}
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        out = small / f"map-{sig.name}.json"
        runs[sig] = (out, Clafuse(["align", small / "a.safetensors", small / "b.safetensors", "-o", out, "--data",
                                   "digits", "--samples", 50], small, env, pause_before=out))
    for sig, (out, run) in runs.items():
        assert run.paused(), str(run.finish())
        run.send(sig)
    out, run = runs[signal.SIGTERM]
    assert_interrupted(run.finish(), out)
    out, run = runs[signal.SIGKILL]
    assert run.finish().returncode == -signal.SIGKILL and not out.exists()
    markers = {r.marker.name for _, r in runs.values()}
    (leftover,) = strays(small, listed | markers, out)
    assert TEMP_NAME.match(leftover.name)["target"] == out.name
