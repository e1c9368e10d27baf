// The VM page (#/vms/NAME[/TAB]): state with its reason and uptime, the actions legal in
// that state, and the tabs: overview, serial console, live graphs, disks, network,
// snapshots, tasks. State changes arrive on the app's one event stream (store.js, no
// polling): each event about this domain makes the page read the domain once.

import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import { api } from "./api.js";
import { Sparkline, TimeChart } from "./charts.js";
import { ConsolePanel } from "./console.js";
import { DisksPanel, NicsPanel } from "./devices.js";
import { SnapshotsPanel } from "./snapshots.js";
import { store, useStore } from "./store.js";
import { TasksPanel } from "./tasks.js";
import { Dialog, fmtBytes, fmtDuration, fmtPct, fmtRate, fmtTime, html, StateBadge, toast } from "./ui.js";
import { canWrite, domPath, errText, memBytes } from "./vmutil.js";

export const TABS = [
  ["overview", "Overview"], ["console", "Console"], ["graphs", "Graphs"], ["disks", "Disks"],
  ["network", "Network"], ["snapshots", "Snapshots"], ["tasks", "Tasks"],
];

// states in which the domain has a VMM process (so a console, samples, a pause...)
export const ACTIVE = new Set(["running", "paused", "in shutdown", "pmsuspended"]);

/** Which actions the state allows (the daemon refuses the others anyway, in libvirt's words). */
function allowed(state) {
  const off = state === "shut off" || state === "crashed";
  return {
    start: off,
    shutdown: state === "running",
    destroy: ACTIVE.has(state),
    reboot: state === "running",
    suspend: state === "running",
    resume: state === "paused",
    clone: off,
    delete: off,
  };
}

const ACTIONS = [
  // verb, label, button class, what the notice says while it runs
  ["start", "Start", "btn-primary", "Starting"],
  ["shutdown", "Shut down", "", "Shutting down (the guest takes its time)"],
  ["destroy", "Force off", "btn-danger", "Forcing off"],
  ["reboot", "Reboot", "", "Rebooting"],
  ["suspend", "Pause", "", "Pausing"],
  ["resume", "Resume", "btn-primary", "Resuming"],
];

