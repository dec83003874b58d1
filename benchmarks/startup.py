#!/usr/bin/env python3
"""Start-up time of the command line, and a check that it stays light.

Times (wall clock, median of ``--runs`` subprocess runs after one untimed warm-up each):
``python -c pass`` (the interpreter alone, for reference), ``python -c "import clafuse.cli"``,
``clafuse --help``, ``clafuse align --help`` and ``clafuse fuse --help``. Then checks that
importing ``clafuse.cli`` imports neither torch nor POT. Writes ``benchmarks/results/startup.json``
and prints a table; exits 1 if the import check fails.

Run it with ``make bench`` or ``.venv/bin/python benchmarks/startup.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "startup.json"


def clafuse_command() -> list[str]:
    """The installed ``clafuse`` script next to this interpreter, else ``python -m clafuse``."""
    script = Path(sys.executable).parent / "clafuse"
    return [str(script)] if script.is_file() and os.access(script, os.X_OK) else [sys.executable, "-m", "clafuse"]


def time_command(cmd: list[str], runs: int, env: dict[str, str]) -> list[float]:
    subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"startup: {shlex.join(cmd)} exited with {proc.returncode}:\n{proc.stderr}")
    return times


def heavy_imports(env: dict[str, str]) -> dict[str, bool]:
    code = "import clafuse.cli, sys, json; print(json.dumps({m: m in sys.modules for m in ('torch', 'ot')}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"startup: importing clafuse.cli failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (default: 5)")
    parser.add_argument("--out", type=Path, default=RESULT, help=f"result file (default: {RESULT.relative_to(ROOT)})")
    opts = parser.parse_args(argv)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cli = clafuse_command()
    cases = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ('python -c "import clafuse.cli"', [sys.executable, "-c", "import clafuse.cli"]),
        ("clafuse --help", cli + ["--help"]),
        ("clafuse align --help", cli + ["align", "--help"]),
        ("clafuse fuse --help", cli + ["fuse", "--help"]),
    ]
    rows = []
    for label, cmd in cases:
        times = time_command(cmd, opts.runs, env)
        rows.append({"command": label, "argv": cmd, "runs_s": [round(t, 4) for t in times],
                     "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4)})
    imports = heavy_imports(env)

    doc = {
        "benchmark": "startup",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "versions": {name: pkg_version(name) for name in ("clafuse", "torch", "typer", "rich")},
        "clafuse_invoked_as": shlex.join(cli),
        "runs": opts.runs,
        "results": rows,
        "cli_import_loads": imports,
        "ok": not any(imports.values()),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = opts.out.with_name(f".{opts.out.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(opts.out)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"clafuse start-up (median of {opts.runs} runs, {os.cpu_count()} CPUs)")
    table.add_column("command", no_wrap=True)
    table.add_column("median", justify="right")
    table.add_column("min", justify="right")
    for row in rows:
        table.add_row(row["command"], f"{1000 * row['median_s']:.0f} ms", f"{1000 * row['min_s']:.0f} ms")
    console = Console()
    console.print(table)
    for mod, loaded in imports.items():
        console.print(f"import clafuse.cli loads {mod}: {'YES (should not)' if loaded else 'no'}")
    console.print(f"written to {opts.out}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
