"""Web GUI benchmark (issue #13): pyvirtd's browser front end in Debian's Chromium.

A daemon (``pyvirt daemon --root DIR --no-networks --web 127.0.0.1:PORT``) and
Chromium driven by Playwright (``executable_path=/usr/bin/chromium``; it never
downloads a browser of its own):

1. first page paint with 200 defined VMs: a logged-in tab opens ``#/vms``; the
   time from navigation start until all 200 rows are in the page (a
   MutationObserver records the moment; first-contentful-paint is reported too);
2. console keystroke -> echo over the WebSocket, minus the guest's own echo
   time: in the page, each ``ws.send`` of a typed key to the first frame back
   (browser -> daemon -> VMM -> guest shell -> back); the guest's own echo
   time is the same keystroke sent straight to the VMM's console socket (no
   daemon, no browser), measured before the page connects (the VMM's console
   takes one client at a time);
3. the daemon's CPU with 5 browser tabs on live VM pages (console open, graphs
   drawing from the metrics stream), over 30 s, against the same daemon with
   no tab open (idle, same VMs running).

All guests: the default guest, 128 MiB, no NIC, on the software CPU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import ROOT, Row

VMS_LISTED = 200
TABS = 5
CPU_SECONDS = 30.0
KEYS = 40
USER, PASSWORD = "bench", "bench-password-1"
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """pyvirtd with its web listener, in a short root of its own."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pvw", dir="/tmp"))
        os.chmod(self.root, 0o711)  # VMMs run as the VM user: it must reach state/vms/UUID
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sock = self.root / "run" / "pyvirtd.sock"
        self._log = open(self.root / "daemon.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvirt", "daemon", "--root", str(self.root),
             "--no-networks", "--web", f"127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not self.sock.exists() or not self._web_up():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start: "
                                   + (self.root / "daemon.log").read_text()[-2000:])
            time.sleep(0.1)
        from pyvirt.client import Client

        self.client = Client(f"unix://{self.sock}", timeout=120)
        self._admin("POST", "/v1/users", {"name": USER, "role": "admin", "password": PASSWORD})

    def _web_up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)),
                          base_url="http://pyvirtd", timeout=60) as h:
            r = h.request(method, path, json=body)
            r.raise_for_status()
            return r.json() if r.content else None

    def session_cookie(self) -> dict[str, Any]:
        import httpx

        r = httpx.post(f"{self.url}/v1/session", json={"user": USER, "password": PASSWORD},
                       timeout=30)
        r.raise_for_status()
        value = r.cookies.get("pyvirt_session")
        if not value:
            raise RuntimeError("login: no pyvirt_session cookie")
        return {"name": "pyvirt_session", "value": value, "url": self.url}

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for d in self.client.list_domains():
                if d["state"] != "shut off":
                    with contextlib.suppress(Exception):
                        self.client.destroy(d["name"])
        with contextlib.suppress(Exception):
            self.client.close()
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        if self.proc.poll() is None:
            self.proc.kill()
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def _browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _definition(name: str) -> dict[str, Any]:
    return {"name": name, "memory": "128M", "nics": [], "accel": "emu"}


# ---- 1. first paint with 200 VMs

ROWS_SEEN = """
(() => {
  const want = %d;
  window.__rowsAt = null;
  const check = () => {
    if (window.__rowsAt === null && document.querySelectorAll('tr[data-vm]').length >= want) {
      window.__rowsAt = performance.now();
    }
  };
  new MutationObserver(check).observe(document, {subtree: true, childList: true});
})();
"""


def _first_paint(d: Daemon, browser: Any, runs: int) -> list[Row]:
    for i in range(VMS_LISTED):
        d.client.define(_definition(f"vm{i:03d}"))
    rows = Row(f"VM list: {VMS_LISTED} rows in the page", unit="ms", other_name="-",
               target="<= 500 ms")
    fcp = Row("VM list: first contentful paint", unit="ms", other_name="-")
    cookie = d.session_cookie()
    for _ in range(max(runs, 5)):
        ctx = browser.new_context()
        ctx.add_cookies([cookie])
        ctx.add_init_script(ROWS_SEEN % VMS_LISTED)
        page = ctx.new_page()
        page.goto(f"{d.url}/#/vms")
        page.wait_for_function("() => window.__rowsAt !== null", timeout=30_000)
        rows.pyvirt.append(float(page.evaluate("window.__rowsAt")))
        paint = page.evaluate("(performance.getEntriesByName('first-contentful-paint')[0]"
                              " || {}).startTime || null")
        if paint is not None:
            fcp.pyvirt.append(float(paint))
        ctx.close()
    return [rows, fcp]


# ---- 2. keystroke -> echo

