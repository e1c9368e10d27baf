"""Host and per-VM samples, their recent history, and a live stream of them.

The Manager's poller (one thread, every ``POLL_INTERVAL`` s) drives one
sampling pass for all clients, however many browser tabs watch:
``begin()`` samples the host, ``domain()`` each running VM (its VMM's
``/proc/PID/stat`` and ``statm``, and the byte counters of the VMM's
``GET /metrics``, fetched once per pass by the poller), ``end()`` keeps the
pass in the history rings and hands it to every subscriber.

Bounded: ``HISTORY`` samples per ring (10 minutes at 2 s), a ring only for a
defined domain (``retain`` drops the others each pass; ``forget`` at
undefine), and ``QUEUE`` frames per subscriber: one that falls behind is
closed (its stream ends), never grown. Rates are per second over the real
time between two samples; a counter that went down (the VM restarted, its
devices are new) or a new VMM process starts a new baseline: that sample's
rate is 0, never negative or huge.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DOMAIN_FIELDS", "HISTORY", "HOST_FIELDS", "QUEUE", "Monitor", "MonitorSubscription",
           "parse_cpu_line", "parse_meminfo", "parse_pid_stat", "rates_from_metrics"]

#: samples kept per domain and for the host (10 min at the poller's 2 s)
HISTORY = 300
#: frames a subscriber may have waiting (16 s of a 2 s stream)
QUEUE = 8
HOST_FIELDS = ("t", "cpu", "mem_used", "mem_total", "disk_used", "disk_total")
DOMAIN_FIELDS = ("t", "cpu", "rss", "disk_rd", "disk_wr", "net_rx", "net_tx")
#: the VMM's device counters a rate is made from: (metric, device name prefix)
_COUNTERS = {
    "disk_rd": ("pyvirt_device_bytes_read_total", "virtio-blk"),
    "disk_wr": ("pyvirt_device_bytes_written_total", "virtio-blk"),
    "net_rx": ("pyvirt_device_rx_bytes_total", "virtio-net"),
    "net_tx": ("pyvirt_device_tx_bytes_total", "virtio-net"),
}

Samples = Mapping[str, Iterable[tuple[Mapping[str, str], float]]]


# ---------------------------------------------------------------- /proc parsing
def parse_cpu_line(text: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``'s first line."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            vals = [int(v) for v in line.split()[1:9]]  # user..steal (guest is in user)
            vals += [0] * (8 - len(vals))
            idle = vals[3] + vals[4]  # idle + iowait
            total = sum(vals)
            return total - idle, total
    raise ValueError("no cpu line")


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, available) bytes from ``/proc/meminfo``."""
    got: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "MemFree"):
            got[key] = int(rest.split()[0]) * 1024
    total = got["MemTotal"]
    return total, got.get("MemAvailable", got.get("MemFree", 0))


def parse_pid_stat(text: str) -> tuple[int, int]:
    """(utime + stime ticks, start time ticks) from ``/proc/PID/stat`` (the command
    name may hold spaces and parentheses: fields are counted after the last ')')."""
    rest = text.rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12]), int(rest[19])


def rates_from_metrics(samples: Samples | None) -> dict[str, float]:
    """The VMM's byte counters summed over its disks and NICs (absent ones: 0)."""
    out = dict.fromkeys(_COUNTERS, 0.0)
    if samples is None:
        return out
    for key, (metric, prefix) in _COUNTERS.items():
        for labels, value in samples.get(metric, ()):
            if labels.get("device", "").startswith(prefix):
                out[key] += float(value)
    return out


# ---------------------------------------------------------------- subscribers
class MonitorSubscription:
    """Live frames of one client; closed (and its stream ended) when it falls
    ``QUEUE`` frames behind or the Monitor closes."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE + 1)
        self.closed = False
        self.dropped = False

    def _put(self, frame: dict[str, Any]) -> None:
        if self.closed:
            return
        if self._q.qsize() >= QUEUE:
            self.dropped = True
            self.close()
            return
        self._q.put_nowait(frame)

    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next frame, or None after ``timeout`` s (or once closed and drained)."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(queue.Full):
                self._q.put_nowait(None)  # wakes a reader waiting in get()
        self._monitor._unsubscribe(self)


# ---------------------------------------------------------------- the sampler
@dataclass
class _Baseline:
    """The last sample of one VMM process: what the next one's deltas start from."""

    pid: int
    start_ticks: int
    t: float
    cpu_ticks: int
    counters: dict[str, float]
    #: when ``counters`` were read (a pass without the VMM's answer keeps the old ones)
    counters_t: float


@dataclass
class _Ring:
    name: str
    samples: collections.deque[tuple[float, ...]] = field(
        default_factory=lambda: collections.deque(maxlen=HISTORY))
    base: _Baseline | None = None


