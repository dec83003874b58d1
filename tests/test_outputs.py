"""Every file a command writes follows one rule (clafuse.io.outputs.plan_outputs), through the CLI:
never an input (also through links or an input index's shards), never another output of the run,
never a folder, device or FIFO; checked before any work. Outputs appear together and atomically,
a failed run leaves the previous files as they were, and non-finite weights are never written
without --allow-nonfinite. Also the messages: one line for usage errors, warnings once and brief,
control characters escaped.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

from clafuse import api
from clafuse.errors import printable
from clafuse.io.checkpoint import load_checkpoint, save_checkpoint
from tests.cli_runner import assert_refused, invoke
from tests.helpers import mlp, save_mlp, save_safetensors

pytestmark = pytest.mark.usefixtures("module_cache")

FINETUNE = ["--data", "digits", "--epochs", "1", "--batch-size", "256", "--lr", "0.05"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Name -> digest of every regular file in ``folder`` (links followed)."""
    return {p.name: digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def no_temps(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    save_mlp(root / "a.safetensors", 0, [16, 12])
    save_mlp(root / "b.safetensors", 1, 16)
    api.align([root / "a.safetensors", root / "b.safetensors"], root / "map.json", metric="neuron")
    (root / "spec.json").write_text(json.dumps(api.inspect_checkpoint(root / "b.safetensors")["spec"]))
    return root


# --- an output that is an input ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["align_over_input", "fuse_over_input", "fuse_over_map", "fuse_symlink",
                                  "fuse_hardlink", "finetune_over_input", "finetune_metrics_over_input",
                                  "finetune_plot_over_input", "finetune_over_arch", "report_over_map",
                                  "report_over_checkpoint"])
def test_an_output_never_replaces_an_input(ws: Path, tmp_path: Path, case: str) -> None:
    """Each once replaced its input (a .pt input truncated by --metrics-out, a map by fuse, ...)."""
    for name in ("a.safetensors", "b.safetensors", "map.json", "spec.json"):
        (tmp_path / name).write_bytes((ws / name).read_bytes())
    (tmp_path / "map.pt").write_bytes((ws / "map.json").read_bytes())  # a map named like a checkpoint
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "a.safetensors")
    os.link(tmp_path / "b.safetensors", tmp_path / "hard.safetensors")
    a, b, m = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "map.json"
    args = {
        "align_over_input": ["align", a, b, "-o", b, "--metric", "neuron"],
        "fuse_over_input": ["fuse", "--map", m, "-o", a],
        "fuse_over_map": ["fuse", "--map", tmp_path / "map.pt", "-o", tmp_path / "map.pt"],
        "fuse_symlink": ["fuse", "--map", m, "-o", tmp_path / "link.safetensors"],
        "fuse_hardlink": ["fuse", "--map", m, "-o", tmp_path / "hard.safetensors"],
        "finetune_over_input": ["finetune", b, *FINETUNE, "-o", b],
        "finetune_metrics_over_input": ["finetune", b, *FINETUNE, "-o", tmp_path / "ft.safetensors",
                                        "--metrics-out", a, "--teacher", a],
        "finetune_plot_over_input": ["finetune", b, *FINETUNE, "-o", tmp_path / "ft.safetensors", "--plot", b],
        "finetune_over_arch": ["finetune", b, *FINETUNE, "--arch", tmp_path / "spec.json", "-o",
                               tmp_path / "ft.safetensors", "--metrics-out", tmp_path / "spec.json"],
        "report_over_map": ["report", m, "-o", m],
        # a fused checkpoint named like a figure, in the PNG folder
        "report_over_checkpoint": ["report", m, "-o", tmp_path / "r.html", "--png-dir", tmp_path,
                                   "--fused", tmp_path / "x.png"],
    }[case]
    if case == "report_over_checkpoint":
        (tmp_path / "x.png").write_bytes(a.read_bytes())
    before = snapshot(tmp_path)
    res = invoke(*args)
    assert_refused(res, "input", "choose another output name")
    assert snapshot(tmp_path) == before and no_temps(tmp_path)


def test_shards_of_an_input_index_are_inputs(ws: Path, tmp_path: Path) -> None:
    """A plain output beside a sharded input of the same name would remove the input's index and shards."""
    save_checkpoint(tmp_path / "a.safetensors", load_checkpoint(ws / "a.safetensors"), max_shard_size=1500)
    index = tmp_path / "a.safetensors.index.json"
    assert index.is_file() and not (tmp_path / "a.safetensors").exists()
    save_mlp(tmp_path / "b.safetensors", 1, 16)
    api.align([index, tmp_path / "b.safetensors"], tmp_path / "map.json", metric="neuron")
    before = snapshot(tmp_path)
    res = invoke("fuse", "--map", tmp_path / "map.json", "-o", tmp_path / "a.safetensors")
    assert_refused(res, "would overwrite the input")
    assert snapshot(tmp_path) == before


