// The dashboard: host CPU, memory and disk (live graphs from the shared metrics
// stream), VMs by state (from the live domain list), recent tasks and events.
import { useEffect, useRef, useState } from "preact/hooks";
import { api } from "./api.js";
import { TimeChart } from "./charts.js";
import { store, useStore } from "./store.js";
import { html, fmtBytes, fmtPct, fmtAgo, fmtDuration, stateClass } from "./ui.js";

const STATES = ["running", "paused", "in shutdown", "shut off", "crashed"];
const last = (xs) => (xs && xs.length ? xs[xs.length - 1] : null);
const vmLink = (name) => `#/vms/${encodeURIComponent(name)}`;

function Panel({ label, value, sub, children, cls = "" }) {
  return html`<section class=${"card " + cls} aria-label=${label}>
    <div class="card-head"><h2>${label}</h2>${value !== undefined ? html`<span class="big">${value}</span>` : null}</div>
    ${sub ? html`<p class="muted small">${sub}</p>` : null}
    ${children}
  </section>`;
}

function useTasks() {
  const [tasks, setTasks] = useState(null);
  const timer = useRef(null);
  useEffect(() => {
    let live = true;
    const load = () => api.get("/v1/tasks").then((t) => live && setTasks(Array.isArray(t) ? t : [])).catch(() => live && setTasks((x) => x || []));
    load();
    // Task events say when to look again (coalesced: a progress burst is one request).
    const off = store.subscribe("tasks", () => {
      if (timer.current) return;
      timer.current = setTimeout(() => { timer.current = null; load(); }, 500);
    });
    return () => { live = false; off(); if (timer.current) clearTimeout(timer.current); };
  }, []);
  return tasks;
}

function TaskRow({ t }) {
  const pct = Math.round((t.progress || 0) * 100);
  return html`<li class="task-row">
    <span class=${"tstate tstate-" + t.state}>${t.state}</span>
    <span class="grow"><span class="mono">#${t.id}</span> ${t.kind} <span class="muted">${t.object}</span>
      ${t.state === "failed" && t.error ? html`<span class="err small"> — ${t.error}</span>` : null}</span>
    ${t.state === "running"
      ? html`<progress max="100" value=${pct} aria-label=${`task ${t.id} progress`}>${pct} %</progress>`
      : html`<span class="muted small">${fmtAgo(t.finished || t.created)}</span>`}
  </li>`;
}

/** The vCPUs a new VM gets with accel "auto" on this host (the software CPU: fewer). */
const maxVcpus = (l) => (l.max_vcpus_by_accel && l.max_vcpus_by_accel.auto) || l.max_vcpus;