class Monitor:
    """See the module docstring. ``proc``: where /proc is (tests give a fake one);
    ``disk_path``: the directory whose file system the host's disk figure is of."""

    def __init__(self, disk_path: Path, *, proc: Path = Path("/proc"),
                 clock: Callable[[], float] = time.time, interval_s: float = 2.0) -> None:
        self.disk_path = disk_path
        self.proc = proc
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()  # rings, baselines and subscribers; never held for I/O
        self._host: collections.deque[tuple[float, ...]] = collections.deque(maxlen=HISTORY)
        self._rings: dict[str, _Ring] = {}  # by domain uuid: a rename keeps its history
        self._subs: set[MonitorSubscription] = set()
        self._cpu_prev: tuple[int, int] | None = None
        self._pass: dict[str, Any] | None = None
        self._tick = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._closed = False

    # -- one pass (the poller's thread)

    def begin(self) -> dict[str, float]:
        """Start a pass: sample the host."""
        now = self._clock()
        cpu = 0.0
        try:
            busy, total = parse_cpu_line(self._read("stat"))
            if self._cpu_prev is not None and total > self._cpu_prev[1]:
                cpu = (busy - self._cpu_prev[0]) / (total - self._cpu_prev[1])
            self._cpu_prev = (busy, total)
        except (OSError, ValueError, IndexError):
            pass
        mem_total = mem_avail = 0
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            mem_total, mem_avail = parse_meminfo(self._read("meminfo"))
        disk_total = disk_free = 0
        try:
            st = os.statvfs(self.disk_path)
            disk_total, disk_free = st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize
        except OSError:
            pass
        host = {"t": now, "cpu": round(min(max(cpu, 0.0), 1.0), 4),
                "mem_used": mem_total - mem_avail, "mem_total": mem_total,
                "disk_used": disk_total - disk_free, "disk_total": disk_total}
        self._pass = {"t": now, "host": host, "domains": {}}
        return host

    def domain(self, uuid: str, name: str, pid: int,
               metrics: Samples | None) -> dict[str, float] | None:
        """Sample one running VM (its VMM ``pid``; ``metrics``: its GET /metrics
        samples, None when it did not answer). None when the process is gone."""
        try:
            cpu_ticks, start_ticks = parse_pid_stat(self._read(f"{pid}/stat"))
            rss = int(self._read(f"{pid}/statm").split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None
        now = self._clock()
        counters = rates_from_metrics(metrics)
        sample: dict[str, float] = {"t": now, "cpu": 0.0, "rss": rss}
        with self._lock:
            ring = self._rings.get(uuid)
            if ring is None:
                ring = self._rings[uuid] = _Ring(name)
            ring.name = name
            base = ring.base
            same = base is not None and base.pid == pid and base.start_ticks == start_ticks
            if base is None or not same:
                base = None
            dt = now - base.t if base is not None else 0.0
            if base is not None and dt > 0:
                sample["cpu"] = round(max(0, cpu_ticks - base.cpu_ticks) / self._tick / dt, 4)
            cdt = now - base.counters_t if base is not None else 0.0
            for key, value in counters.items():
                prev = base.counters.get(key) if base is not None else None
                # a counter that went down was reset (new devices): no rate this time
                ok = prev is not None and value >= prev and cdt > 0 and metrics is not None
                sample[key] = round((value - prev) / cdt, 1) if ok and prev is not None else 0.0
            counters_t = now
            if metrics is None:
                # keep the last counters (and when they were read) for the next answer;
                # none known yet: the next answer is a baseline, not a rate since boot
                counters, counters_t = (base.counters, base.counters_t) if base else ({}, now)
            ring.base = _Baseline(pid, start_ticks, now, cpu_ticks, counters, counters_t)
            ring.samples.append(tuple(sample[k] for k in DOMAIN_FIELDS))
        if self._pass is not None:
            self._pass["domains"][name] = sample
        return sample

    def end(self, defined: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        """Finish the pass: the host sample into its ring, rings of domains no longer
        defined dropped (``defined``: uuid -> name), the frame to every subscriber."""
        frame, self._pass = self._pass, None
        if frame is None:
            return None
        with self._lock:
            self._host.append(tuple(frame["host"][k] for k in HOST_FIELDS))
            if defined is not None:
                for uuid in [u for u in self._rings if u not in defined]:
                    del self._rings[uuid]
                for uuid, ring in self._rings.items():
                    ring.name = defined[uuid]
            subs = list(self._subs)
        for sub in subs:
            sub._put(frame)
        return frame

    def forget(self, uuid: str) -> None:
        """The domain was undefined: its history goes."""
        with self._lock:
            self._rings.pop(uuid, None)

    def stopped(self, uuid: str) -> None:
        """The domain's VMM ended: the next one starts a new baseline."""
        with self._lock:
            ring = self._rings.get(uuid)
            if ring is not None:
                ring.base = None

    # -- readers (any thread)

    def history(self, names: set[str] | None = None) -> dict[str, Any]:
        """``{"interval_s", "host": [...], "domains": {NAME: [...]}}``, only the
        domains in ``names`` (None: all)."""
        with self._lock:
            host = list(self._host)
            rings = [(r.name, list(r.samples)) for r in self._rings.values()
                     if names is None or r.name in names]
        return {"interval_s": self.interval_s,
                "host": [dict(zip(HOST_FIELDS, s, strict=True)) for s in host],
                "domains": {name: [dict(zip(DOMAIN_FIELDS, s, strict=True)) for s in samples]
                            for name, samples in rings}}

    def latest_host(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(zip(HOST_FIELDS, self._host[-1], strict=True)) if self._host else None

    def tracked(self) -> int:
        with self._lock:
            return len(self._rings)

    def subscribe(self) -> MonitorSubscription:
        sub = MonitorSubscription(self)
        with self._lock:
            if self._closed:
                sub.closed = True
                sub._q.put_nowait(None)
            else:
                self._subs.add(sub)
        return sub

    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def close(self) -> None:
        """The daemon stops: every stream ends."""
        with self._lock:
            self._closed = True
            subs = list(self._subs)
        for sub in subs:
            sub.close()

    def _unsubscribe(self, sub: MonitorSubscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    def _read(self, rel: str) -> str:
        with open(self.proc / rel, "rb") as f:
            return f.read(65536).decode("ascii", "replace")  # bounded: /proc files are small
