"""Run the fuzz targets: ``python -m fuzz.run [--runs N] [--targets a,b] [--out DIR]``.

Each target runs in its own process (``--child``), one after another, under
``nice -n 19``: atheris instruments pyvirt as the target imports it, then
libFuzzer runs ``one_input`` for ``--runs`` inputs (or ``--max-time`` seconds),
keeping new coverage in ``OUT/corpus/NAME`` (a later run goes on from it) and
the first failing input in ``OUT/artifacts/NAME/``. A finding is any exception
a target lets through, an error pyvirt logged (a device thread that caught a
bug), or the peak RSS over the target's bound (checked every ``RSS_EVERY``
inputs; libFuzzer's ``-rss_limit_mb`` backs it up). Per target it prints inputs run, exec/s,
crashes and peak RSS, and keeps the table in ``OUT/results.md`` (+ .json).

Exit status: 0 when every target ran clean, 1 on a finding, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "fuzz"
DEFAULT_RSS_MB = 1024
LIBFUZZER_RSS_MB = 2048


def _targets() -> tuple[str, ...]:
    from fuzz.targets import TARGETS  # no pyvirt import: safe in the parent

    return TARGETS


# ---- the child: one target under atheris ----------------------------------------------


class _Errors(logging.Handler):
    """Collects ERROR records: a device that caught an unexpected exception logs one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.first: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None:
            self.first = record


