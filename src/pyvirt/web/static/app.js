// The app: hash router, the shell (skip link, header, main navigation, user, log out),
// the login page and session expiry. Pages:
//   #/login, #/ (dashboard.js), #/vms (vmlist.js), #/new (wizard.js),
//   #/vms/NAME[/TAB] -> vm.js, loaded on demand: `export function VmPage({name, tab})`
//   (or its default export) rendered inside <main>.
import { render } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { api, ApiError } from "./api.js";
import { prefetchDomains, startStore, stopStore } from "./store.js";
import { html } from "./ui.js";

export const TABS = ["overview", "console", "graphs", "disks", "network", "snapshots", "tasks"];

/** The route from location.hash: {page, name?, tab?, path}. */
export function parseRoute(hash = location.hash) {
  const path = (hash || "").replace(/^#/, "") || "/";
  const parts = path.split("/").filter(Boolean);
  if (parts.length === 0) return { page: "dashboard", path: "/" };
  if (parts[0] === "login" && parts.length === 1) return { page: "login", path };
  if (parts[0] === "new" && parts.length === 1) return { page: "new", path };
  if (parts[0] === "vms" && parts.length === 1) return { page: "vms", path };
  if (parts[0] === "vms" && (parts.length === 2 || parts.length === 3)) {
    let name;
    try { name = decodeURIComponent(parts[1]); } catch { return { page: "notfound", path }; }
    const tab = parts[2] || "overview";
    if (!TABS.includes(tab)) return { page: "notfound", path };
    return { page: "vm", name, tab, path };
  }
  return { page: "notfound", path };
}

export function navigate(path) {
  const target = "#" + path;
  if (location.hash !== target) location.hash = target;
}

export const vmHref = (name, tab) => `#/vms/${encodeURIComponent(name)}${tab ? "/" + tab : ""}`;

// ---------------------------------------------------------------- login

function Login({ expired, onLoggedIn }) {
  const [user, setUser] = useState("");
  const [password, setPassword] = useState("");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const userRef = useRef(null);
  useEffect(() => { document.title = "Log in · pyvirt"; userRef.current && userRef.current.focus(); }, []);

  const submit = async (e) => {
    e.preventDefault();
    if (!user || !password) { setError("Enter your user name and password."); return; }
    setBusy(true);
    setError(null);
    try {
      const s = await api.session.login(user.trim(), password);
      onLoggedIn(s);
    } catch (exc) {
      setPassword("");
      if (exc instanceof ApiError && exc.code === "bad-credentials") setError("Wrong user name or password.");
      else if (exc instanceof ApiError && exc.code === "too-many-attempts") setError("Too many failed attempts: wait a few minutes, then try again.");
      else setError(exc.message || "Login failed.");
    } finally {
      setBusy(false);
    }
  };

  return html`<div class="login-wrap">
    <main id="main" class="login" tabindex="-1">
      <div class="brand brand-large"><${Logo} /> pyvirt</div>
      <h1>Log in</h1>
      ${expired && !error ? html`<p class="alert alert-warn" role="alert">Your session expired. Log in again to go on.</p>` : null}
      ${error ? html`<p class="alert alert-error" role="alert">${error}</p>` : null}
      <form onSubmit=${submit} novalidate>
        <label for="login-user">User name</label>
        <input id="login-user" name="username" ref=${userRef} autocomplete="username" autocapitalize="none"
          spellcheck="false" value=${user} onInput=${(e) => setUser(e.currentTarget.value)} required />
        <label for="login-password">Password</label>
        <input id="login-password" name="password" type="password" autocomplete="current-password"
          value=${password} onInput=${(e) => setPassword(e.currentTarget.value)} required />
        <button type="submit" class="btn btn-primary" disabled=${busy}>${busy ? "Logging in…" : "Log in"}</button>
      </form>
    </main>
  </div>`;
}

function Logo() {
  return html`<svg class="logo" viewBox="0 0 24 24" width="22" height="22" aria-hidden="true" focusable="false">
    <rect x="2.5" y="4" width="19" height="13" rx="2.5" fill="none" stroke="currentColor" stroke-width="2"/>
    <path d="M7 21h10M12 17v4" stroke="currentColor" stroke-width="2" stroke-linecap="round"/>
    <path d="M7 9.5l2.5 2-2.5 2M11.5 13.5h5" fill="none" stroke="currentColor" stroke-width="1.8" stroke-linecap="round" stroke-linejoin="round"/>
  </svg>`;
}

// ---------------------------------------------------------------- shell

function NavLink({ href, active, children }) {
  return html`<a href=${href} aria-current=${active ? "page" : undefined} class=${active ? "active" : ""}>${children}</a>`;
}

function Toasts() {
  const [items, setItems] = useState([]);
  useEffect(() => {
    let n = 0;
    const on = (e) => {
      const id = ++n;
      setItems((xs) => [...xs.slice(-3), { id, ...e.detail }]);
      setTimeout(() => setItems((xs) => xs.filter((x) => x.id !== id)), 6000);
    };
    window.addEventListener("pyvirt:toast", on);
    return () => window.removeEventListener("pyvirt:toast", on);
  }, []);
  return html`<div class="toasts" role="status" aria-live="polite">
    ${items.map((t) => html`<div key=${t.id} class=${"toast toast-" + t.kind}>${t.text}</div>`)}
  </div>`;
}

// Pages load on demand (the first one while the session is being checked): the
// list's first paint does not wait for the charts library or the wizard.
const PAGES = {
  dashboard: ["./dashboard.js", "Dashboard"],
  vms: ["./vmlist.js", "VmList"],
  new: ["./wizard.js", "Wizard"],
  vm: ["./vm.js", "VmPage"],
};
const loaded = new Map(); // page -> module promise

function loadPage(page) {
  if (!loaded.has(page)) loaded.set(page, import(PAGES[page][0]));
  return loaded.get(page);
}

function Lazy({ page, ...props }) {
  const [mod, setMod] = useState(null);
  const [err, setErr] = useState(null);
  useEffect(() => {
    let live = true;
    setMod(null);
    loadPage(page).then((m) => live && setMod({ m })).catch((e) => {
      loaded.delete(page); // a later visit tries again
      if (live) setErr(e);
    });
    return () => { live = false; };
  }, [page]);
  if (err) return html`<p class="alert alert-error" role="alert">This page could not be loaded: ${String(err.message || err)}</p>`;
  if (!mod) return html`<p class="muted" aria-busy="true">Loading…</p>`;
  const Page = mod.m[PAGES[page][1]] || mod.m.default;
  return html`<${Page} ...${props} />`;
}

function NotFound() {
  useEffect(() => { document.title = "Not found · pyvirt"; }, []);
  return html`<h1>Page not found</h1><p>There is nothing at this address. <a href="#/">Go to the dashboard</a>.</p>`;
}

function Shell({ session, route, onLogout }) {
  const mainRef = useRef(null);
  const first = useRef(true);
  useEffect(() => {
    // Move focus to the new page (screen readers announce it), not on the first load.
    if (first.current) { first.current = false; return; }
    if (mainRef.current && route.page !== "vm") mainRef.current.focus({ preventScroll: false });
    window.scrollTo(0, 0);
  }, [route.page, route.name]);

  let page;
  switch (route.page) {
    case "dashboard": page = html`<${Lazy} page="dashboard" />`; break;
    case "vms": page = html`<${Lazy} page="vms" />`; break;
    case "new": page = html`<${Lazy} page="new" session=${session} />`; break;
    case "vm": page = html`<${Lazy} page="vm" key=${route.name} name=${route.name} tab=${route.tab} />`; break;
    default: page = html`<${NotFound} />`;
  }
  const p = route.page;
  return html`
    <a class="skip" href="#main" onClick=${(e) => { e.preventDefault(); mainRef.current && mainRef.current.focus(); }}>Skip to content</a>
    <header class="topbar">
      <a class="brand" href="#/"><${Logo} /><span>pyvirt</span></a>
      <nav aria-label="Main" class="mainnav">
        <${NavLink} href="#/" active=${p === "dashboard"}>Dashboard<//>
        <${NavLink} href="#/vms" active=${p === "vms" || p === "vm"}>Virtual machines<//>
        ${session.role !== "viewer" ? html`<${NavLink} href="#/new" active=${p === "new"}>New virtual machine<//>` : null}
      </nav>
      <div class="who">
        <span class="user" title=${"Role: " + session.role}><span class="sr-only">Logged in as </span><span data-field="user">${session.user}</span> <span class="role">${session.role}</span></span>
        <button type="button" class="btn btn-quiet" onClick=${onLogout}>Log out</button>
      </div>
    </header>
    <main id="main" tabindex="-1" ref=${mainRef}>${page}</main>
    <${Toasts} />`;
}

// ---------------------------------------------------------------- app

function App() {
  const [session, setSession] = useState(undefined); // undefined: asking the daemon
  const [route, setRoute] = useState(parseRoute());
  const [expired, setExpired] = useState(false);
  const returnTo = useRef(null);

  useEffect(() => {
    const onHash = () => setRoute(parseRoute());
    window.addEventListener("hashchange", onHash);
    const onOut = (e) => {
      const code = e.detail && e.detail.code;
      stopStore();
      if (code !== "logout") {
        // Expired or ended elsewhere: come back here after logging in again.
        const r = parseRoute();
        if (r.page !== "login") returnTo.current = r.path;
        setExpired(true);
      } else {
        returnTo.current = null;
        setExpired(false);
      }
      setSession(null);
    };
    window.addEventListener("pyvirt:logged-out", onOut);
    firstSession.then((s) => {
      if (s === "expired") { setExpired(true); setSession(null); } else setSession(s);
    }).catch(() => setSession(null));
    return () => {
      window.removeEventListener("hashchange", onHash);
      window.removeEventListener("pyvirt:logged-out", onOut);
    };
  }, []);

  // Logged out: every page but the login one sends there (remembering where it was).
  useEffect(() => {
    if (session === undefined) return;
    if (session === null && route.page !== "login") {
      if (!returnTo.current) returnTo.current = route.path;
      navigate("/login");
    } else if (session && route.page === "login") {
      navigate("/");
    }
  }, [session, route.page]);

  useEffect(() => { if (session) startStore(); }, [session]);

  if (session === undefined) return html`<p class="boot">Loading pyvirt…</p>`;
  if (!session) {
    return html`<${Login} expired=${expired} onLoggedIn=${(s) => {
      const back = returnTo.current;
      returnTo.current = null;
      setExpired(false);
      setSession(s);
      navigate(back && back !== "/login" ? back : "/");
      setRoute(parseRoute());
    }} />`;
  }
  if (route.page === "login") return html`<p class="boot">Loading pyvirt…</p>`;
  return html`<${Shell} session=${session} route=${route} onLogout=${() => api.session.logout().catch(() => {})} />`;
}

// Both at once, before the first render: who we are, and the page asked for.
const firstSession = api.session.refresh();
const firstPage = parseRoute().page;
if (PAGES[firstPage]) loadPage(firstPage).catch(() => {});
if (firstPage === "vms" || firstPage === "dashboard") prefetchDomains();

render(html`<${App} />`, document.getElementById("app"));
