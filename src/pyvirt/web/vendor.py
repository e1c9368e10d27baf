"""Vendor the web GUI's front-end packages from the npm registry.

``python -m pyvirt.web.vendor [--check]``: for each package in ``vendor.json``
(name, exact version, the tarball's sha512 as npm records it), ``npm pack``
fetches the tarball through the ordinary npm client, its digest is checked, and
the listed paths (licences among them) are unpacked under ``static/vendor/NAME/``.
A package already there at the same version and digest is left alone
(``static/vendor/NAME/.vendored`` records them), so ``make setup`` is quick the
second time. ``--check`` only reports what is missing or stale (exit 1 then).
The browser loads these files from the daemon and nothing from any other host.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST", "VENDOR", "missing", "vendor"]

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "vendor.json"
VENDOR = HERE / "static" / "vendor"


def _packages() -> list[dict[str, Any]]:
    data: dict[str, Any] = json.loads(MANIFEST.read_text())
    return list(data["packages"])


def _stamp(pkg: dict[str, Any]) -> str:
    return f"{pkg['package']}@{pkg['version']} {pkg['integrity']}\n"


def missing(dest: Path = VENDOR) -> list[str]:
    """The packages not unpacked at their pinned version (``name@version``)."""
    out = []
    for pkg in _packages():
        stamp = dest / pkg["name"] / ".vendored"
        if not stamp.is_file() or stamp.read_text() != _stamp(pkg):
            out.append(f"{pkg['package']}@{pkg['version']}")
    return out


def _digest(path: Path) -> str:
    h = hashlib.sha512()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def _unpack(tgz: Path, pkg: dict[str, Any], target: Path) -> None:
    wanted = [p.rstrip("/") for p in pkg["paths"]]
    with tarfile.open(tgz, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name.removeprefix("package/")
            if not (m.isfile() and any(rel == w or rel.startswith(w + "/") for w in wanted)):
                continue
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise SystemExit(f"{pkg['package']}: unsafe path {m.name!r} in the tarball")
            members.append((m, rel))
        found = {w for w in wanted for _, rel in members if rel == w or rel.startswith(w + "/")}
        if lost := sorted(set(wanted) - found):
            raise SystemExit(f"{pkg['package']}@{pkg['version']}: not in the tarball: "
                             + ", ".join(lost))
        for m, rel in members:
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            with src, out.open("wb") as f:
                shutil.copyfileobj(src, f)
            out.chmod(0o644)


def vendor(dest: Path = VENDOR) -> list[str]:
    """Fetch and unpack what ``missing`` names; the packages done."""
    todo = set(missing(dest))
    done = []
    npm = shutil.which("npm")
    for pkg in _packages():
        spec = f"{pkg['package']}@{pkg['version']}"
        if spec not in todo:
            continue
        if npm is None:
            raise SystemExit("npm is not installed (apt-get install npm)")
        with tempfile.TemporaryDirectory(prefix="pyvirt-vendor-") as tmp:
            r = subprocess.run([npm, "pack", "--silent", "--pack-destination", tmp, spec],
                               capture_output=True, text=True, cwd=tmp, check=False)
            tgzs = list(Path(tmp).glob("*.tgz"))
            if r.returncode != 0 or len(tgzs) != 1:
                why = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no tarball"]
                raise SystemExit(f"npm pack {spec}: {why[0]}")
            got = _digest(tgzs[0])
            if got != pkg["integrity"]:
                raise SystemExit(f"{spec}: the tarball's digest {got[:30]}… is not the pinned "
                                 f"{pkg['integrity'][:30]}…")
            target = dest / pkg["name"]
            staging = dest / f".{pkg['name']}.new"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            _unpack(tgzs[0], pkg, staging)
            (staging / ".vendored").write_text(_stamp(pkg))
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)
        done.append(spec)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyvirt.web.vendor", description=__doc__)
    ap.add_argument("--check", action="store_true", help="only report what is missing")
    args = ap.parse_args(argv)
    if args.check:
        lost = missing()
        for spec in lost:
            print(f"not vendored: {spec}")
        return 1 if lost else 0
    for spec in vendor():
        print(f"vendored {spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
