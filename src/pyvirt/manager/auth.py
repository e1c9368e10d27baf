"""Who is asking, and what they may see and do.

- ``Principal``: the caller of one request. The Unix socket and the TCP bearer
  token are the administrator; the web listener's sessions are local accounts.
- ``Accounts``: users (argon2 hashes), grants (user -> domain uuid) and sessions
  (the cookie's sha256, idle and absolute expiry) in the daemon's database.
- ``authorize(manager, principal, method, path)``: THE path policy, one place
  for every route (B's included): a domain the principal may not see is 404
  exactly as a missing one; roles decide the rest (403 ``forbidden``).
- ``visible_names``: the domain names a principal may see (None: all), for the
  filtered lists and streams; ``check_definition``: what a non-admin may put in
  a definition; ``grant_on_create``: a domain a user made is theirs.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pyvirt.manager.errors import AlreadyExists, InvalidArgument, ManagerError, NotFound

if TYPE_CHECKING:
    from pyvirt.manager.db import Store

__all__ = ["ADMIN", "ANONYMOUS", "IDLE_S", "LIFETIME_S", "ROLES", "Accounts", "Forbidden",
           "LoginThrottle", "Principal", "Session", "accounts", "authorize",
           "check_definition", "check_password", "check_user_name", "grant_on_create",
           "principal_of", "visible_names"]

ROLES = ("admin", "user", "viewer")
#: a session ends after this long without a request (``--web-session-idle``)
IDLE_S = 1800.0
#: and at the latest this long after the login
LIFETIME_S = 12 * 3600.0
PASSWORD_MIN = 8
PASSWORD_MAX = 1024
#: sessions kept per user (the oldest go first): a bound on a table logins grow
SESSIONS_PER_USER = 64
#: expired sessions are kept this long (to answer "session-expired"), then purged
EXPIRED_KEEP_S = 86400.0
_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")


class Forbidden(ManagerError):
    status = 403
    code = "forbidden"
    exit_status = 2


@dataclass(frozen=True)
class Principal:
    name: str
    role: str  # "admin" | "user" | "viewer" ("none": not logged in)
    via: str  # "unix" | "token" | "session" | "anonymous"
    csrf: str | None = field(default=None, repr=False, compare=False)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


ADMIN = Principal("root", "admin", "unix")
#: the web listener's caller of the routes that need no login (GET /v1/version)
ANONYMOUS = Principal("", "none", "anonymous")


def principal_of(request: Any) -> Principal:
    p = getattr(getattr(request, "state", None), "principal", None)
    return p if isinstance(p, Principal) else ADMIN


def check_user_name(name: object) -> str:
    if not isinstance(name, str) or not _USER_RE.fullmatch(name):
        raise InvalidArgument("a user name is 1 to 32 characters: a-z, 0-9, '_', '.', '-', "
                              "starting with a letter or '_'", "name")
    return name


def check_password(password: object) -> str:
    if not isinstance(password, str) or not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise InvalidArgument(f"a password is {PASSWORD_MIN} to {PASSWORD_MAX} characters",
                              "password")
    return password


def check_role(role: object) -> str:
    if role not in ROLES:
        raise InvalidArgument(f"expected one of {', '.join(ROLES)}", "role")
    return str(role)


@dataclass(frozen=True)
class Session:
    user: str
    role: str
    csrf: str
    created: float
    last_seen: float
    expires: float  # the absolute end (created + lifetime)

    def ends(self, idle_s: float) -> float:
        return min(self.expires, self.last_seen + idle_s)

    def to_doc(self, idle_s: float) -> dict[str, Any]:
        return {"user": self.user, "role": self.role, "csrf": self.csrf,
                "expires": self.ends(idle_s), "idle_timeout_s": idle_s}


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class Accounts:
    """Users, grants and sessions in the daemon's database (migration 3)."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time,
                 idle_s: float = IDLE_S, lifetime_s: float = LIFETIME_S) -> None:
        self.store = store
        self.clock = clock
        self.idle_s = idle_s
        self.lifetime_s = lifetime_s
        self._hasher: Any = None
        self._dummy: str | None = None
        self._lock = threading.Lock()

    # ---- passwords
    def _ph(self) -> Any:
        # argon2 is imported when a password is first hashed, not at VMM start-up
        with self._lock:
            if self._hasher is None:
                from argon2 import PasswordHasher

                self._hasher = PasswordHasher()
                self._dummy = self._hasher.hash(secrets.token_hex(16))
            return self._hasher

    def hash_password(self, password: str) -> str:
        return str(self._ph().hash(check_password(password)))

    def verify(self, name: str, password: str) -> str | None:
        """The user's role when ``password`` is theirs, else None (an unknown user
        costs a hash as well: the answer's time does not tell)."""
        from argon2.exceptions import InvalidHashError, VerificationError

        ph = self._ph()
        with self.store.read() as db:
            row = db.execute("SELECT hash, role FROM users WHERE name = ?",
                             (name,)).fetchone()
        try:
            ph.verify(row["hash"] if row is not None else self._dummy, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        if ph.check_needs_rehash(row["hash"]):
            with self.store.write() as db:
                db.execute("UPDATE users SET hash = ? WHERE name = ?", (ph.hash(password), name))
        return str(row["role"])

    # ---- users
    def user_list(self) -> list[dict[str, Any]]:
        with self.store.read() as db:
            users = db.execute("SELECT name, role, created FROM users ORDER BY name").fetchall()
            grants = db.execute("SELECT g.user, d.name FROM grants g JOIN domains d "
                                "ON d.uuid = g.domain ORDER BY d.name").fetchall()
        by_user: dict[str, list[str]] = {}
        for g in grants:
            by_user.setdefault(g[0], []).append(g[1])
        return [{"name": u["name"], "role": u["role"], "created": u["created"],
                 "grants": by_user.get(u["name"], [])} for u in users]

    def user_get(self, name: str) -> dict[str, Any]:
        for u in self.user_list():
            if u["name"] == name:
                return u
        raise NotFound(f"user '{name}' not found")

    def user_add(self, name: object, role: object, password: object) -> dict[str, Any]:
        name = check_user_name(name)
        role = check_role(role)
        digest = self.hash_password(check_password(password))
        now = self.clock()
        with self.store.write() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"user '{name}' already exists", "name")
            db.execute("INSERT INTO users (name, hash, role, created, updated) "
                       "VALUES (?, ?, ?, ?, ?)", (name, digest, role, now, now))
        return self.user_get(name)

    def user_set(self, name: str, *, role: object = None, password: object = None
                 ) -> dict[str, Any]:
        role = check_role(role) if role is not None else None
        digest = self.hash_password(check_password(password)) if password is not None else None
        with self.store.write() as db:
            if not db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise NotFound(f"user '{name}' not found")
            if role is not None:
                db.execute("UPDATE users SET role = ?, updated = ? WHERE name = ?",
                           (role, self.clock(), name))
            if digest is not None:
                db.execute("UPDATE users SET hash = ?, updated = ? WHERE name = ?",
                           (digest, self.clock(), name))
                # a new password ends the sessions the old one opened
                db.execute("DELETE FROM sessions WHERE user = ?", (name,))
        return self.user_get(name)

    def user_delete(self, name: str) -> None:
        with self.store.write() as db:
            cur = db.execute("DELETE FROM users WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFound(f"user '{name}' not found")

    def _domain_uuid(self, db: Any, domain: str) -> str:
        row = db.execute("SELECT uuid FROM domains WHERE name = ? OR uuid = ?",
                         (domain, domain)).fetchone()
        if row is None:
            raise NotFound(f"domain '{domain}' not found")
        return str(row[0])

    def grant(self, name: str, domain: str) -> None:
        with self.store.write() as db:
            if not db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise NotFound(f"user '{name}' not found")
            uuid = self._domain_uuid(db, domain)
            db.execute("INSERT OR IGNORE INTO grants (user, domain) VALUES (?, ?)", (name, uuid))

    def revoke(self, name: str, domain: str) -> None:
        with self.store.write() as db:
            if not db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise NotFound(f"user '{name}' not found")
            uuid = self._domain_uuid(db, domain)
            db.execute("DELETE FROM grants WHERE user = ? AND domain = ?", (name, uuid))

    def visible(self, name: str) -> tuple[set[str], set[str]]:
        """(names, uuids) of the domains granted to ``name``."""
        with self.store.read() as db:
            rows = db.execute("SELECT d.name, d.uuid FROM grants g JOIN domains d "
                              "ON d.uuid = g.domain WHERE g.user = ?", (name,)).fetchall()
        return {r[0] for r in rows}, {r[1] for r in rows}

    # ---- sessions
    def session_create(self, name: str) -> tuple[str, Session]:
        """A new session for ``name``: (the cookie's token, the session)."""
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = self.clock()
        with self.store.write() as db:
            row = db.execute("SELECT role FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"user '{name}' not found")
            db.execute("DELETE FROM sessions WHERE expires < ? OR last_seen < ?",
                       (now - EXPIRED_KEEP_S, now - self.idle_s - EXPIRED_KEEP_S))
            db.execute("INSERT INTO sessions (id_hash, user, csrf, created, last_seen, "
                       "expires) VALUES (?, ?, ?, ?, ?, ?)",
                       (_hash_token(token), name, csrf, now, now, now + self.lifetime_s))
            db.execute("DELETE FROM sessions WHERE user = ? AND id_hash NOT IN (SELECT "
                       "id_hash FROM sessions WHERE user = ? ORDER BY created DESC "
                       "LIMIT ?)", (name, name, SESSIONS_PER_USER))
        return token, Session(name, str(row[0]), csrf, now, now, now + self.lifetime_s)

    def session_lookup(self, token: str, *, touch: bool = True) -> Session | str | None:
        """The live session of ``token`` (its idle time restarted unless not
        ``touch``), "expired", or None."""
        if not token or len(token) > 256:
            return None
        key = _hash_token(token)
        now = self.clock()
        with self.store.read() as db:
            row = db.execute("SELECT s.*, u.role FROM sessions s JOIN users u "
                             "ON u.name = s.user WHERE s.id_hash = ?", (key,)).fetchone()
        if row is None:
            return None
        s = Session(row["user"], row["role"], row["csrf"], row["created"], row["last_seen"],
                    row["expires"])
        if now >= s.ends(self.idle_s):
            return "expired"
        # written at most every few seconds: not one write per request
        if touch and now - s.last_seen >= min(5.0, self.idle_s / 10):
            with self.store.write() as db:
                db.execute("UPDATE sessions SET last_seen = ? WHERE id_hash = ?", (now, key))
            s = Session(s.user, s.role, s.csrf, s.created, now, s.expires)
        return s

    def session_delete(self, token: str) -> None:
        with self.store.write() as db:
            db.execute("DELETE FROM sessions WHERE id_hash = ?", (_hash_token(token),))

    # ---- tasks a principal started (to show them their own)
    def note_task(self, tid: int, user: str) -> None:
        with self.store.write() as db:
            db.execute("INSERT OR REPLACE INTO task_owners (task, user) VALUES (?, ?)",
                       (tid, user))
            # bounded: only the owners of tasks still in the tasks table
            db.execute("DELETE FROM task_owners WHERE task < (SELECT COALESCE(MIN(id), 0) "
                       "FROM tasks)")

    def tasks_of(self, user: str) -> set[int]:
        with self.store.read() as db:
            return {int(r[0]) for r in db.execute(
                "SELECT task FROM task_owners WHERE user = ?", (user,)).fetchall()}


_ACCOUNTS: weakref.WeakKeyDictionary[Any, Accounts] = weakref.WeakKeyDictionary()
_ACCOUNTS_LOCK = threading.Lock()


def accounts(manager: Any) -> Accounts:
    """The manager's ``Accounts`` (made on first use, over its database)."""
    with _ACCOUNTS_LOCK:
        acc = _ACCOUNTS.get(manager)
        if acc is None or acc.store is not manager.store:
            acc = _ACCOUNTS[manager] = Accounts(manager.store)
        return acc


class LoginThrottle:
    """Failed logins per key (user + client address): after ``limit`` in
    ``window_s``, refused until the oldest leaves the window. Bounded."""

    MAX_KEYS: ClassVar[int] = 10000

    def __init__(self, limit: int = 5, window_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._fails: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._fails.get(key, ()) if now - t < self.window_s]
        if times:
            self._fails[key] = times
        else:
            self._fails.pop(key, None)
        return times

    def retry_after(self, key: str) -> int:
        """Seconds to wait before ``key`` may try again (0: now)."""
        with self._lock:
            now = self.clock()
            times = self._recent(key, now)
            if len(times) < self.limit:
                return 0
            return max(1, int(times[-self.limit] + self.window_s - now + 0.999))

    def failed(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            times = self._recent(key, now)
            times.append(now)
            self._fails[key] = times[-self.limit:]
            self._fails.move_to_end(key)
            while len(self._fails) > self.MAX_KEYS:
                self._fails.popitem(last=False)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._fails.pop(key, None)


# ---- what a principal may see and do

def _visible_keys(manager: Any, principal: Principal) -> set[str] | None:
    if principal.admin:
        return None
    if principal.via != "session":
        return set()
    names, uuids = accounts(manager).visible(principal.name)
    return names | uuids


def visible_names(manager: Any, principal: Principal) -> set[str] | None:
    """The names of the domains ``principal`` may see; None: all of them."""
    if principal.admin:
        return None
    if principal.via != "session":
        return set()
    return accounts(manager).visible(principal.name)[0]


def _read(method: str) -> bool:
    return method in ("GET", "HEAD")


def authorize(manager: Any, principal: Principal, method: str, path: str
              ) -> ManagerError | None:
    """The error the request must get, or None to let it through. ``method``
    "WEBSOCKET" for an upgrade (the console: an operation, not a read)."""
    if principal.admin:
        return None
    parts = path.split("/")[2:] if path.startswith("/v1/") else []
    head = parts[0] if parts else ""
    forbidden = Forbidden(f"{principal.role or 'anonymous'} '{principal.name}' may not "
                          f"{method} {path}")
    if principal.role not in ("user", "viewer"):
        return forbidden
    if head == "domains" and len(parts) >= 2:
        name = parts[1]
        keys = _visible_keys(manager, principal) or set()
        if name not in keys:
            return NotFound(f"domain '{name}' not found")
        if principal.role == "viewer" and not _read(method):
            return forbidden
        return None
    if head == "domains" and len(parts) == 1:
        if _read(method) or (method == "POST" and principal.role == "user"):
            return None
        return forbidden
    if head in ("tasks", "events", "host", "metrics", "version") and _read(method):
        return None  # filtered by the routes
    if head in ("events", "metrics") and method == "WEBSOCKET":
        return None  # the same streams over a WebSocket, filtered the same way
    if head in ("pools", "networks") and _read(method):
        return None
    if (head == "pools" and method == "POST" and len(parts) == 3 and parts[2] == "volumes"
            and principal.role == "user"):
        return None  # a new volume (the wizard's new disk); checked by the route
    return forbidden


def check_definition(manager: Any, principal: Principal, doc: Any) -> None:
    """What a non-admin may define: the default guest, volumes of the pools no
    hidden domain uses, network NICs; no host path, socket or sandbox change."""
    if principal.admin or not isinstance(doc, dict):
        return
    for key in ("kernel", "initrd"):
        if doc.get(key) is not None:
            raise Forbidden("only an administrator may boot a kernel from a host path "
                            "(use the default guest)", key)
    if doc.get("vsock") is not None:
        raise Forbidden("only an administrator may give a domain a vsock socket", "vsock")
    if doc.get("sandbox", "auto") not in ("auto", "on"):
        raise Forbidden("only an administrator may change the sandbox", "sandbox")
    keys = _visible_keys(manager, principal) or set()
    disks = doc.get("disks")
    for i, d in enumerate(disks if isinstance(disks, list) else []):
        if not isinstance(d, dict):
            continue
        if "volume" not in d:
            raise Forbidden("only an administrator may use a host path as a disk "
                            "(use a volume)", f"disks[{i}].path")
        _check_volume(manager, keys, d["volume"], f"disks[{i}].volume", doc.get("name"))
    nics = doc.get("nics")
    for i, n in enumerate(nics if isinstance(nics, list) else []):
        if isinstance(n, dict) and "network" not in n:
            raise Forbidden("only an administrator may give a NIC a host device "
                            "(use a network)", f"nics[{i}]")


def _check_volume(manager: Any, keys: set[str], volume: Any, where: str,
                  own: Any = None) -> None:
    if not isinstance(volume, str) or "/" not in volume or manager.storage is None:
        return  # the definition's own check names the field
    pool, _, vol = volume.partition("/")
    try:
        path, _fmt = manager.storage.vol_path(pool, vol)
    except ManagerError:
        return
    for user in manager.users_of(path):
        if user not in keys and user != own:
            raise Forbidden(f"storage volume '{volume}' belongs to a domain you cannot see",
                            where)


def check_volume_create(manager: Any, principal: Principal, pool: str,
                        backing: str | None) -> None:
    """A user's new volume may be an overlay only over a volume no hidden domain uses."""
    if principal.admin or backing is None:
        return
    full = backing if "/" in backing else f"{pool}/{backing}"
    _check_volume(manager, _visible_keys(manager, principal) or set(), full, "backing")


def check_existing(manager: Any, principal: Principal, doc: Any) -> None:
    """A non-admin's POST /v1/domains must not replace a domain they cannot see
    (define replaces by name or uuid)."""
    if principal.admin or not isinstance(doc, dict):
        return
    keys = _visible_keys(manager, principal) or set()
    with manager.store.read() as db:
        for col in ("name", "uuid"):
            value = doc.get(col)
            if isinstance(value, str) and value not in keys and db.execute(
                    f"SELECT 1 FROM domains WHERE {col} = ?", (value,)).fetchone():
                raise AlreadyExists(f"domain {col} {value!r} is taken", col)


def grant_on_create(manager: Any, principal: Principal, name: str) -> None:
    """A domain a user defined (or cloned) is granted to them."""
    if principal.via == "session" and not principal.admin:
        accounts(manager).grant(principal.name, name)