WS_HOOK = """
(() => {
  window.__echo = [];
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...a) {
      super(...a);
      this.__sent = null;
      this.addEventListener('message', () => {
        if (this.__sent !== null) { window.__echo.push(performance.now() - this.__sent);
                                    this.__sent = null; }
      });
    }
    send(data) { if (this.__sent === null) this.__sent = performance.now();
                 return super.send(data); }
  };
})();
"""


def _direct_echo(console: Path, keys: int) -> list[float]:
    """Each key straight to the VMM's console socket: the guest's own echo time."""
    out = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(os.fspath(console))
        s.settimeout(5)
        s.sendall(b"\x15")  # ^U: an empty line
        time.sleep(0.3)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while s.recv(65536):
                pass
        s.setblocking(True)
        s.settimeout(5)
        for i in range(keys):
            ch = b"abcdefghij"[i % 10:i % 10 + 1]
            t0 = time.perf_counter()
            s.sendall(ch)
            got = b""
            while ch not in got:
                got += s.recv(4096)
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)
        s.sendall(b"\x15")
    return out


def _wait_ready(d: Daemon, name: str) -> None:
    from pyvirt.guest import READY_LINE

    seen = b""
    with d.client.console(name) as ws:
        while READY_LINE.encode() not in seen:
            msg = ws.recv(timeout=180)
            seen += msg if isinstance(msg, bytes) else msg.encode()


def _echo(d: Daemon, browser: Any, runs: int) -> list[Row]:
    name = "echo0"
    d.client.define(_definition(name))
    d.client.start(name)
    _wait_ready(d, name)
    console = Path(d.client.domain(name)["console_socket"])
    via = Row("console key -> echo, browser over the daemon", unit="ms", other_name="direct")
    over = Row("  ... minus the guest's own echo (median)", unit="ms", other_name="-",
               target="<= 20 ms")
    for _ in range(max(runs, 3)):
        direct = _direct_echo(console, KEYS)
        ctx = browser.new_context()
        ctx.add_cookies([d.session_cookie()])
        ctx.add_init_script(WS_HOOK)
        page = ctx.new_page()
        page.goto(f"{d.url}/#/vms/{name}/console")
        page.wait_for_selector("[data-field=console-status]:has-text('connected')",
                               timeout=30_000)
        page.click("[data-testid=console]")
        time.sleep(0.5)
        page.evaluate("window.__echo = []")
        for i in range(KEYS):
            page.keyboard.press("abcdefghij"[i % 10])
            time.sleep(0.05)
        page.keyboard.press("Control+u")
        time.sleep(0.3)
        echo = [float(x) for x in page.evaluate("window.__echo")][:KEYS]
        ctx.close()
        if not echo:
            raise RuntimeError("no echo measured in the page")
        via.pyvirt.append(statistics.median(echo))
        via.other.append(statistics.median(direct))
        over.pyvirt.append(statistics.median(echo) - statistics.median(direct))
    return [via, over]


# ---- 3. daemon CPU with 5 tabs

def _cpu(d: Daemon, browser: Any, runs: int) -> list[Row]:
    names = [f"tab{i}" for i in range(TABS)]
    for n in names:
        d.client.define(_definition(n))
        d.client.start(n)
    for n in names:
        _wait_ready(d, n)
    row = Row(f"daemon CPU, {TABS} tabs on live VM pages", unit="%", other_name="no tab",
              target="<= 5 %")

    def measure() -> float:
        c0, t0 = d.cpu_seconds(), time.monotonic()
        time.sleep(CPU_SECONDS)
        return 100 * (d.cpu_seconds() - c0) / (time.monotonic() - t0)

    for _ in range(max(1, runs // 3)):
        row.other.append(measure())
        ctx = browser.new_context()
        ctx.add_cookies([d.session_cookie()])
        pages = []
        for i, n in enumerate(names):
            page = ctx.new_page()
            tab = "console" if i % 2 == 0 else "graphs"
            page.goto(f"{d.url}/#/vms/{n}/{tab}")
            pages.append(page)
        time.sleep(3)  # the pages settle (history fetched, console attached)
        row.pyvirt.append(measure())
        ctx.close()
    return [row]


def run(runs: int) -> list[Row]:
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is not installed (apt-get install chromium)")
    d = Daemon()
    try:
        with _browser() as browser:
            return [*_first_paint(d, browser, runs), *_echo(d, browser, runs),
                    *_cpu(d, browser, runs)]
    finally:
        d.close()


if __name__ == "__main__":
    from bench.common import print_rows

    print_rows("web GUI (Chromium 156, Playwright)", run(int(sys.argv[1]) if len(sys.argv) > 1
                                                         else 3))