export function VmPage({ name, tab }) {
  tab = TABS.some(([t]) => t === tab) ? tab : "overview";
  const [dom, setDom] = useState(null);
  const [missing, setMissing] = useState(false);
  const [loadErr, setLoadErr] = useState("");
  const [busy, setBusy] = useState("");
  const [notice, setNotice] = useState("");
  const [error, setError] = useState("");
  const [dialog, setDialog] = useState(null); // "clone" | "delete" | null
  const [tick, setTick] = useState(0); // bumps on each event about this domain
  const tabRefs = useRef({});
  const seq = useRef(0);
  const writable = canWrite(api.session.current);

  const refresh = useCallback(async () => {
    const mine = ++seq.current; // answers may cross: keep only the newest read
    try {
      const d = await api.get(domPath(name));
      if (mine !== seq.current) return;
      setDom(d);
      setMissing(false);
      setLoadErr("");
    } catch (e) {
      if (mine !== seq.current) return;
      if (e.status === 404) setMissing(true);
      else setLoadErr(errText(e));
    }
  }, [name]);

  useEffect(() => {
    setDom(null);
    setMissing(false);
    setNotice("");
    setError("");
    refresh();
    const offDom = store.subscribe("domain:" + name, () => { refresh(); setTick((n) => n + 1); });
    // after the stream reconnects (a daemon restart) events may have been missed: read again
    const offStream = store.subscribe("stream", () => {
      if (store.streamState === "open") { refresh(); setTick((n) => n + 1); }
    });
    return () => { offDom(); offStream(); };
  }, [name, refresh]);

  useEffect(() => { document.title = `${name} · pyvirt`; }, [name]);
  useEffect(() => {
    // on a phone the tab row scrolls sideways: keep the chosen tab in view
    const el = tabRefs.current[tab];
    if (el && el.scrollIntoView) el.scrollIntoView({ block: "nearest", inline: "nearest" });
  }, [tab, !!dom]);

  async function act(verb, label, doing) {
    setBusy(verb);
    setError("");
    setNotice(`${doing}…`);
    try {
      await api.post(domPath(name, `/${verb}`), verb === "shutdown" ? { timeout: 120 } : {});
      setNotice(`${label}: done.`);
    } catch (e) {
      setNotice("");
      setError(`${label} failed: ${errText(e)}`);
    } finally {
      setBusy("");
      refresh();
    }
  }

  function leaveConsole() {
    const t = tabRefs.current.console;
    if (t) t.focus();
  }

  function onTabKey(ev) {
    const i = TABS.findIndex(([t]) => t === tab);
    let j = null;
    if (ev.key === "ArrowRight") j = (i + 1) % TABS.length;
    else if (ev.key === "ArrowLeft") j = (i - 1 + TABS.length) % TABS.length;
    else if (ev.key === "Home") j = 0;
    else if (ev.key === "End") j = TABS.length - 1;
    if (j === null) return;
    ev.preventDefault();
    const t = TABS[j][0];
    location.hash = `#/vms/${encodeURIComponent(name)}/${t}`;
    requestAnimationFrame(() => tabRefs.current[t] && tabRefs.current[t].focus());
  }

  if (missing) {
    return html`
      <div class="vm-page">
        <h1>${name}</h1>
        <p class="alert alert-error" role="alert">There is no virtual machine named “${name}” (or you may not see it).</p>
        <p><a href="#/vms">Back to the virtual machines</a></p>
      </div>`;
  }

  const state = dom ? dom.state : "";
  const can = allowed(state);
  const active = ACTIVE.has(state);
  // a guest may take its time to shut down (or ignore it): Force off stays available
  const off = !dom || !writable || !!busy;

  return html`
    <div class="vm-page">
      <header class="vm-head">
        <div class="vm-title">
          <p class="vm-crumb"><a href="#/vms">Virtual machines</a> <span aria-hidden="true">›</span></p>
          <h1>${name}</h1>
          <p class="vm-state">
            ${dom ? html`<${StateBadge} state=${dom.state} reason=${dom.reason} withReason=${true} />`
                  : html`<span data-field="state" class="muted">loading…</span>`}
            ${dom && dom.started && active && html` <span class="muted vm-uptime">up <${Uptime} since=${dom.started} /></span>`}
            ${dom && dom.detail && !active && html` <span class="muted vm-detail">${dom.detail}</span>`}
          </p>
        </div>
        <div class="vm-actions" role="toolbar" aria-label="Actions">
          ${ACTIONS.map(([verb, label, cls, doing]) => html`
            <button type="button" class=${"btn " + cls}
                    disabled=${!dom || !writable || !can[verb] || (busy && !(verb === "destroy" && busy === "shutdown"))}
                    aria-busy=${busy === verb ? "true" : undefined}
                    onClick=${() => act(verb, label, doing)}>${label}</button>`)}
          <button type="button" class="btn" disabled=${off || !can.clone}
                  onClick=${() => setDialog("clone")}>Clone</button>
          <button type="button" class="btn btn-danger" disabled=${off || !can.delete}
                  onClick=${() => setDialog("delete")}>Delete</button>
        </div>
      </header>
      <p class="vm-notice" role="status">${notice}</p>
      ${(error || loadErr) && html`<p class="alert alert-error" role="alert">${error || loadErr}</p>`}

      <div class="vm-tabs" role="tablist" aria-label="Virtual machine" onKeyDown=${onTabKey}>
        ${TABS.map(([t, label]) => html`
          <a role="tab" id=${"tab-" + t} href=${`#/vms/${encodeURIComponent(name)}/${t}`}
             aria-selected=${t === tab ? "true" : "false"} aria-controls="vm-tabpanel"
             tabindex=${t === tab ? "0" : "-1"}
             ref=${(el) => { tabRefs.current[t] = el; }}>${label}</a>`)}
      </div>
      <div class="vm-panel" role="tabpanel" id="vm-tabpanel" aria-labelledby=${"tab-" + tab}>
        ${!dom ? html`<p class="muted">Loading…</p>`
          : tab === "overview" ? html`<${Overview} dom=${dom} writable=${writable} onChanged=${refresh} />`
          : tab === "console" ? html`<${ConsolePanel} name=${name} active=${active} writable=${writable} onLeave=${leaveConsole} />`
          : tab === "graphs" ? html`<${GraphsPanel} name=${name} dom=${dom} />`
          : tab === "disks" ? html`<${DisksPanel} name=${name} dom=${dom} writable=${writable} onChanged=${refresh} />`
          : tab === "network" ? html`<${NicsPanel} name=${name} dom=${dom} writable=${writable} onChanged=${refresh} />`
          : tab === "snapshots" ? html`<${SnapshotsPanel} name=${name} dom=${dom} writable=${writable} tick=${tick} />`
          : html`<${TasksPanel} name=${name} />`}
      </div>
      ${dialog === "clone" && html`<${CloneDialog} name=${name} onClose=${() => setDialog(null)} />`}
      ${dialog === "delete" && html`<${DeleteDialog} name=${name} onClose=${() => setDialog(null)} />`}
    </div>`;
}

