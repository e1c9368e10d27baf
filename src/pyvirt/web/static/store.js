// The app's live state, shared by every page: the domain list kept current by the
// event stream, recent events, and the metrics (history + ONE stream on
// /v1/metrics/stream for the whole app). Nothing here polls.
import { useEffect, useState } from "preact/hooks";
import { api, ApiError } from "./api.js";

const RING = 300; // samples kept per series: 10 min at the daemon's 2 s
const RECENT_EVENTS = 50;

const topics = new Map(); // topic -> Set(fn)
const pending = new Set();
let flushQueued = false;

function notify(topic) {
  // Coalesce bursts (a bulk start, a replayed backlog) into one render per frame.
  pending.add(topic);
  if (flushQueued) return;
  flushQueued = true;
  const run = () => {
    flushQueued = false;
    const now = [...pending];
    pending.clear();
    for (const t of now) for (const fn of [...(topics.get(t) || [])]) fn();
  };
  if (typeof requestAnimationFrame === "function" && document.visibilityState === "visible") {
    requestAnimationFrame(run);
  } else {
    setTimeout(run, 16);
  }
}

/** A host or domain history: column arrays (uPlot's shape), at most RING long. */
function newSeries(keys) {
  const s = { t: [] };
  for (const k of keys) s[k] = [];
  return s;
}
const HOST_KEYS = ["cpu", "mem_used", "mem_total", "disk_used", "disk_total"];
const DOMAIN_KEYS = ["cpu", "rss", "disk_rd", "disk_wr", "net_rx", "net_tx"];

function push(series, keys, sample) {
  if (!sample || typeof sample.t !== "number") return;
  const n = series.t.length;
  if (n && sample.t <= series.t[n - 1]) return; // a replayed or duplicate sample
  series.t.push(sample.t);
  for (const k of keys) series[k].push(typeof sample[k] === "number" ? sample[k] : null);
  if (series.t.length > RING) {
    const cut = series.t.length - RING;
    for (const k of ["t", ...keys]) series[k].splice(0, cut);
  }
}

// Event -> the state it leaves the domain in (the list is refreshed after anyway, for reasons).
const EVENT_STATE = {
  started: ["running", "booted"], resumed: ["running", "unpaused"], rebooted: ["running", "booted"],
  restored: ["running", "restored"], suspended: ["paused", "user"],
  stopped: ["shut off", ""], shutdown: ["shut off", "shutdown"], saved: ["shut off", "saved"],
  crashed: ["crashed", ""],
};

export const store = {
  /** name -> {name, uuid, state, reason, autostart, description, id} */
  domains: new Map(),
  domainsLoaded: false,
  domainsError: null,
  /** recent events, newest first */
  recentEvents: [],
  host: newSeries(HOST_KEYS),
  /** name -> series (running domains; dropped when the domain goes) */
  vm: new Map(),
  /** null: not known yet; true: the daemon samples; false: no metrics routes */
  metricsAvailable: null,
  lastEventId: null,
  streamState: "connecting",

  subscribe(topic, fn) {
    if (!topics.has(topic)) topics.set(topic, new Set());
    topics.get(topic).add(fn);
    return () => topics.get(topic).delete(fn);
  },
  notify,
};

let eventStream = null;
let metricStream = null;
let refreshTimer = null;
let refreshing = null;
let started = false;

function setDomains(list) {
  const next = new Map();
  for (const d of list) next.set(d.name, d);
  store.domains = next;
  for (const name of [...store.vm.keys()]) if (!next.has(name)) store.vm.delete(name);
  store.domainsLoaded = true;
  store.domainsError = null;
  notify("domains");
}

/** GET /v1/domains now (one request for the whole list). */
// The list asked for before the session is known (app.js, first page load): the
// session check and the list travel together. A plain fetch: a 401 here must not
// log anyone out (the session check decides that).
let prefetched = null;
export function prefetchDomains() {
  prefetched = fetch("/v1/domains?all=true", { credentials: "same-origin" })
    .then((r) => (r.ok ? r.json() : null)).catch(() => null);
}