# --- outputs of the same run -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["plot_is_out", "metrics_is_out", "metrics_is_state", "plot_is_metrics",
                                  "report_html_in_png_dir"])
def test_two_outputs_never_share_a_file(ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        case: str) -> None:
    """``--plot P -o P`` once left a PNG where the checkpoint should be; refused before training."""
    import clafuse.training as training

    monkeypatch.setattr(training, "finetune", lambda *a, **k: pytest.fail("trained before checking the outputs"))
    out = tmp_path / "ft.safetensors"
    args = {
        "plot_is_out": ["--plot", out],
        "metrics_is_out": ["--metrics-out", out],
        "metrics_is_state": ["--metrics-out", api.train_state_path(out)],
        "plot_is_metrics": ["--metrics-out", tmp_path / "m", "--plot", tmp_path / "m"],
    }.get(case)
    if args is None:
        (tmp_path / "figs").mkdir()
        res = invoke("report", ws / "map.json", "-o", tmp_path / "figs" / "costs.png", "--png-dir", tmp_path / "figs")
    else:
        res = invoke("finetune", ws / "b.safetensors", *FINETUNE, "-o", out, *args)
    assert_refused(res, "name the same file")
    assert sorted(p.name for p in tmp_path.rglob("*")) in ([], ["figs"])


# --- outputs that are not regular files ----------------------------------------------------------


def _special(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "special.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers, in a scratch folder
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
@pytest.mark.parametrize("command", ["fuse", "align", "finetune", "metrics"])
def test_a_device_fifo_or_folder_is_never_replaced(ws: Path, tmp_path: Path, kind: str, command: str) -> None:
    """As root, ``-o /dev/null`` once replaced the device node with a regular file."""
    path = _special(tmp_path, kind)
    mode = os.stat(path).st_mode
    args = {
        "fuse": ["fuse", "--map", ws / "map.json", "-o", path],
        "align": ["align", ws / "a.safetensors", ws / "b.safetensors", "--metric", "neuron", "-o", path],
        "finetune": ["finetune", ws / "b.safetensors", *FINETUNE, "-o", path],
        "metrics": ["finetune", ws / "b.safetensors", *FINETUNE, "-o", tmp_path / "ft.safetensors",
                    "--metrics-out", path],
    }[command]
    res = invoke(*args)
    assert_refused(res, "regular file" if kind != "folder" else "directory")
    assert os.stat(path, follow_symlinks=False).st_mode == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["special.safetensors"]


def test_atomic_writes_refuse_devices_from_python_too(tmp_path: Path) -> None:
    from clafuse.errors import ClafuseError
    from clafuse.io.atomic import write_text_atomic

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ClafuseError, match="not a regular file"):
        write_text_atomic(fifo, "x")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


# --- checked before any work -------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["ext", "folder", "metrics_folder", "plot_folder"])
def test_finetune_checks_every_output_before_training(ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      bad: str) -> None:
    import clafuse.training as training

    monkeypatch.setattr(training, "finetune", lambda *a, **k: pytest.fail("trained before checking the outputs"))
    out = tmp_path / "ft.safetensors"
    args = {"ext": ["-o", tmp_path / "ft.txt"], "folder": ["-o", tmp_path / "nowhere" / "ft.safetensors"],
            "metrics_folder": ["-o", out, "--metrics-out", tmp_path / "nowhere" / "m.jsonl"],
            "plot_folder": ["-o", out, "--plot", tmp_path / "nowhere" / "p.png"]}[bad]
    res = invoke("finetune", ws / "b.safetensors", *FINETUNE, *args)
    assert_refused(res, "extension" if bad == "ext" else "does not exist")
    assert list(tmp_path.iterdir()) == []


# --- a failed run leaves the previous files ----------------------------------------------------


