"""Packaging checks: the CLI module stays light and ``python -m clafuse`` works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("inspect", "align", "fuse", "finetune", "eval")


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_import_does_not_load_torch_or_pot():
    code = "import clafuse.cli, sys, json; print(json.dumps({m: m in sys.modules for m in ('torch', 'ot')}))"
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"torch": False, "ot": False}


def test_fuse_api_import_does_not_load_scipy_optimizers():
    """``fuse`` imports the search and head-refit modules on every run; SciPy's optimizers (the
    head fit's solver) must load only when a head is refit, as a fusion of equal widths never
    needs them (transport.py loads only SciPy's assignment solver)."""
    code = "import clafuse.api.fusing, sys; print('scipy.optimize' in sys.modules)"
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_module_help_lists_commands():
    proc = _run(["-m", "clafuse", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "Commands" in proc.stdout, proc.stdout
    # First word of each line after the "Commands" heading (plain or rich-boxed help).
    section = proc.stdout.split("Commands", 1)[1].splitlines()[1:]
    listed = {line.strip(" \u2502|").split()[0] for line in section if line.strip(" \u2502|")}
    missing = [c for c in COMMANDS if c not in listed]
    assert not missing, f"missing from 'clafuse --help': {missing}\n{proc.stdout}"
