"""``pyvirt daemon``: pyvirtd, the management daemon's process.

Start-up order: arguments checked (nothing touched yet), directories made, the
pid file locked (a second daemon on the same state is refused), the TCP listener
bound (when asked), ``Manager.startup()`` (database, VMs found again, pools,
networks, autostart), then the Unix socket bound (mode 0660, group ``pyvirt``
when it exists): a socket that accepts means a daemon ready to answer. Both
listeners are served by uvicorn on one event loop; SIGTERM/SIGINT stop them
gracefully and close the Manager, which leaves every VM (and dnsmasq) running.
Logs go to stderr (journald under systemd; ``contrib/pyvirtd.service``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import logging
import os
import re
import signal
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from pyvirt.errors import PyvirtError, UserInputError
from pyvirt.manager.paths import DaemonPaths

__all__ = ["DaemonError", "daemon", "run_daemon"]

log = logging.getLogger("pyvirt.manager.daemon")

#: seconds open streams (events, consoles) get to end when the daemon stops
GRACE_S = 2


class DaemonError(PyvirtError):
    """The daemon cannot start (another one runs, a socket cannot be bound)."""


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserInputError(f"listen address {listen!r}: expected HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _resolve_group(group: str | None) -> int | None:
    """The API socket's group: ``group`` (a name or a number), else ``pyvirt``
    when that group exists, else none (owner only)."""
    if group is None:
        try:
            return grp.getgrnam("pyvirt").gr_gid
        except KeyError:
            return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise UserInputError(f"group {group!r} does not exist") from None


def _read_token(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UserInputError(f"token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UserInputError(f"token file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise UserInputError(f"token file {path}: readable by other users "
                                 "(chmod 600 it)")
        token = f.read(4097).decode(errors="replace").strip()
    if not 16 <= len(token) <= 4096 or not token.isprintable() or " " in token:
        raise UserInputError(f"token file {path}: the token must be 16 to 4096 printable "
                             "characters without spaces")
    return token


def _check_tls(cert: Path, key: Path) -> None:
    """Load the pair now, so a bad one is a clear error before anything starts
    (uvicorn would load it only while serving)."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        why = re.sub(r"^\[\w+\] | \(_ssl\.c:\d+\)$", "", exc.strerror or str(exc))
        raise UserInputError(f"TLS certificate {cert} and key {key} cannot be used: "
                             f"{why}") from None


@contextlib.contextmanager
def _pidfile(path: Path) -> Iterator[None]:
    """Hold ``path`` locked (flock) with our pid in it for the daemon's life."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise DaemonError(f"another pyvirtd (pid {other}) is running on these paths "
                              f"(it holds {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(fd)


def _bind_unix(path: Path, gid: int | None) -> socket.socket:
    """The API socket: a stale one replaced (the pid file lock says no daemon
    owns it), created 0600 and then opened to the group (0660)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise DaemonError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, 0o660)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot set up {path}: {exc.strerror}") from None
    sock.set_inheritable(False)
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserInputError(f"listen address {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        why = "address in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise DaemonError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(False)
    return sock


def _check_web(web: str | None, cert: Path | None, key: Path | None,
               idle: float | None) -> tuple[str, int] | None:
    """The web listener's address ([ADDR:]PORT, loopback by default); a
    non-loopback one needs TLS."""
    if web is None:
        if cert or key or idle is not None:
            raise UserInputError("--web-cert, --web-key and --web-session-idle are only used "
                                 "with --web")
        return None
    if web.isdigit():
        web = f"127.0.0.1:{web}"
    try:
        host, port = _parse_listen(web)
    except UserInputError:
        raise UserInputError(f"--web {web!r}: expected [ADDR:]PORT") from None
    if (cert is None) != (key is None):
        raise UserInputError("--web-cert and --web-key go together")
    if idle is not None and not 1 <= idle <= 7 * 86400:
        raise UserInputError("--web-session-idle: expected 1 to 604800 seconds")
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if cert is None and not loopback:
        raise UserInputError(f"--web {web}: a non-loopback address needs TLS "
                             "(--web-cert and --web-key)")
    if cert is not None and key is not None:
        for what, p in (("web TLS certificate", cert), ("web TLS key", key)):
            if not os.path.isfile(p):
                raise UserInputError(f"{what} {p}: no such file")
        _check_tls(cert, key)
    return host, port


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) we are ready; nothing when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


