"""``make screenshots``: the README's pictures of the web GUI, taken afresh.

A real daemon (``--no-networks``, a short root of its own) with a dozen defined
VMs, two of them running the default guest on the software CPU (one with a
snapshot), shown in Debian's Chromium through Playwright; PNGs go to
docs/screenshots/. Nothing here is a test: the browser tests are tests/web/.

    python -m bench.screenshots [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import ROOT
from bench.web_bench import Daemon, _browser, _definition, _wait_ready

SHOTS = ROOT / "docs" / "screenshots"


def take(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    d = Daemon()
    made: list[Path] = []
    try:
        c = d.client
        for i, (name, desc) in enumerate([
                ("web-frontend", "nginx in front of the app servers"),
                ("db-primary", "PostgreSQL primary"), ("db-replica", "PostgreSQL replica"),
                ("build-runner", "CI runner"), ("ci-cache", ""), ("dns", "internal resolver"),
                ("mail", ""), ("monitoring", "Prometheus + Grafana"), ("scratch", ""),
                ("vpn-gw", "WireGuard gateway"), ("backup", "nightly backups"),
                ("win-test", "")]):
            doc = _definition(name)
            doc["description"] = desc
            doc["memory"] = ("128M", "256M", "512M")[i % 3]
            c.define(doc)
        for name in ("web-frontend", "db-primary"):
            c.start(name)
        for name in ("web-frontend", "db-primary"):
            _wait_ready(d, name)
        tid = c.snapshot_create("db-primary", "before-upgrade",
                                description="before the PostgreSQL 16 upgrade")
        c.wait_task(tid, timeout=300)
        c.suspend("db-primary")
        c.resume("db-primary")
        time.sleep(20)  # a few samples for the graphs
        with _browser() as browser:
            for label, viewport in (("", {"width": 1280, "height": 800}),
                                    ("-phone", {"width": 390, "height": 844})):
                ctx = browser.new_context(viewport=viewport, device_scale_factor=1)
                page = ctx.new_page()
                if not label:
                    page.goto(f"{d.url}/#/login")
                    page.wait_for_selector("text=Log in")
                    made.append(_shot(page, out / "login.png"))
                    page.close()
                    page = ctx.new_page()  # a fresh load with the session below
                ctx.add_cookies([d.session_cookie()])
                pages = [("dashboard", "#/", "[data-chart=host-cpu]"),
                         ("vm-list", "#/vms", "tr[data-vm]")]
                if not label:
                    pages += [("wizard", "#/new", "text=Create and start"),
                              ("vm-console", "#/vms/web-frontend/console",
                               "[data-field=console-status]:has-text('connected')"),
                              ("vm-graphs", "#/vms/db-primary/graphs", "[data-chart=cpu]"),
                              ("vm-snapshots", "#/vms/db-primary/snapshots",
                               "[data-snapshot=before-upgrade]")]
                for shot, route, ready in pages:
                    page.goto(f"{d.url}/{route}")
                    page.wait_for_selector(ready, timeout=30_000)
                    if shot == "vm-console":
                        page.click("[data-testid=console]")
                        page.keyboard.type("uname -sr; free -m | head -2\n")
                    time.sleep(2)
                    made.append(_shot(page, out / f"{shot}{label}.png"))
                ctx.close()
    finally:
        d.close()
    return made


def _shot(page: object, path: Path) -> Path:
    page.screenshot(path=str(path))  # type: ignore[attr-defined]
    return path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.screenshots")
    ap.add_argument("--out", type=Path, default=SHOTS)
    args = ap.parse_args()
    for p in take(args.out):
        print(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)


if __name__ == "__main__":
    main()
