// The VM list: one GET /v1/domains, then live from the event stream (store.js);
// CPU/memory sparklines from the shared metrics stream; search and state filter that
// hide rows instead of re-creating them (fast with hundreds of VMs); bulk start/shut down.
import { Component } from "preact";
import { useEffect, useMemo, useState } from "preact/hooks";
import { api, ApiError } from "./api.js";
import { Sparkline } from "./charts.js";
import { store, useStore } from "./store.js";
import { html, fmtBytes, fmtPct, stateClass, toast } from "./ui.js";

const FILTER_STATES = ["running", "paused", "shut off", "crashed"];
const ACTIVE = new Set(["running", "paused", "in shutdown"]);
const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
const last = (xs) => (xs && xs.length ? xs[xs.length - 1] : null);

/** One row; re-rendered only when what it shows changed (hundreds of rows, a frame every 2 s). */
class Row extends Component {
  shouldComponentUpdate(next) {
    const a = this.props, b = next;
    return a.d !== b.d && (a.d.state !== b.d.state || a.d.reason !== b.d.reason
      || a.d.description !== b.d.description || a.d.autostart !== b.d.autostart || a.d.id !== b.d.id)
      || a.hidden !== b.hidden || a.selected !== b.selected || a.mtick !== b.mtick;
  }

  render({ d, hidden, selected, onSelect, series }) {
    const cpu = series ? series.cpu : null;
    const rss = series ? series.rss : null;
    const active = ACTIVE.has(d.state);
    const href = `#/vms/${encodeURIComponent(d.name)}`;
    return html`<tr data-vm=${d.name} hidden=${hidden} class=${selected ? "selected" : ""}>
      <td class="c-sel"><input type="checkbox" checked=${selected} aria-label=${"Select " + d.name}
        onChange=${(e) => onSelect(d.name, e.currentTarget.checked)} /></td>
      <th scope="row" class="c-name"><a href=${href}>${d.name}</a>
        ${d.description ? html`<span class="desc">${d.description}</span>` : null}</th>
      <td class="c-state" data-label="State"><span class=${stateClass(d.state)}><span class="dot" aria-hidden="true"></span><span data-field="state">${d.state}</span></span>
        ${d.reason && d.reason !== "unknown" ? html`<span class="reason">${d.reason}</span>` : null}</td>
      <td class="c-cpu" data-label="CPU"><${Sparkline} field="cpu" values=${active ? cpu : null} max=${null}
          label=${`CPU of ${d.name}: ${active && cpu ? fmtPct(last(cpu)) : "not running"}`} />
        <span class="num">${active && cpu ? fmtPct(last(cpu)) : "–"}</span></td>
      <td class="c-mem" data-label="Memory"><${Sparkline} field="memory" color="--chart-2" values=${active ? rss : null}
          label=${`Memory of ${d.name}: ${active && rss ? fmtBytes(last(rss)) : "not running"}`} />
        <span class="num">${active && rss ? fmtBytes(last(rss), 0) : "–"}</span></td>
      <td class="c-auto" data-label="Autostart">${d.autostart ? "yes" : "no"}</td>
    </tr>`;
  }
}

async function inParallel(names, fn, limit = 4) {
  const results = [];
  let i = 0;
  const worker = async () => {
    while (i < names.length) {
      const name = names[i++];
      try { await fn(name); results.push([name, null]); } catch (e) { results.push([name, e]); }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, names.length) }, worker));
  return results;
}

