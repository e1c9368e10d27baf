// The ONE client of the daemon's API for every page: JSON requests with the CSRF
// header, the event stream, the metrics stream (both over WebSockets), the console
// WebSocket, task following. Pages never call fetch/WebSocket themselves, so session expiry and
// errors are handled in one place.

export class ApiError extends Error {
  constructor(status, code, message, field = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

function loggedOut(code) {
  if (session.current === null && code !== "session-expired") return;
  session.current = null;
  dropSharedStream();
  window.dispatchEvent(new CustomEvent("pyvirt:logged-out", { detail: { code } }));
}

async function errorOf(resp) {
  let body = null;
  try { body = await resp.json(); } catch { /* not JSON: a proxy or a crash */ }
  const e = body && body.error;
  if (e && typeof e.code === "string") {
    return new ApiError(resp.status, e.code, String(e.message || e.code), e.field ?? null);
  }
  return new ApiError(resp.status, "http-" + resp.status, `HTTP ${resp.status} ${resp.statusText}`.trim());
}

async function request(method, path, body, { quiet401 = false } = {}) {
  const headers = { Accept: "application/json" };
  const init = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (method !== "GET" && session.current && session.current.csrf) {
    headers["X-CSRF-Token"] = session.current.csrf;
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (exc) {
    throw new ApiError(0, "network", "cannot reach the daemon (" + (exc && exc.message || "network error") + ")");
  }
  if (resp.status === 204) return null;
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401 && !quiet401) loggedOut(err.code);
    throw err;
  }
  const ctype = resp.headers.get("content-type") || "";
  if (ctype.includes("application/json")) return resp.json();
  return resp.text();
}

function setSession(s) {
  session.current = s ? { user: s.user, role: s.role, csrf: s.csrf, expires: s.expires,
                          idle_timeout_s: s.idle_timeout_s } : null;
  // The csrf token lives only in memory: after a reload GET /v1/session gives it again.
  return session.current;
}

export const session = {
  current: null,
  /** Ask the daemon who we are (the cookie is HttpOnly); null when not logged in. */
  async refresh() {
    try {
      return setSession(await request("GET", "/v1/session", undefined, { quiet401: true }));
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        setSession(null);
        return e.code === "session-expired" ? "expired" : null;
      }
      throw e;
    }
  },
  async login(user, password) {
    return setSession(await request("POST", "/v1/session", { user, password }, { quiet401: true }));
  },
  async logout() {
    try {
      await request("DELETE", "/v1/session", undefined, { quiet401: true });
    } finally {
      setSession(null);
      dropSharedStream();
      window.dispatchEvent(new CustomEvent("pyvirt:logged-out", { detail: { code: "logout" } }));
    }
  },
};

// ---------------------------------------------------------------- streams

/**
 * A stream of JSON messages (events, metrics) over a WebSocket on the same path as the
 * daemon's server-sent events; reconnects with backoff and resumes from the last id.
 * A WebSocket, not an EventSource: a browser holds at most 6 HTTP/1.1 connections to a
 * host, and two streams per open tab left a third tab unable to load.
 */
function stream(urlFor, onMessage, { onState } = {}) {
  let ws = null;
  let closed = false;
  let delay = 500;
  let timer = null;
  const open = () => {
    if (closed) return;
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(`${proto}//${location.host}${urlFor()}`);
    ws.onopen = () => { delay = 500; onState && onState("open"); };
    ws.onmessage = (m) => {
      let data;
      try { data = JSON.parse(m.data); } catch { return; }
      onMessage(data, m);
    };
    ws.onclose = () => {
      // the daemon stopped or restarted, the network dropped, or the session ended:
      // ask for the session first, so that a 401 logs the app out instead of retrying
      if (closed) return;
      onState && onState("reconnecting");
      timer = setTimeout(async () => {
        timer = null;
        if (closed) return;
        try {
          await request("GET", "/v1/session"); // a 401 here logs the app out
        } catch (e) {
          if (e instanceof ApiError && e.status === 401) { closed = true; return; }
        }
        open();
      }, delay);
      delay = Math.min(delay * 2, 10000);
    };
  };
  open();
  return {
    close() {
      closed = true;
      if (timer) clearTimeout(timer);
      if (ws) { ws.onclose = null; ws.close(); }
    },
  };
}

/** Task followers: one shared event stream serves every waitTask. */
const taskWaiters = new Map(); // id -> Set of waiter functions (ev or null = "look again")
let taskStream = null;

function ensureTaskStream() {
  if (taskStream) return;
  taskStream = events((ev) => {
    if (ev.kind !== "task") return;
    const set = taskWaiters.get(String(ev.object));
    if (set) for (const w of [...set]) w(ev);
  }, {
    since: null,
    // Once (re)connected, events between the task's start and now may have been missed.
    onState: (s) => {
      if (s === "open") for (const set of [...taskWaiters.values()]) for (const w of [...set]) w(null);
    },
  });
}