def run_daemon(paths: DaemonPaths, *, listen: str | None = None,
               tls_cert: Path | None = None, tls_key: Path | None = None,
               token_file: Path | None = None, group: str | None = None,
               start_networks: bool = True, web: str | None = None,
               web_cert: Path | None = None, web_key: Path | None = None,
               web_session_idle: float | None = None) -> int:
    """Run pyvirtd until SIGTERM/SIGINT; 0 then. Bad arguments raise
    ``UserInputError`` before anything is touched."""
    web_addr = _check_web(web, web_cert, web_key, web_session_idle)
    tcp: tuple[str, int] | None = None
    token: str | None = None
    if listen is not None:
        tcp = _parse_listen(listen)
        if tls_cert is None or tls_key is None:
            raise UserInputError("listening on TCP needs a TLS certificate and key")
        if token_file is None:
            raise UserInputError("listening on TCP needs a token file")
        for what, p in (("TLS certificate", tls_cert), ("TLS key", tls_key)):
            if not os.path.isfile(p):
                raise UserInputError(f"{what} {p}: no such file")
        token = _read_token(token_file)
        _check_tls(tls_cert, tls_key)
    elif tls_cert or tls_key or token_file:
        raise UserInputError("a TLS certificate, key or token file is only used with "
                             "a TCP listen address")
    gid = _resolve_group(group)

    paths.ensure()
    with _pidfile(paths.pidfile), contextlib.ExitStack() as stack:
        tcp_sock = _bind_tcp(*tcp) if tcp else None
        if tcp_sock is not None:
            stack.callback(tcp_sock.close)
        web_sock = _bind_tcp(*web_addr) if web_addr else None
        if web_sock is not None:
            stack.callback(web_sock.close)

        from pyvirt.manager.manager import Manager

        # the Manager finds the VM user itself (Privilege.detect)
        manager = Manager(paths, start_networks=start_networks)
        stack.callback(manager.close)
        manager.startup()

        from pyvirt.manager.api import close_streams, make_app, require_token

        app = make_app(manager, uri=f"unix://{paths.socket}")
        unix_sock = _bind_unix(paths.socket, gid)
        stack.callback(_remove_socket, paths.socket, os.stat(paths.socket).st_ino)
        stack.callback(unix_sock.close)
        listeners: list[tuple[Any, socket.socket, dict[str, Any]]] = [(app, unix_sock, {})]
        if tcp_sock is not None and token is not None:
            listeners.append((require_token(app, token), tcp_sock,
                              {"ssl_certfile": os.fspath(tls_cert or ""),
                               "ssl_keyfile": os.fspath(tls_key or "")}))
        if web_sock is not None:
            from pyvirt.manager.auth import IDLE_S
            from pyvirt.manager.web import make_web_app

            web_tls = web_cert is not None
            web_app = make_web_app(app, manager, tls=web_tls, token=token,
                                   idle_s=web_session_idle or IDLE_S)
            listeners.append((web_app, web_sock,
                              {"ssl_certfile": os.fspath(web_cert or ""), "ssl_keyfile":
                               os.fspath(web_key or "")} if web_tls else {}))
            log.info("web GUI on %s://%s", "https" if web_tls else "http", web)
        log.info("pyvirtd ready on %s%s", paths.socket, f" and https://{listen}" if tcp else "")
        asyncio.run(_serve(listeners, lambda: close_streams(app)))
        log.info("pyvirtd stopping (VMs keep running)")
    return 0


def _remove_socket(path: Path, ino: int) -> None:
    # only our own socket: never one a later daemon bound meanwhile
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == ino:
            os.unlink(path)


async def _serve(listeners: list[tuple[Any, socket.socket, dict[str, Any]]],
                 on_stop: Callable[[], None]) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        # our own handlers stop every server; uvicorn's would re-raise the signal
        # after serving and kill us before the Manager is closed
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    servers = []
    for app, _sock, extra in listeners:
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                ws="websockets-sansio", ws_max_size=1 << 20,
                                timeout_graceful_shutdown=GRACE_S, server_header=False,
                                **extra)
        servers.append(Server(config))
    loop = asyncio.get_running_loop()

    def stop(signum: int) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        on_stop()
        for s in servers:
            s.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    tasks = [asyncio.create_task(s.serve(sockets=[sock]))
             for s, (_app, sock, _extra) in zip(servers, listeners, strict=True)]
    while not all(s.started for s in servers) and not any(t.done() for t in tasks):
        await asyncio.sleep(0.01)
    if all(s.started for s in servers):
        _sd_notify("READY=1")
    try:
        await asyncio.gather(*tasks)
    finally:
        for s in servers:
            s.should_exit = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


@click.command()
@click.option("--root", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Keep everything under DIR (DIR/state, DIR/run) instead of the default "
                   "places (/var/lib/pyvirt and /run/pyvirt for root). Keep it short: "
                   "sockets live under it.")
@click.option("--listen", metavar="HOST:PORT",
              help="Also serve the API on TCP with TLS (needs --tls-cert, --tls-key and "
                   "--token-file).")
@click.option("--tls-cert", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="TLS certificate chain (PEM) for --listen.")
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="TLS private key (PEM) for --listen.")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="The bearer token TCP clients must send (file mode 0600).")
@click.option("--group", metavar="NAME|GID",
              help="Group allowed to use the Unix socket (default: pyvirt, if it exists).")
@click.option("--no-networks", is_flag=True,
              help="Do not create or start networks at start-up (no default NAT network).")
@click.option("--web", metavar="[ADDR:]PORT",
              help="Serve the web GUI on ADDR:PORT (ADDR 127.0.0.1 by default; another "
                   "address needs --web-cert and --web-key).")
@click.option("--web-cert", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="TLS certificate chain (PEM) for --web.")
@click.option("--web-key", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="TLS private key (PEM) for --web.")
@click.option("--web-session-idle", type=float, metavar="SECONDS",
              help="Log web sessions out after this long without a request (default 1800).")
@click.pass_context
def daemon(ctx: click.Context, root: Path | None, listen: str | None, tls_cert: Path | None,
           tls_key: Path | None, token_file: Path | None, group: str | None,
           no_networks: bool, web: str | None, web_cert: Path | None, web_key: Path | None,
           web_session_idle: float | None) -> None:
    """Run pyvirtd, the management daemon (VMs, storage, networks; API on a Unix socket)."""
    from pyvirt.cli.main import _guarded

    debug = bool(ctx.obj and ctx.obj.get("debug"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, force=True,
                        format="pyvirtd: %(levelname)s %(name)s: %(message)s")
    paths = DaemonPaths.for_root(root) if root is not None else DaemonPaths.default()
    sys.exit(_guarded(ctx, lambda: run_daemon(
        paths, listen=listen, tls_cert=tls_cert, tls_key=tls_key, token_file=token_file,
        group=group, start_networks=not no_networks, web=web, web_cert=web_cert,
        web_key=web_key, web_session_idle=web_session_idle)))