export function VmList() {
  useStore("domains", "metrics");
  const [query, setQuery] = useState("");
  const [stateFilter, setStateFilter] = useState("all");
  const [sort, setSort] = useState({ key: "name", dir: 1 });
  const [selected, setSelected] = useState(() => new Set());
  const [busy, setBusy] = useState(null);

  useEffect(() => { document.title = "Virtual machines · pyvirt"; }, []);

  // A tick per metrics frame: rows compare it, so only rows with new samples redraw.
  const seriesLen = (name) => { const s = store.vm.get(name); return s ? s.t.length + ":" + last(s.t) : ""; };

  const domains = store.domains;
  const rows = useMemo(() => {
    const list = [...domains.values()];
    const k = sort.key;
    list.sort((a, b) => (k === "state" ? collator.compare(a.state, b.state) || collator.compare(a.name, b.name)
      : collator.compare(a.name, b.name)) * sort.dir);
    return list;
  }, [domains, sort]);

  const q = query.trim().toLowerCase();
  const isShown = (d) => (stateFilter === "all" || d.state === stateFilter)
    && (!q || d.name.toLowerCase().includes(q) || (d.description || "").toLowerCase().includes(q));
  let shown = 0;
  for (const d of rows) if (isShown(d)) shown++;

  const onSelect = useMemo(() => (name, on) => setSelected((s) => {
    const n = new Set(s);
    if (on) n.add(name); else n.delete(name);
    return n;
  }), []);
  // Forget selections of VMs that went away.
  const sel = [...selected].filter((n) => domains.has(n));
  const selShown = sel.filter((n) => isShown(domains.get(n)));
  const startable = selShown.filter((n) => !ACTIVE.has(domains.get(n).state));
  const stoppable = selShown.filter((n) => domains.get(n).state === "running");
  const allShownSelected = shown > 0 && selShown.length === shown;

  const toggleAll = (on) => setSelected(() => {
    const n = new Set();
    if (on) for (const d of rows) if (isShown(d)) n.add(d.name);
    return n;
  });

  const bulk = async (what) => {
    const names = what === "start" ? startable : stoppable;
    if (!names.length) return;
    setBusy(what);
    const res = await inParallel(names, (n) => api.post(`/v1/domains/${encodeURIComponent(n)}/${what === "start" ? "start" : "shutdown"}`,
      what === "start" ? {} : { timeout: 120 }));
    setBusy(null);
    const bad = res.filter(([, e]) => e);
    if (bad.length) {
      toast(bad.map(([n, e]) => `${n}: ${e instanceof ApiError ? e.message : String(e)}`).join("; "), "error");
    } else {
      toast(`${what === "start" ? "Started" : "Shut down"} ${names.length} virtual machine${names.length > 1 ? "s" : ""}.`);
    }
  };

  const sortBtn = (key, label) => {
    const on = sort.key === key;
    return html`<button type="button" class="sortbtn" onClick=${() => setSort({ key, dir: on ? -sort.dir : 1 })}>
      ${label}<span aria-hidden="true">${on ? (sort.dir > 0 ? " ▲" : " ▼") : ""}</span></button>`;
  };
  const ariaSort = (key) => (sort.key === key ? (sort.dir > 0 ? "ascending" : "descending") : undefined);

  return html`<div class="page vmlist">
    <div class="page-head row">
      <h1>Virtual machines</h1>
      <a class="btn btn-primary" href="#/new">New virtual machine</a>
    </div>
    <div class="toolbar" role="search">
      <div class="field field-inline">
        <label for="vm-search">Search</label>
        <input id="vm-search" type="search" placeholder="Name or description" value=${query}
          onInput=${(e) => setQuery(e.currentTarget.value)} autocomplete="off" spellcheck="false" />
      </div>
      <div class="field field-inline">
        <label for="vm-state">State</label>
        <select id="vm-state" value=${stateFilter} onChange=${(e) => setStateFilter(e.currentTarget.value)}>
          <option value="all">All</option>
          ${FILTER_STATES.map((s) => html`<option value=${s}>${s}</option>`)}
        </select>
      </div>
      <div class="bulk">
        <button type="button" class="btn" disabled=${!startable.length || busy !== null} onClick=${() => bulk("start")}>
          ${busy === "start" ? "Starting…" : "Start selected"}</button>
        <button type="button" class="btn" disabled=${!stoppable.length || busy !== null} onClick=${() => bulk("shutdown")}>
          ${busy === "shutdown" ? "Shutting down…" : "Shut down selected"}</button>
      </div>
    </div>
    <p class="muted small" role="status" aria-live="polite">
      ${!store.domainsLoaded ? "Loading…" : `${shown} of ${domains.size} shown${sel.length ? `, ${selShown.length} selected` : ""}`}
    </p>
    ${store.domainsError ? html`<p class="alert alert-error" role="alert">${store.domainsError.message}</p>` : null}
    <div class="table-wrap">
      <table class="vmtable">
        <caption>Virtual machines</caption>
        <thead><tr>
          <td class="c-sel"><input type="checkbox" aria-label="Select all shown" checked=${allShownSelected}
            disabled=${!shown} onChange=${(e) => toggleAll(e.currentTarget.checked)} /></td>
          <th scope="col" aria-sort=${ariaSort("name")}>${sortBtn("name", "Name")}</th>
          <th scope="col" class="c-state" aria-sort=${ariaSort("state")}>${sortBtn("state", "State")}</th>
          <th scope="col" class="c-cpu">CPU</th>
          <th scope="col" class="c-mem">Memory</th>
          <th scope="col" class="c-auto">Autostart</th>
        </tr></thead>
        <tbody>
          ${rows.map((d) => html`<${Row} key=${d.name} d=${d} hidden=${!isShown(d)} selected=${selected.has(d.name)}
              onSelect=${onSelect} series=${store.vm.get(d.name)} mtick=${seriesLen(d.name)} />`)}
        </tbody>
      </table>
      ${store.domainsLoaded && domains.size === 0 ? html`<div class="empty">
        <p>No virtual machines yet.</p><a class="btn btn-primary" href="#/new">Create one</a></div>` : null}
      ${store.domainsLoaded && domains.size > 0 && shown === 0 ? html`<p class="empty">No virtual machine matches.</p>` : null}
    </div>
  </div>`;
}