def test_a_failed_finetune_keeps_the_previous_metrics_and_leaves_nothing_of_its_own(
        ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The metrics file was truncated when the run started; a run failing after training left its
    checkpoint and OUT.state.pt behind. Here writing the plot fails (as on a full disk)."""
    import clafuse.plots as plots

    out, metrics, plot = tmp_path / "ft.safetensors", tmp_path / "m.jsonl", tmp_path / "p.png"
    metrics.write_text("previous run\n")
    out.write_bytes(b"previous checkpoint")

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", str(plot))

    monkeypatch.setattr(plots, "plot_history", full_disk)
    res = invoke("finetune", ws / "b.safetensors", *FINETUNE, "-o", out, "--metrics-out", metrics, "--plot", plot)
    assert_refused(res, "No space left on device")
    assert metrics.read_text() == "previous run\n" and out.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.safetensors", "m.jsonl"]


def test_a_diverging_finetune_keeps_the_previous_metrics(ws: Path, tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("previous run\n")
    res = invoke("finetune", ws / "b.safetensors", "--data", "digits", "--lr", "1e30", "-o",
                 tmp_path / "ft.safetensors", "--metrics-out", metrics)
    assert_refused(res, "diverged")
    assert metrics.read_text() == "previous run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


def test_metrics_plot_and_checkpoint_appear_together(ws: Path, tmp_path: Path) -> None:
    out, metrics, plot = tmp_path / "ft.safetensors", tmp_path / "m.jsonl", tmp_path / "p.png"
    metrics.write_text("previous run\n")
    res = invoke("finetune", ws / "b.safetensors", *FINETUNE, "-o", out, "--metrics-out", metrics, "--plot", plot,
                 "--json")
    assert res.code == 0, str(res)
    history = json.loads(res.stdout)["history"]
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.safetensors", "m.jsonl", "p.png"]


# --- plain and sharded outputs replace each other -------------------------------------------------


def test_plain_and_sharded_outputs_replace_each_other(ws: Path, tmp_path: Path) -> None:
    """A sharded output written where a plain one was left the stale plain file beside the new index."""
    out = tmp_path / "fused.safetensors"

    def fuse(*extra: object) -> list[str]:
        res = invoke("fuse", "--map", ws / "map.json", "-o", out, *extra)
        assert res.code == 0, str(res)
        return sorted(p.name for p in tmp_path.iterdir())

    assert fuse() == ["fused.safetensors"]
    plain = load_checkpoint(out)
    three = fuse("--max-shard-size", "1100")
    assert "fused.safetensors" not in three and "fused.safetensors.index.json" in three and len(three) > 3
    sharded = load_checkpoint(tmp_path / "fused.safetensors.index.json")
    assert all(torch.equal(plain[k], sharded[k]) for k in plain)
    fewer = fuse("--max-shard-size", "3000")
    assert "fused.safetensors.index.json" in fewer and len(fewer) < len(three)
    count = len(fewer) - 1
    assert all(name.endswith(f"-of-{count:05d}.safetensors") for name in fewer if name != "fused.safetensors.index.json")
    assert fuse() == ["fused.safetensors"]
    assert all(torch.equal(plain[k], v) for k, v in load_checkpoint(out).items())


# --- non-finite outputs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def huge(ws: Path) -> Path:
    """A map whose deeper model has first-layer weights near 1e25: Sinkhorn on its costs gives NaN."""
    root = ws / "huge"
    root.mkdir()
    state = {k: v.clone() for k, v in mlp([16, 12], seed=0).state_dict().items()}
    state["1.weight"] *= 1e25
    save_safetensors(root / "big.safetensors", state)
    save_mlp(root / "small.safetensors", 1, 16)
    api.align([root / "big.safetensors", root / "small.safetensors"], root / "map.json", metric="neuron")
    return root


def test_fuse_never_writes_nonfinite_weights_with_exit_0(huge: Path, tmp_path: Path) -> None:
    """Sinkhorn on huge costs once wrote an all-NaN checkpoint with exit code 0."""
    out = tmp_path / "fused.safetensors"
    res = invoke("fuse", "--map", huge / "map.json", "-o", out, "--signal", "weights", "--solver", "sinkhorn",
                 "--reg", "0.001")
    if res.code == 0:  # a solver that copes with these costs must then give finite weights
        assert api.nonfinite_keys(load_checkpoint(out)) == [], str(res)
    else:
        assert res.stderr.splitlines()[-1].startswith("clafuse: error: the fused weights hold NaN or Inf"), str(res)
        assert "--allow-nonfinite" in res.stderr and list(tmp_path.iterdir()) == []


@pytest.fixture
def nan_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fusion engine returns NaN in one tensor of the target's state."""
    from clafuse.api import fusing

    def poisoned(engine):
        def run(*args, **kwargs):
            result = engine(*args, **kwargs)
            key = next(iter(result.state_dict))
            result.state_dict[key] = torch.full_like(result.state_dict[key], float("nan"))
            return result
        return run

    monkeypatch.setattr(fusing, "ENGINES", {name: poisoned(e) for name, e in fusing.ENGINES.items()})


def test_nonfinite_fused_weights_need_allow_nonfinite(ws: Path, tmp_path: Path, nan_engine: None) -> None:
    out = tmp_path / "fused.safetensors"
    res = invoke("fuse", "--map", ws / "map.json", "-o", out)
    assert res.code == 2 and res.stderr.splitlines()[-1].startswith("clafuse: error: the fused weights hold NaN")
    assert list(tmp_path.iterdir()) == []
    res = invoke("fuse", "--map", ws / "map.json", "-o", out, "--allow-nonfinite")
    assert res.code == 0, str(res)
    assert len(api.nonfinite_keys(load_checkpoint(out))) == 1


def test_finetune_refuses_a_nonfinite_checkpoint(ws: Path, tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in load_checkpoint(ws / "b.safetensors").items()}
    state["1.bias"][0] = float("inf")
    save_safetensors(tmp_path / "inf.safetensors", state)
    res = invoke("finetune", tmp_path / "inf.safetensors", *FINETUNE, "-o", tmp_path / "ft.safetensors")
    assert_refused(res, "NaN or Inf", "1.bias", "--allow-nonfinite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inf.safetensors"]


# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["fuse", "finetune", "align"])
def test_a_250_character_output_name_is_accepted(ws: Path, tmp_path: Path, command: str) -> None:
    """The temp name (".NAME.tmp-XXXXXXXX") and OUT.state.pt once passed the 255-byte limit."""
    name = "n" * (250 - len(".safetensors")) + ".safetensors"
    out = tmp_path / name
    args = {"fuse": ["fuse", "--map", ws / "map.json", "-o", out],
            "finetune": ["finetune", ws / "b.safetensors", *FINETUNE, "-o", out],
            "align": ["align", ws / "a.safetensors", ws / "b.safetensors", "--metric", "neuron", "-o", out]}[command]
    res = invoke(*args)
    assert res.code == 0, str(res)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_names_longer_than_the_file_system_allows_are_one_line(ws: Path, tmp_path: Path) -> None:
    res = invoke("fuse", "--map", ws / "map.json", "-o", tmp_path / ("n" * 300 + ".safetensors"))
    assert_refused(res, "longer than 255 bytes")


def test_control_characters_in_names_are_escaped(ws: Path, tmp_path: Path) -> None:
    evil = tmp_path / "\x1b[31mred\x07\u202e.safetensors"
    for args in (["inspect", evil], ["fuse", "--map", ws / "map.json", "-o", tmp_path / "\x1b]0;x\x07" / "o.pt"],
                 ["align", evil, ws / "b.safetensors", "-o", tmp_path / "m.json"]):
        res = invoke(*args)
        assert res.code == 2, str(res)
        assert "\x1b" not in res.stderr and "\x07" not in res.stderr and "\u202e" not in res.stderr, str(res)
        assert "\\x1b" in res.stderr, str(res)


def test_printable() -> None:
    assert printable("a\nb\t c") == "a b c"
    assert printable("\x1b[1m\x00\x7f\x9b") == "\\x1b[1m\\x00\\x7f\\x9b"
    assert printable("\u202eabc\u200b") == "\\u202eabc\\u200b"
    assert printable(os.fsdecode(b"caf\xe9.pt")) == "caf\\xe9.pt"
    assert printable("café ✓") == "café ✓"


# --- messages -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expect", [
    (["align"], "Missing argument"),
    (["align", "a.safetensors"], "Missing option '-o'"),
    (["fuse", "--bogus"], "No such option: --bogus"),
    (["finetune", "x.safetensors", "--data", "digits", "-o", "y.safetensors", "--epochs", "abc"], "--epochs"),
    (["nocommand"], "No such command"),
    (["eval", "x.pt", "--data"], "requires an argument"),
])
def test_usage_errors_are_one_line(args: list[str], expect: str) -> None:
    res = invoke(*args)
    assert_refused(res, expect)
    assert "Usage:" not in res.stdout + res.stderr


