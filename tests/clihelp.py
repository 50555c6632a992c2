"""Run the CLI in-process (fast) or in a subprocess (end to end, as users run it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_inproc(args: list[str], capsys) -> tuple[int, str, str]:
    from wina_cli.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def run_sub(args: list[str], timeout: int = 600, extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "wina_cli", *[str(a) for a in args]], capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT), env=env, **kw)


def as_json(text: str):
    return json.loads(text)
