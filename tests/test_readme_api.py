"""The README's Python API example runs as written and prints what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_python_api_example_runs(capsys) -> None:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "net.1"
    assert lines[2].startswith("mlp ")
    assert lines[3].startswith("['A', 'B']")
    fused = namespace["fused"]
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in namespace["deep"].parameters())