/** Time since `since` (unix seconds), ticking each second while shown. */
function Uptime({ since }) {
  const [now, setNow] = useState(Date.now() / 1000);
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now() / 1000), 1000);
    return () => clearInterval(t);
  }, []);
  return html`<span data-field="uptime">${fmtDuration(now - since)}</span>`;
}

// ---------------------------------------------------------------- overview

function Overview({ dom, writable, onChanged }) {
  const [err, setErr] = useState("");
  const def = dom.definition || {};
  const disks = def.disks || [];
  const nics = def.nics || [];
  const mem = memBytes(dom.memory);
  const active = ACTIVE.has(dom.state);

  async function setAutostart(ev) {
    setErr("");
    try {
      await api.put(domPath(dom.name, "/autostart"), { enabled: ev.currentTarget.checked });
    } catch (e) {
      setErr(errText(e));
    }
    onChanged();
  }

  return html`
    <div class="overview">
      <section class="card" aria-labelledby="ov-state">
        <h2 id="ov-state">State</h2>
        <dl class="facts">
          <dt>State</dt><dd>${dom.reason ? `${dom.state} (${dom.reason})` : dom.state}</dd>
          ${dom.detail && html`<dt>Detail</dt><dd>${dom.detail}</dd>`}
          <dt>Uptime</dt><dd>${active && dom.started ? html`<${Uptime} since=${dom.started} />` : "–"}</dd>
          ${active && dom.started && html`<dt>Started</dt><dd>${fmtTime(dom.started)}</dd>`}
          ${active && dom.pid && html`<dt>VMM process</dt><dd>${dom.pid}</dd>`}
          <dt>Current snapshot</dt><dd>${dom.current_snapshot || "none"}${dom.snapshots ? ` (${dom.snapshots} in all)` : ""}</dd>
          ${dom.managed_save && html`<dt>Saved state</dt><dd>the next start restores it</dd>`}
        </dl>
      </section>
      ${active && html`<${LiveFigures} name=${dom.name} memory=${mem} />`}
      <section class="card" aria-labelledby="ov-config">
        <h2 id="ov-config">Configuration</h2>
        <dl class="facts">
          <dt>CPUs</dt><dd>${dom.cpus}</dd>
          <dt>Memory</dt><dd>${mem !== null ? fmtBytes(mem, 0) : String(dom.memory)}</dd>
          <dt>Boots</dt><dd>${def.kernel ? html`kernel <code>${def.kernel}</code>` : "the default guest"}</dd>
          <dt>Disks</dt><dd>${disks.length ? html`<ul class="plain">${disks.map((d, i) => html`
              <li key=${i}><code>${d.volume || d.path}</code>${d.readonly ? " (read-only)" : ""}</li>`)}</ul>` : "none"}</dd>
          <dt>Network</dt><dd>${nics.length ? html`<ul class="plain">${nics.map((n, i) => html`
              <li key=${i}>${n.network ? `network ${n.network}` : n.kind || "interface"}${n.mac ? html` <code>${n.mac}</code>` : ""}</li>`)}</ul>`
              : "none"}</dd>
          <dt>Description</dt><dd>${dom.description || "–"}</dd>
          <dt>UUID</dt><dd><code>${dom.uuid}</code></dd>
        </dl>
        <p>
          <label class="check">
            <input type="checkbox" checked=${!!dom.autostart} disabled=${!writable} onChange=${setAutostart} />
            Start with the daemon (autostart)
          </label>
        </p>
        ${err && html`<p role="alert" class="alert alert-error">${err}</p>`}
      </section>
    </div>`;
}