export async function refreshDomains() {
  if (refreshing) return refreshing;
  const early = prefetched;
  prefetched = null;
  refreshing = (async () => {
    try {
      const list = early ? await early : null;
      setDomains(list || await api.get("/v1/domains?all=true"));
    } catch (e) {
      store.domainsError = e;
      notify("domains");
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

function scheduleRefresh(ms = 400) {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refreshDomains(); }, ms);
}

function onEvent(ev) {
  if (typeof ev.id === "number") store.lastEventId = ev.id;
  store.recentEvents.unshift(ev);
  if (store.recentEvents.length > RECENT_EVENTS) store.recentEvents.length = RECENT_EVENTS;
  notify("events");
  if (ev.kind === "task") { notify("tasks"); return; }
  if (ev.kind !== "domain") return;
  const d = store.domains.get(ev.object);
  const st = EVENT_STATE[ev.event];
  if (ev.event === "undefined") {
    store.domains.delete(ev.object);
    store.vm.delete(ev.object);
    store.domains = new Map(store.domains);
    notify("domains");
  } else if (d && st) {
    // Shown at once; the refresh below brings the daemon's own reason.
    const reason = st[1] || String(ev.detail || "").split(":")[0] || d.reason;
    store.domains.set(ev.object, { ...d, state: st[0], reason });
    store.domains = new Map(store.domains);
    notify("domains");
  }
  notify("domain:" + ev.object);
  scheduleRefresh();
}

function onFrame(frame) {
  store.metricsAvailable = true;
  if (frame.host) push(store.host, HOST_KEYS, { t: frame.t, ...frame.host });
  for (const [name, sample] of Object.entries(frame.domains || {})) {
    if (!store.domains.has(name) && store.domainsLoaded) continue;
    let s = store.vm.get(name);
    if (!s) { s = newSeries(DOMAIN_KEYS); store.vm.set(name, s); }
    push(s, DOMAIN_KEYS, { t: frame.t, ...sample });
  }
  notify("metrics");
}

async function loadHistory() {
  try {
    const h = await api.get("/v1/metrics/history");
    store.metricsAvailable = true;
    const host = newSeries(HOST_KEYS);
    for (const s of h.host || []) push(host, HOST_KEYS, s);
    // Keep samples the stream brought meanwhile.
    for (let i = 0; i < store.host.t.length; i++) {
      const s = { t: store.host.t[i] };
      for (const k of HOST_KEYS) s[k] = store.host[k][i];
      push(host, HOST_KEYS, s);
    }
    store.host = host;
    for (const [name, samples] of Object.entries(h.domains || {})) {
      const s = newSeries(DOMAIN_KEYS);
      for (const x of samples) push(s, DOMAIN_KEYS, x);
      const old = store.vm.get(name);
      if (old) {
        for (let i = 0; i < old.t.length; i++) {
          const x = { t: old.t[i] };
          for (const k of DOMAIN_KEYS) x[k] = old[k][i];
          push(s, DOMAIN_KEYS, x);
        }
      }
      store.vm.set(name, s);
    }
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) store.metricsAvailable = false;
  }
  notify("metrics");
}

/** Begin (after login): the list, recent events, the two streams. */
export async function startStore() {
  if (started) return;
  started = true;
  const log = api.get("/v1/events/log?limit=" + RECENT_EVENTS).catch(() => []);
  const list = refreshDomains();
  const evs = await log;
  if (!started) return;
  store.recentEvents = [...evs].reverse();
  const last = evs.length ? evs[evs.length - 1].id : 0;
  store.lastEventId = last;
  notify("events");
  await list;
  if (!started) return;
  let reopened = false; // the first open follows the list just read: since= covers it
  eventStream = api.events(onEvent, {
    since: last,
    onState: (s) => {
      store.streamState = s;
      notify("stream");
      if (s === "open" && reopened) scheduleRefresh(0); // catch up whatever happened while away
      if (s === "open") reopened = true;
    },
  });
  metricStream = api.metrics(onFrame);
  loadHistory();
}

/** End (on logout): close the streams and forget everything. */
export function stopStore() {
  started = false;
  prefetched = null;
  if (eventStream) eventStream.close();
  if (metricStream) metricStream.close();
  eventStream = metricStream = null;
  if (refreshTimer) clearTimeout(refreshTimer);
  refreshTimer = null;
  store.domains = new Map();
  store.domainsLoaded = false;
  store.recentEvents = [];
  store.host = newSeries(HOST_KEYS);
  store.vm = new Map();
  store.metricsAvailable = null;
}

/** Re-render the calling component whenever `topic` changes; returns the store. */
export function useStore(...topicList) {
  const [, setTick] = useState(0);
  useEffect(() => {
    const offs = topicList.map((t) => store.subscribe(t, () => setTick((n) => n + 1)));
    return () => offs.forEach((off) => off());
  }, topicList);
  return store;
}
