"""CI smoke of the fuzzers (fuzz/, ``make fuzz``): every target runs for a few hundred
inputs under atheris, so a target that breaks (or a finding in what it covers)
fails CI; and the runner must report a crash, an error a device logged, and
memory over the bound, or the campaign's "0 crashes" would mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, target: str, *, runs: int = 300, seconds: int = 10,
         env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--runs", str(runs), "--max-time", str(seconds),
         "--targets", target, "--out", str(tmp_path), "--no-nice"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})}, check=False)
    results = json.loads((tmp_path / "results.json").read_text())
    log = (tmp_path / "logs" / f"{target}.log").read_text(errors="replace")
    return proc.returncode, results[target], proc.stdout + log


@pytest.mark.parametrize("target", TARGETS)
def test_target_runs_clean(tmp_path: Path, target: str) -> None:
    rc, res, out = _run(tmp_path, target)
    assert rc == 0 and res["crashes"] == 0, out[-3000:]
    assert res["inputs"] >= 100, out[-3000:]
    assert res["coverage"], "no coverage: pyvirt was not instrumented"


@pytest.mark.parametrize(("mode", "env"), [
    ("crash", {}),
    ("logged", {}),
    ("rss", {"PYVIRT_FUZZ_RSS_MB": "120"}),  # the bad input holds 128 MiB more
])
def test_runner_reports_findings(tmp_path: Path, mode: str, env: dict[str, str]) -> None:
    rc, res, out = _run(tmp_path, "_selftest", env={"PYVIRT_FUZZ_SELFTEST": mode, **env})
    assert rc == 1 and res["crashes"] == 1, out[-3000:]
    (artifact,) = res["artifacts"]
    assert Path(artifact).read_bytes() == b"FUZZ-SELFTEST"
    why = {"crash": "selftest: an undocumented exception", "logged": "pyvirt logged an error",
           "rss": "over the bound"}[mode]
    assert why in out