/** The latest sample of each figure with a sparkline of the last two minutes. */
function LiveFigures({ name, memory }) {
  const st = useStore("metrics");
  const s = st.vm.get(name);
  const n = s ? s.t.length : 0;
  const rows = [
    ["CPU", "cpu", fmtPct, 1],
    ["Memory", "rss", (v) => fmtBytes(v), memory],
    ["Disk read", "disk_rd", fmtRate, null],
    ["Disk write", "disk_wr", fmtRate, null],
    ["Network in", "net_rx", fmtRate, null],
    ["Network out", "net_tx", fmtRate, null],
  ];
  return html`
    <section class="card" aria-labelledby="ov-now">
      <h2 id="ov-now">Now</h2>
      ${n === 0 ? html`<p class="muted">Waiting for the first sample…</p>` : html`
        <dl class="facts live-figures">
          ${rows.map(([label, key, fmt, max]) => html`
            <dt>${label}</dt>
            <dd><span class="live-value">${fmt(s[key][n - 1])}</span>
              <${Sparkline} values=${s[key]} max=${max} label=${`${label} over the last samples`}
                            field=${"spark-" + key} /></dd>`)}
        </dl>`}
      <p><a href=${`#/vms/${encodeURIComponent(name)}/graphs`}>All graphs</a></p>
    </section>`;
}

// ---------------------------------------------------------------- graphs

const GRAPHS = [
  { chart: "cpu", title: "CPU", keys: ["cpu"], labels: ["CPU (share of one core)"], format: fmtPct, yMax: () => 1 },
  { chart: "memory", title: "Memory", keys: ["rss"], labels: ["Resident memory"], format: fmtBytes,
    yMax: (dom) => memBytes(dom.memory) },
  { chart: "disk", title: "Disk I/O", keys: ["disk_rd", "disk_wr"], labels: ["Read", "Write"], format: fmtRate,
    yMax: () => null },
  { chart: "net", title: "Network I/O", keys: ["net_rx", "net_tx"], labels: ["Received", "Sent"], format: fmtRate,
    yMax: () => null },
];

/** The domain's samples come from the store: its history, then the app's one metrics stream. */
function GraphsPanel({ name, dom }) {
  const st = useStore("metrics");
  const series = st.vm.get(name);
  const last = series && series.t.length ? series.t.length - 1 : -1;
  return html`
    <div class="graphs">
      ${!ACTIVE.has(dom.state) && html`<p class="muted">The virtual machine is not running: no new samples.</p>`}
      ${st.metricsAvailable === false && html`<p class="muted">This daemon does not sample its virtual machines.</p>`}
      <div class="chart-grid">
        ${GRAPHS.map((g) => html`
          <section class="chart-card" key=${g.chart} aria-labelledby=${"graph-" + g.chart}>
            <h2 id=${"graph-" + g.chart}>${g.title}</h2>
            <p class="chart-now">${g.keys.map((k, i) => html`
              <span>${g.labels[i]}: <strong>${last >= 0 ? g.format(series[k][last]) : "–"}</strong></span> `)}</p>
            <${TimeChart} chart=${g.chart} label=${`${g.title} of ${name}`}
              series=${g.labels.map((label) => ({ label }))}
              data=${series ? [series.t, ...g.keys.map((k) => series[k])] : null}
              format=${g.format} yMax=${g.yMax(dom)} />
          </section>`)}
      </div>
    </div>`;
}

// ---------------------------------------------------------------- dialogs

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

function CloneDialog({ name, onClose }) {
  const [newName, setNewName] = useState(`${name}-clone`);
  const [desc, setDesc] = useState("");
  const [err, setErr] = useState("");
  const [progress, setProgress] = useState(null);

  async function submit(ev) {
    ev.preventDefault();
    setErr("");
    if (!NAME_RE.test(newName)) {
      setErr("Letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit.");
      return;
    }
    try {
      const body = { name: newName };
      if (desc) body.description = desc;
      const r = await api.post(domPath(name, "/clone"), body);
      setProgress(0);
      await api.waitTask(r.task, (f) => setProgress(f));
      toast(`${name} cloned to ${newName}.`);
      onClose();
      location.hash = `#/vms/${encodeURIComponent(newName)}`;
    } catch (e) {
      setProgress(null);
      setErr(errText(e));
    }
  }

  return html`
    <${Dialog} title=${`Clone ${name}`} onClose=${onClose}>
      <form onSubmit=${submit} novalidate>
        <p>A full copy of its disks, with a new identity (UUID and MAC addresses).</p>
        <div class="field">
          <label for="clone-name">New name</label>
          <input id="clone-name" value=${newName} autocomplete="off" required
                 aria-invalid=${err ? "true" : "false"} aria-describedby="clone-err"
                 onInput=${(e) => setNewName(e.currentTarget.value)} />
          <span id="clone-err" class="field-error" data-error-for="name">${err}</span>
        </div>
        <div class="field">
          <label for="clone-desc">Description</label>
          <input id="clone-desc" value=${desc} onInput=${(e) => setDesc(e.currentTarget.value)} />
        </div>
        ${progress !== null && html`<progress max="1" value=${progress} aria-label="Clone progress"></progress>`}
        <div class="row-actions">
          <button type="submit" class="btn btn-primary" disabled=${progress !== null}>Clone</button>
          <button type="button" class="btn" onClick=${onClose}>Cancel</button>
        </div>
      </form>
    <//>`;
}

function DeleteDialog({ name, onClose }) {
  const [storage, setStorage] = useState(false);
  const [err, setErr] = useState("");
  const [busy, setBusy] = useState(false);

  async function submit(ev) {
    ev.preventDefault();
    setErr("");
    setBusy(true);
    try {
      await api.del(domPath(name, storage ? "?remove_storage=true" : ""));
      toast(`${name} deleted${storage ? " with its disks" : ""}.`);
      onClose();
      location.hash = "#/vms";
    } catch (e) {
      setErr(errText(e));
      setBusy(false);
    }
  }

  return html`
    <${Dialog} title=${`Delete ${name}?`} onClose=${onClose}>
      <form onSubmit=${submit}>
        <p>Its definition and its snapshots are removed. This cannot be undone.</p>
        <label class="check">
          <input type="checkbox" checked=${storage} onChange=${(e) => setStorage(e.currentTarget.checked)} />
          Also delete its disks
        </label>
        ${err && html`<p class="alert alert-error" role="alert">${err}</p>`}
        <div class="row-actions">
          <button type="submit" class="btn btn-danger" disabled=${busy}>Delete</button>
          <button type="button" class="btn" onClick=${onClose}>Cancel</button>
        </div>
      </form>
    <//>`;
}