def _rss_mb() -> float:
    """Peak RSS of this process: a brief huge allocation counts even once freed."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(name: str, out: Path, lf_args: list[str]) -> None:
    import atheris

    logging.basicConfig(level=logging.CRITICAL)
    # warnings are the documented reaction to a bad request; errors are findings
    logging.getLogger("pyvirt").setLevel(logging.ERROR)
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    with atheris.instrument_imports(include=["pyvirt"]):
        mod = importlib.import_module(f"fuzz.targets.{name}")
    from fuzz.common import Finding  # after the target: pyvirt must be imported instrumented

    one_input = mod.one_input
    rss_every = int(getattr(mod, "RSS_EVERY", 1000))
    rss_limit = float(os.environ.get("PYVIRT_FUZZ_RSS_MB",
                                     getattr(mod, "RSS_LIMIT_MB", DEFAULT_RSS_MB)))
    count = [0]

    def test_one(data: bytes) -> None:
        errors.first = None
        one_input(data)
        rec = errors.first
        if rec is not None:
            errors.first = None
            detail = "".join(traceback.format_exception(*rec.exc_info)) if rec.exc_info else ""
            raise Finding(f"pyvirt logged an error: {rec.getMessage()}\n{detail}")
        count[0] += 1
        if count[0] % rss_every == 0:
            rss = _rss_mb()
            if rss > rss_limit:
                raise Finding(f"RSS {rss:.0f} MiB over the bound of {rss_limit:.0f} MiB "
                              f"after {count[0]} inputs")

    corpus = out / "corpus" / name
    seeds = out / "seeds" / name
    artifacts = out / "artifacts" / name
    for d in (corpus, seeds, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(getattr(mod, "seeds", list)()):
        (seeds / f"seed-{i}").write_bytes(seed)
    argv = [sys.argv[0], f"-max_len={getattr(mod, 'MAX_LEN', 4096)}",
            f"-rss_limit_mb={LIBFUZZER_RSS_MB}", "-timeout=60", "-print_final_stats=1",
            "-len_control=0",  # structured inputs: short ones only reach the defaults
            f"-artifact_prefix={artifacts}/", *lf_args]
    if not any(os.path.isfile(a) for a in lf_args):  # else: replaying the files given
        argv += [str(corpus), str(seeds)]
    atheris.Setup(argv, test_one)
    atheris.Fuzz()


# ---- the parent: every target, one after another ---------------------------------------

_STATS = {
    "inputs": re.compile(r"stat::number_of_executed_units:\s*(\d+)"),
    "exec_per_s": re.compile(r"stat::average_exec_per_sec:\s*(\d+)"),
    "peak_rss_mb": re.compile(r"stat::peak_rss_mb:\s*(\d+)"),
    "new_units": re.compile(r"stat::new_units_added:\s*(\d+)"),
}
_PROGRESS = re.compile(r"^#(\d+)\s", re.MULTILINE)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_COVERAGE = re.compile(r"cov: (\d+)")
_NOTE = re.compile(r"^pyvirt-fuzz: note: (.*)$", re.MULTILINE)


def parse_log(text: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for key, rx in _STATS.items():
        m = rx.findall(text)
        res[key] = int(m[-1]) if m else None
    if res["inputs"] is None:
        progress = _PROGRESS.findall(text)
        res["inputs"] = int(progress[-1]) if progress else 0
    cov = _COVERAGE.findall(text)
    res["coverage"] = int(cov[-1]) if cov else None
    res["notes"] = sorted(set(_NOTE.findall(text)))
    res["artifacts"] = _ARTIFACT.findall(text)
    res["crashes"] = len(res["artifacts"])
    return res


def run_target(name: str, *, runs: int, max_time: int | None, out: Path, nice: bool,
               extra: list[str]) -> dict[str, Any]:
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fuzz.run", "--out", str(out), "--child", name, "--",
           f"-runs={runs}", *([f"-max_total_time={max_time}"] if max_time else []), *extra]
    if nice:
        cmd = ["nice", "-n", "19", *cmd]
    t0 = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - t0
    text = log_path.read_text(encoding="utf-8", errors="replace")
    res = parse_log(text)
    if proc.returncode != 0 and not res["crashes"]:
        res["crashes"] = 1  # died without an artifact (e.g. killed): still a failure
    res.update(target=name, exit_status=proc.returncode, wall_s=round(wall, 1),
               log=str(log_path))
    if res["exec_per_s"] is None and wall > 0:
        res["exec_per_s"] = int(res["inputs"] / wall)
    return res


def write_results(out: Path, results: dict[str, dict[str, Any]]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    lines = ["| target | inputs (last run) | inputs (all runs) | exec/s | crashes | "
             "peak RSS (MiB) | coverage | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in _targets():
        r = results.get(name)
        if r is not None:
            lines.append(f"| {name} | {r['inputs']} | {r.get('inputs_total', r['inputs'])} | "
                         f"{r['exec_per_s']} | {r['crashes']} | {r['peak_rss_mb']} | "
                         f"{r['coverage']} | {r['wall_s']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    lf_args: list[str] = []
    if "--" in args_in:
        i = args_in.index("--")
        args_in, lf_args = args_in[:i], args_in[i + 1:]
    p = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS", 1_000_000)),
                   help="inputs per target (default: $FUZZ_RUNS or 1000000)")
    p.add_argument("--max-time", type=int, default=None, help="seconds per target at most")
    p.add_argument("--targets", default="", help="comma-separated targets (default: all)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="corpus, logs, results")
    p.add_argument("--no-nice", action="store_true", help="do not run under nice -n 19")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(args_in)
    known = _targets()
    if args.child is not None:
        if args.child not in known and not args.child.startswith("_"):
            p.error(f"unknown target {args.child!r}")
        _child(args.child, args.out, lf_args)
        return 0  # not reached: libFuzzer exits
    names = [t for t in args.targets.split(",") if t] or list(known)
    unknown = [t for t in names if t not in known and not t.startswith("_")]
    if unknown:
        p.error(f"unknown target {unknown[0]!r} (known: {', '.join(known)})")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        results: dict[str, dict[str, Any]] = json.loads((args.out / "results.json").read_text())
    except (OSError, ValueError):
        results = {}
    failed = False
    for name in names:
        res = run_target(name, runs=args.runs, max_time=args.max_time, out=args.out,
                         nice=not args.no_nice, extra=lf_args)
        # a later run goes on from the same corpus: keep the count over all of them
        prev = results.get(name, {})
        res["inputs_total"] = prev.get("inputs_total", prev.get("inputs", 0)) + res["inputs"]
        results[name] = res
        write_results(args.out, results)
        status = "ok" if not res["crashes"] else f"FINDING: {res['artifacts'] or res['log']}"
        print(f"{name:16} {res['inputs']:>9} inputs {res['exec_per_s'] or 0:>7} exec/s "
              f"{res['crashes']} crashes  peak RSS {res['peak_rss_mb']} MiB  {status}",
              flush=True)
        for note in res["notes"]:
            print(f"{'':16} note: {note}", flush=True)
        failed |= bool(res["crashes"])
    print(f"results: {args.out / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