export function Dashboard() {
  useStore("domains", "metrics", "events");
  const [host, setHost] = useState(null);
  const tasks = useTasks();
  useEffect(() => {
    document.title = "Dashboard · pyvirt";
    api.get("/v1/host").then(setHost).catch(() => setHost(false));
  }, []);

  const h = store.host;
  const cpuNow = last(h.cpu);
  const memUsed = last(h.mem_used), memTotal = last(h.mem_total) || (host && host.memory_bytes);
  const diskUsed = last(h.disk_used), diskTotal = last(h.disk_total) || (host && host.disk && host.disk.total_bytes);

  const counts = {};
  for (const d of store.domains.values()) counts[d.state] = (counts[d.state] || 0) + 1;
  const states = [...STATES, ...Object.keys(counts).filter((s) => !STATES.includes(s))];
  const total = store.domains.size;

  const recentTasks = tasks ? [...tasks].reverse().slice(0, 8) : null;
  const events = store.recentEvents.slice(0, 12);

  return html`<div class="page dashboard">
    <div class="page-head">
      <h1>Dashboard</h1>
      ${host ? html`<p class="muted">${host.hostname} · ${host.cpus} CPUs · ${fmtBytes(host.memory_bytes)} memory${host.uptime_s ? " · up " + fmtDuration(host.uptime_s) : ""}${host.load ? " · load " + host.load.map((x) => x.toFixed(2)).join(" ") : ""}</p>` : null}
    </div>
    ${store.metricsAvailable === false ? html`<p class="alert alert-info">This daemon does not sample the host: the graphs stay empty.</p>` : null}
    <div class="grid grid-3">
      <${Panel} label="Host CPU" value=${fmtPct(cpuNow)} sub=${host ? `${host.cpus} CPUs, busy fraction of all` : "busy fraction of all CPUs"}>
        <${TimeChart} chart="host-cpu" label="Host CPU over the last 10 minutes" series=${[{ label: "CPU" }]}
          data=${[h.t, h.cpu]} yMax=${1} format=${(v) => Math.round(v * 100) + "%"} height=${140} />
      <//>
      <${Panel} label="Host memory" value=${memUsed !== null ? fmtBytes(memUsed) : "–"} sub=${memTotal ? `of ${fmtBytes(memTotal)}` : ""}>
        <${TimeChart} chart="host-mem" label="Host memory used over the last 10 minutes" series=${[{ label: "used" }]}
          data=${[h.t, h.mem_used]} yMax=${memTotal || null} format=${(v) => fmtBytes(v, 0)} height=${140} />
      <//>
      <${Panel} label="Host disk" value=${diskUsed !== null ? fmtBytes(diskUsed) : (host && host.disk ? fmtBytes(host.disk.total_bytes - host.disk.free_bytes) : "–")}
          sub=${diskTotal ? `of ${fmtBytes(diskTotal)}${host && host.disk ? " in " + host.disk.path : ""}` : ""}>
        <${TimeChart} chart="host-disk" label="Host disk used over the last 10 minutes" series=${[{ label: "used" }]}
          data=${[h.t, h.disk_used]} yMax=${diskTotal || null} format=${(v) => fmtBytes(v, 0)} height=${140} />
      <//>
    </div>
    <div class="grid grid-3">
      <${Panel} label="Virtual machines by state" value=${String(total)}>
        <ul class="bystate">
          ${states.map((s) => html`<li key=${s}><span class=${stateClass(s)}><span class="dot" aria-hidden="true"></span>${s}</span><span class="count">${counts[s] || 0}</span></li>`)}
        </ul>
        <p class="small"><a href="#/vms">All virtual machines</a>${host && host.limits ? html` · <span class="muted">up to ${maxVcpus(host.limits)} vCPU${maxVcpus(host.limits) === 1 ? "" : "s"}${host.limits.accel_auto === "emu" ? " (software CPU)" : ""}, ${fmtBytes(host.limits.max_memory_mib * 1048576, 0)} per VM</span>` : null}</p>
      <//>
      <${Panel} label="Recent tasks" cls="span-1">
        ${recentTasks === null ? html`<p class="muted">Loading…</p>` : recentTasks.length === 0
          ? html`<p class="muted">No tasks yet.</p>`
          : html`<ul class="tasks">${recentTasks.map((t) => html`<${TaskRow} key=${t.id} t=${t} />`)}</ul>`}
      <//>
      <${Panel} label="Recent events">
        ${events.length === 0 ? html`<p class="muted">No events yet.</p>` : html`<ul class="events">
          ${events.map((ev) => html`<li key=${ev.id}>
            <time class="muted small" datetime=${new Date(ev.time * 1000).toISOString()}>${fmtAgo(ev.time)}</time>
            <span>${ev.kind === "domain" && store.domains.has(ev.object)
              ? html`<a href=${vmLink(ev.object)}>${ev.object}</a>`
              : html`<span class="muted">${ev.kind}</span> <span class="mono">${ev.kind === "task" ? "#" + ev.object : ev.object}</span>`}
              ${" "}${ev.event}${ev.detail ? html` <span class="muted">${ev.detail}</span>` : null}</span>
          </li>`)}
        </ul>`}
      <//>
    </div>
  </div>`;
}