def test_no_arguments_still_shows_the_help() -> None:
    res = invoke()
    assert res.code == 2 and "Usage: clafuse" in res.stdout + res.stderr


def test_warnings_are_reported_once_and_briefly(ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python and torch warnings reached stderr with their source lines, repeated."""
    from clafuse.api import alignment

    real = alignment.solve_alignment

    def chatty(*args, **kwargs):
        for _ in range(3):
            warnings.warn("something odd\n  in two lines", UserWarning)
        warnings.warn("an old API", DeprecationWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(alignment, "solve_alignment", chatty)
    res = invoke("align", ws / "a.safetensors", ws / "b.safetensors", "--metric", "neuron", "-o", tmp_path / "m.json")
    assert res.code == 0, str(res)
    assert res.stderr.splitlines() == ["clafuse: warning: something odd in two lines"], str(res)


def test_a_bad_resume_state_is_a_short_message(ws: Path, tmp_path: Path) -> None:
    """torch's refusal is ~1,000 characters with terminal colours and advice to load unsafely."""
    out = tmp_path / "ft.safetensors"
    torch.save({"version": 1, "evil": print}, api.train_state_path(out))
    res = invoke("finetune", ws / "b.safetensors", *FINETUNE, "-o", out, "--resume")
    assert_refused(res, "not a training state written by clafuse")
    assert len(res.stderr) < 300 and "\x1b" not in res.stderr and "weights_only" not in res.stderr