function releaseTaskStream() {
  if (taskWaiters.size === 0 && taskStream) {
    taskStream.close();
    taskStream = null;
  }
}

/**
 * Follow the event stream: onEvent(ev) for each event; returns {close()}.
 * since: an event id (the stored events after it come first) or null (only new ones).
 * Every subscriber shares ONE stream; only a subscriber asking for a replay while the
 * shared stream is open gets its own.
 */
export function events(onEvent, { since = null, onState } = {}) {
  const sub = { onEvent, onState };
  if (shared === null) {
    shared = { subs: new Set(), open: false, stream: null };
    const me = shared;
    let last = since;
    me.stream = stream(
      () => "/v1/events" + (last === null || last === undefined ? "" : "?since=" + encodeURIComponent(last)),
      (ev) => {
        if (typeof ev.id === "number") last = ev.id;
        if (ev.kind === "daemon" && ev.event === "overflow") return; // it ends; we resume with since
        for (const s of [...me.subs]) s.onEvent(ev);
      },
      {
        onState: (st) => {
          me.open = st === "open";
          for (const s of [...me.subs]) if (s.onState) s.onState(st);
        },
      },
    );
  } else if (since !== null && since !== undefined) {
    return ownStream(onEvent, since, onState);
  } else if (shared.open && onState) {
    setTimeout(() => onState("open"), 0); // already connected: say so, as a new one would
  }
  const me = shared;
  me.subs.add(sub);
  return {
    close() {
      me.subs.delete(sub);
      if (me.subs.size === 0 && shared === me) {
        me.stream.close();
        shared = null;
      }
    },
  };
}
let shared = null;

/** The session ended: the shared stream goes (a new login opens a new one). */
function dropSharedStream() {
  if (shared) {
    shared.stream.close();
    shared = null;
  }
  taskStream = null;
}

function ownStream(onEvent, since, onState) {
  let last = since;
  return stream(
    () => "/v1/events?since=" + encodeURIComponent(last),
    (ev) => {
      if (typeof ev.id === "number") last = ev.id;
      if (ev.kind === "daemon" && ev.event === "overflow") return;
      onEvent(ev);
    },
    { onState },
  );
}

export const api = {
  get: (path) => request("GET", path),
  post: (path, body = {}) => request("POST", path, body),
  put: (path, body = {}) => request("PUT", path, body),
  del: (path) => request("DELETE", path),
  session,
  events,
  /** The daemon's sampling stream: onFrame({t, host, domains}). Use store.js's shared one in pages. */
  metrics(onFrame, opts = {}) {
    return stream(() => "/v1/metrics/stream", onFrame, opts);
  },
  /** The serial console of domain `name` (binary frames both ways). */
  consoleSocket(name) {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${proto}//${location.host}/v1/domains/${encodeURIComponent(name)}/console`);
    ws.binaryType = "arraybuffer";
    return ws;
  },
  /**
   * Wait for task `id` to end, following its events (no polling loop): resolves with the
   * task, rejects with an ApiError (code "task-failed") when it fails.
   * onProgress(fraction 0..1, message).
   */
  waitTask(id, onProgress) {
    const key = String(id);
    return new Promise((resolve, reject) => {
      let done = false;
      const finish = async () => {
        if (done) return;
        let task;
        try { task = await request("GET", `/v1/tasks/${encodeURIComponent(key)}`); } catch (e) {
          cleanup(); reject(e); return;
        }
        if (task.state === "running") return;
        done = true;
        cleanup();
        if (onProgress) onProgress(task.progress ?? 1, task.message || "");
        if (task.state === "failed") {
          reject(new ApiError(500, "task-failed", task.error || `task ${key} failed`));
        } else {
          resolve(task);
        }
      };
      const waiter = (ev) => {
        if (ev === null) {
          finish();
        } else if (ev.event === "progress") {
          const m = /^(\d+)%\s*(.*)$/.exec(ev.detail || "");
          if (m && onProgress) onProgress(Number(m[1]) / 100, m[2]);
        } else if (ev.event === "done" || ev.event === "failed") {
          finish();
        }
      };
      const cleanup = () => {
        const set = taskWaiters.get(key);
        if (set) { set.delete(waiter); if (set.size === 0) taskWaiters.delete(key); }
        releaseTaskStream();
      };
      if (!taskWaiters.has(key)) taskWaiters.set(key, new Set());
      taskWaiters.get(key).add(waiter);
      ensureTaskStream();
      // The task may have ended before the stream opened: look once now.
      finish();
    });
  },
};

export default api;
