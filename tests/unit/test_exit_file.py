"""The exit file (``pyvirt run --exit-file``): one JSON record in one write,
whatever the way pyvirt ends; here the ways that need no guest (set-up errors).
A guest's power-off and a SIGKILL: tests/integration/test_vmm_daemon_side.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pyvirt.vmm.runner import ExitFile


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirt", "run", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_written_once_in_one_piece(tmp_path: Path) -> None:
    path = tmp_path / "exit.json"
    path.write_text("old contents that are longer than what comes" * 10)
    ef = ExitFile.create(path)
    assert path.read_bytes() == b""  # truncated at once: an old record never misleads
    ef.write("crash", "vCPU 0: triple fault\nregisters...", 1, 3)
    ef.write("poweroff", "second", 0, 4)  # ignored: the first way out is the one
    ef.close()
    doc = json.loads(path.read_text())
    assert doc.pop("time") > 0
    assert doc == {"outcome": "crash", "detail": "vCPU 0: triple fault registers...",
                   "exit_status": 1, "boot_count": 3}


def test_a_set_up_error_is_recorded_with_its_field(tmp_path: Path) -> None:
    path = tmp_path / "exit.json"
    r = run("--exit-file", str(path), "--kernel", str(tmp_path / "nope"), "--net", "none",
            "--accel", "emu")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    doc = json.loads(path.read_text())
    assert doc["outcome"] == "error" and doc["exit_status"] == 2 and doc["boot_count"] == 0
    assert doc["detail"] == f"kernel: {tmp_path / 'nope'}: no such file"


def test_a_bad_config_file_is_recorded(tmp_path: Path) -> None:
    path = tmp_path / "exit.json"
    cfg = tmp_path / "vm.json"
    cfg.write_text('{"cpus": 1}')
    r = run("--exit-file", str(path), "--config", str(cfg))
    assert r.returncode == 2
    doc = json.loads(path.read_text())
    assert doc["outcome"] == "error" and doc["exit_status"] == 2
    assert doc["detail"].startswith(f"{cfg}: ") and "kernel" in doc["detail"]
    assert r.stderr.strip().endswith(doc["detail"])


def test_an_exit_file_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    r = run("--exit-file", str(tmp_path / "nodir" / "exit.json"), "--kernel", "/x")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--exit-file " in r.stderr
    assert "nodir" in r.stderr and "Traceback" not in r.stderr
