"""The API socket as a trust boundary: malformed HTTP, limits, slow, stuck and
vanishing clients, hundreds of connections, and fuzzed bytes. Every answer is
validated against the OpenAPI document; after each abuse the server still
answers the next client, and the event loop never blocks on a client."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyvirt.api.client import VmClient
from pyvirt.api.server import ApiLimits, ApiServer
from pyvirt.vmm.control import MetricFamily, VmState
from tests.api_support import (
    CHECKER,
    FakeControl,
    checked_client,
    closed_within,
    parse_responses,
    raw,
    raw_exchange,
    read_all,
    serving,
    short_tmpdir,
)

FAST = ApiLimits(request_timeout=0.5, write_timeout=0.5)
GET_VM = b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n"


def _healthy(srv: ApiServer) -> None:
    """The next client is served normally."""
    answers = raw_exchange(srv.path, GET_VM, method="GET", target="/vm")
    assert [a[0] for a in answers] == [200]


def _wait(cond: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize(("data", "status"), [
    (b"garbage\r\n\r\n", 400),
    (b"\x00\x01\x02\xff\r\n\r\n", 400),
    (b"GET /vm\r\n\r\n", 400),                          # HTTP/0.9 request line
    (b"GET /vm HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET  /vm HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /vm HTTP/1.1\r\n\r\n", 400),                 # no Host
    (b"GET /vm HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400),
    (b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    (b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     400),
    (b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", 413),
    (b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
     411),
    (b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 2"
     b"\r\n\r\n{}", 411),  # both (the smuggling shape): refused, and the connection closed
    (b"GET /vm HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n", 431),  # many headers
    (b"GET /" + b"v" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),          # huge target
    (b"GET /vm HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000, 431),                 # never ends
    (b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{}", 400),  # cut short
])
def test_malformed_http_gets_a_4xx_and_the_server_goes_on(data: bytes, status: int) -> None:
    ctl = FakeControl()
    with serving(ctl) as srv:
        answers = raw_exchange(srv.path, data)
        assert [a[0] for a in answers] == [status], answers
        assert answers[0][1].get("connection") == "close"
        assert ctl.calls == []
        _healthy(srv)
        assert _wait(lambda: len(srv.connections) == 0)


def test_body_over_the_limit_is_413_even_when_it_comes_without_length() -> None:
    with serving() as srv:
        big = b'{"path": "/' + b"a" * 70000 + b'"}'
        head = b"PUT /vm/snapshot HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        # announced: refused before the body is read
        answers = raw_exchange(srv.path, head + b"Content-Length: %d\r\n\r\n" % len(big) + big)
        assert [a[0] for a in answers] == [413]
        # an HTTP/1.0 body that runs to EOF (no length) is not accepted either
        answers = raw_exchange(srv.path, head.replace(b"1.1", b"1.0") + b"\r\n" + big)
        assert answers == [] or answers[0][0] in (400, 411, 413)
        _healthy(srv)


def test_keep_alive_and_pipelining_answer_in_order() -> None:
    ctl = FakeControl()
    with serving(ctl) as srv:
        reqs = [("PUT", "/vm/pause"), ("GET", "/vm"), ("PUT", "/vm/pause"), ("GET", "/nope"),
                ("PUT", "/vm/resume"), ("GET", "/version")] * 50
        data = b"".join(f"{m} {t} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
                        for m, t in reqs)
        answers = raw_exchange(srv.path, data, ops=reqs)
        assert [a[0] for a in answers] == [204, 200, 409, 404, 204, 200] * 50
        assert ctl.state is VmState.RUNNING


def test_a_pipelining_client_does_not_hold_the_loop() -> None:
    """Pipelined requests are answered a batch per turn of the loop: another
    client (standing in for the guest's devices on the same loop) is served
    in between, not after the whole flood."""
    ctl = FakeControl()
    ctl.delay = 0.01  # each GET /vm costs the loop 10 ms
    with serving(ctl) as srv, raw(srv.path, timeout=10) as flood:
        flood.sendall(GET_VM * 100)  # one read's worth: 1 s of work
        time.sleep(0.05)
        t0 = time.monotonic()
        answers = raw_exchange(srv.path, b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n",
                               method="GET", target="/version")
        waited = time.monotonic() - t0
        assert [a[0] for a in answers] == [200]
        # the answer came while most of the flood still waited (the count, not the
        # clock, decides: a loaded CI host stretches 10 ms sleeps)
        assert ctl.calls.count("info") < 90, "the flood was served first"
        assert waited < 5.0
        flood.shutdown(socket.SHUT_WR)
        assert [a[0] for a in parse_responses(read_all(flood, 10))] == [200] * 100


def test_a_client_closing_its_connection_asks_for_close() -> None:
    with serving() as srv:
        data = b"GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + GET_VM
        answers = raw_exchange(srv.path, data, method="GET", target="/vm")
        assert [a[0] for a in answers] == [200]  # the second request is not read


def test_slow_client_is_dropped_while_others_are_served() -> None:
    with serving(limits=FAST) as srv, raw(srv.path) as slow:
        slow.sendall(b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nContent-Le")
        t0 = time.monotonic()
        for _ in range(3):
            _healthy(srv)
        # and one trickling a byte at a time, each well within the timeout, gains nothing
        with raw(srv.path) as trickle:
            dropped = False
            for b in GET_VM[:-2]:
                try:
                    trickle.send(bytes([b]))
                except (BrokenPipeError, ConnectionResetError):
                    dropped = True
                    break
                time.sleep(0.05)
            assert dropped or closed_within(trickle, 2)
        assert closed_within(slow, 3)  # closed without an answer
        assert 0.4 < time.monotonic() - t0 < 5
        assert _wait(lambda: len(srv.connections) == 0)
        _healthy(srv)


def test_idle_keep_alive_connection_is_closed_after_the_timeout() -> None:
    with serving(limits=FAST) as srv, raw(srv.path) as s:
        s.sendall(GET_VM)
        time.sleep(0.2)
        s.sendall(GET_VM)  # a second request on time
        t0 = time.monotonic()
        data = read_all(s, 5)  # then nothing: the server closes
        assert time.monotonic() - t0 < 2
        assert [a[0] for a in parse_responses(data)] == [200, 200]


def test_client_that_disconnects_mid_request_is_just_dropped() -> None:
    ctl = FakeControl()
    with serving(ctl) as srv:
        for part in (b"PUT /vm/pa", b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\n",
                     b"PUT /vm/snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"pa"):
            with raw(srv.path) as s:
                s.sendall(part)
            # and with RST-like abort: unread data left behind in our direction
        with raw(srv.path) as s:
            s.sendall(GET_VM * 20)
        assert _wait(lambda: len(srv.connections) == 0)
        assert "pause" not in ctl.calls and "snapshot" not in ctl.calls
        _healthy(srv)


def test_client_that_never_reads_a_big_answer_does_not_block_the_loop() -> None:
    ctl = FakeControl()
    # ~1 MiB of metrics: more than a Unix socket's buffers hold
    ctl.families = [MetricFamily(f"pyvirt_test_{i}_total", "counter", "h" * 50,
                                 [({"device": "d" * 100}, i)]) for i in range(5000)]
    with serving(ctl, limits=FAST) as srv, raw(srv.path) as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
        time.sleep(0.1)
        for _ in range(3):  # the loop is not stuck writing to it
            t0 = time.monotonic()
            _healthy(srv)
            assert time.monotonic() - t0 < 2
        # only the first request was taken: nothing is read while an answer waits
        assert ctl.calls.count("metrics") == 1
        assert _wait(lambda: len(srv.connections) == 0)  # dropped after write_timeout
        _healthy(srv)


def test_a_slow_reader_of_a_big_answer_gets_all_of_it() -> None:
    ctl = FakeControl()
    ctl.families = [MetricFamily(f"pyvirt_test_{i}_total", "counter", "h",
                                 [({"device": "d" * 100}, i)]) for i in range(5000)]
    with serving(ctl, limits=FAST) as srv, raw(srv.path) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        chunks = []
        while True:  # reads in small pieces, with pauses shorter than the timeout
            data = s.recv(200_000)
            if not data:
                break
            chunks.append(data)
            time.sleep(0.1)
        answers = parse_responses(b"".join(chunks))
        assert [a[0] for a in answers] == [200]
        CHECKER.check("GET", "/metrics", *answers[0])
        assert answers[0][2].count(b"\n") == 3 * 5000


def test_two_hundred_simultaneous_connections() -> None:
    # the default limit (64 open): the rest are answered 503 at once, none hangs
    with serving() as srv:
        socks = []
        try:
            for _ in range(200):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(srv.path))  # blocking: waits while the backlog is full
                s.settimeout(10)
                socks.append(s)
            assert _wait(lambda: len(srv.connections) == 64)
            for s in socks:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(GET_VM)
            statuses = []
            for s in socks:
                answers = parse_responses(read_all_until_answer(s))
                assert len(answers) == 1
                CHECKER.check("GET", "/vm", *answers[0])
                statuses.append(answers[0][0])
        finally:
            for s in socks:
                s.close()
        assert statuses.count(200) == 64 and statuses.count(503) == 136
        assert _wait(lambda: len(srv.connections) == 0)
        _healthy(srv)


def test_connections_over_the_limit_get_503() -> None:
    with serving(limits=ApiLimits(max_connections=2)) as srv:
        with raw(srv.path), raw(srv.path):
            assert _wait(lambda: len(srv.connections) == 2)
            answers = raw_exchange(srv.path, GET_VM, method="GET", target="/vm")
            assert [a[0] for a in answers] == [503]
            assert answers[0][2] == (b'{"fault_message": "too many connections to the '
                                     b"VMM's API; try again\"}")
        assert _wait(lambda: len(srv.connections) == 0)
        _healthy(srv)


def test_two_hundred_concurrent_clients_all_served() -> None:
    ctl = FakeControl()
    results: list[int] = []
    lock = threading.Lock()
    with serving(ctl, limits=ApiLimits(max_connections=256)) as srv:
        start = threading.Barrier(200)

        def client() -> None:
            with checked_client(srv.path, timeout=30) as vm:
                start.wait()
                info = vm.info()
                m = vm.metrics()
            with lock:
                results.append(int(info["boot_count"]) + int(m.get("pyvirt_uptime_seconds") or 0))

        threads = [threading.Thread(target=client) for _ in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [13] * 200


def test_client_waits_out_a_full_listen_backlog() -> None:
    """A burst of clients can fill the VMM's listen backlog: connect() then fails
    with EAGAIN (Unix sockets do not wait), and the client tries again."""
    d = short_tmpdir()
    path = str(d / "api.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(0)
    fillers = []
    while True:  # fill the backlog, nobody accepting
        f = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        f.setblocking(False)
        try:
            f.connect(path)
        except BlockingIOError:
            f.close()
            break
        fillers.append(f)
    result: list[object] = []

    def ask() -> None:
        try:
            with VmClient(path, timeout=5) as vm:
                result.append(vm.version())
        except Exception as exc:
            result.append(exc)

    t = threading.Thread(target=ask)
    t.start()
    time.sleep(0.3)  # it is retrying now; then the VMM catches up
    body = b'{"pyvirt_version": "0.1.0", "api_version": "1"}'
    for f in fillers:
        f.close()
    deadline = time.monotonic() + 5
    lsock.settimeout(0.2)
    while t.is_alive() and time.monotonic() < deadline:
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(1)
            try:
                if conn.recv(4096):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n" % len(body) + body)
            except OSError:
                pass
    t.join(5)
    lsock.close()
    os.unlink(path)
    d.rmdir()
    assert result == [{"pyvirt_version": "0.1.0", "api_version": "1"}]


def read_all_until_answer(s: socket.socket) -> bytes:
    """Read until one complete answer has arrived (or the server closed)."""
    buf = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if parse_responses(buf):
            return buf
        try:
            data = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        buf += data
    return buf


# ---- fuzzing the bytes a client sends

_methods = st.sampled_from([b"GET", b"PUT", b"POST", b"DELETE", b"HEAD", b"OPTIONS", b"G\x00T",
                            b"PATCH", b""])
_targets = st.one_of(
    st.sampled_from([b"/vm", b"/vm/pause", b"/vm/resume", b"/vm/snapshot", b"/metrics",
                     b"/openapi.json", b"/version", b"/vm/stop", b"*", b"http://x/vm", b""]),
    st.binary(max_size=40))
_header_names = st.sampled_from([b"Host", b"Content-Length", b"Content-Type",
                                 b"Transfer-Encoding", b"Connection", b"Expect", b"X"])
_header_values = st.one_of(
    st.sampled_from([b"x", b"0", b"2", b"17", b"-1", b"chunked", b"application/json",
                     b"close", b"100-continue", b"99999999999"]),
    st.binary(max_size=30))
_bodies = st.one_of(
    st.sampled_from([b"", b"{}", b'{"path": "/tmp/pv-fuzz/x"}', b'{"path": 1}', b"[",
                     b'{"a": 1}', b"2\r\n{}\r\n0\r\n\r\n"]),
    st.binary(max_size=100))


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300))
    line = draw(_methods) + b" " + draw(_targets) + b" " + draw(
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/9", b""]))
    headers = draw(st.lists(st.tuples(_header_names, _header_values), max_size=6))
    data = line + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
    data += draw(_bodies)
    if draw(st.booleans()):  # a second, pipelined request
        data += GET_VM
    return data


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[tuple[ApiServer, FakeControl]]:
    ctl = FakeControl()
    with serving(ctl, limits=ApiLimits(request_timeout=2.0, write_timeout=2.0)) as srv:
        yield srv, ctl


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=_requests())
@example(data=b"PUT /vm/resume HTTP/1.0\r\n\r\n")  # an action that conflicts with the state: 409
@example(data=b"HEAD /vm HTTP/1.1\r\n\r\n")  # no Host: a malformed request's 400, with a body
@example(data=b"GET /\x80 HTTP/1.1\r\n\r\n")  # a target that is not ASCII
@example(data=b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /vm HTTP/1.1\r\nHost: x\r\n\r\n")
def test_fuzzed_requests_get_an_answer_or_are_dropped(
        fuzz_server: tuple[ApiServer, FakeControl], data: bytes) -> None:
    srv, ctl = fuzz_server
    ctl.state = VmState.RUNNING  # a fuzzed stop must not make every action 409
    with raw(srv.path, timeout=5) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        got = read_all(s, 5)
        assert time.monotonic() - t0 < 4  # answered or closed at EOF, not at a timeout
    # A well-formed first request may get the errors its operation documents (a resume
    # while running is a 409); anything else gets one of the any-request answers.
    first = re.match(rb"([A-Z]+) (/[!-~]*?)(?:\?[!-~]*)? HTTP/1\.[01]\r\n", data)  # ASCII
    answers = parse_responses(got)
    # an answer to a HEAD the server could parse is its head alone; to a malformed
    # one, a whole answer: whichever reading makes sense of more of what came
    headless = False
    if first and first[1] == b"HEAD":
        as_head = parse_responses(got, ("HEAD",))
        if len(as_head) > len(answers) or (as_head and not answers):
            answers, headless = as_head, True
    asked: list[tuple[str | None, str | None]] = [
        (first[1].decode(), first[2].decode()) if first else (None, None), ("GET", "/vm")]
    for i, (status, headers, body) in enumerate(answers):
        assert status < 500 or status in (503, 505), (status, body)  # never a 500
        if i == 0 and headless:  # the head of an answer: its length, no body
            assert body == b"" and int(headers.get("content-length", "0")) >= 0, headers
            continue
        if status >= 400:  # errors have a documented shape whatever the request
            method, path = asked[i] if i < len(asked) else (None, None)
            op = CHECKER.doc["paths"].get(path or "", {}).get((method or "").lower())
            if op is None or str(status) not in op["responses"]:
                method = path = None  # not the operation's answer (e.g. a malformed request)
            CHECKER.check(method, path, status, headers, body)
    # and the next client is served
    _healthy(srv)
