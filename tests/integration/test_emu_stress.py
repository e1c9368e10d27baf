"""The software CPU under module unload/reload and fork churn (real Linux guest).

Linux copies module code in through one virtual mapping and runs it from
another, and reuses freed module memory at once; before engine patch 0010 the
CPU kept running stale translated code after that (about one crash every 35 s
of this loop, ~1% of plain boots). This keeps the guest doing it for a while
and checks the kernel stays healthy.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.conftest import pyvirt_cmd, read_until

pytestmark = [pytest.mark.guest, pytest.mark.slow]

SECONDS = 40
LOOP = (
    'd=/lib/modules/$(uname -r); end=$(( $(cut -d. -f1 /proc/uptime) + {secs} )); n=0; '
    'while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do '
    'for m in $(sed "1!G;h;\\$!d" $d/pyvirt.load); do rmmod ${{m%.ko}} 2>/dev/null; done; '
    'while read -r m; do insmod $d/$m 2>/dev/null; done < $d/pyvirt.load; '
    'for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done; cat /proc/*/stat >/dev/null 2>&1; '
    'n=$((n+1)); done; echo STRESS-ROUNDS=$n; lsmod | grep -c virtio; poweroff'
)


def test_module_reload_and_fork_churn() -> None:
    from pyvirt.guest import READY_LINE
    from pyvirt.guest.build import build_default_guest

    build_default_guest()
    p = subprocess.Popen(pyvirt_cmd("run", "--accel", "emu", "--memory", "512M"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    try:
        out = read_until(p.stdout.fileno(), READY_LINE.encode(), 120)
        assert READY_LINE.encode() in out, out[-2000:]
        p.stdin.write(LOOP.format(secs=SECONDS).encode() + b"\n")
        p.stdin.flush()
        t0 = time.monotonic()
        rest, err = p.communicate(timeout=SECONDS + 180)
    finally:
        if p.poll() is None:
            p.kill()
    text = (out + rest).decode(errors="replace")
    assert not re.search(r"BUG:|Oops|Kernel panic|general protection|stack-protector", text), \
        text[-4000:]
    rounds = re.search(r"STRESS-ROUNDS=(\d+)", text)
    assert rounds and int(rounds.group(1)) >= 3, text[-2000:]
    assert p.returncode == 0, err[-1000:]
    assert time.monotonic() - t0 >= SECONDS * 0.5
