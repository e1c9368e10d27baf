// The Disks and Network tabs: the definition's disks and NICs, add / remove / resize
// (grow) disks, add / remove NICs. These are definition edits: a running VM gets them
// at its next start, and the page says so.

import { useEffect, useState } from "preact/hooks";
import { api } from "./api.js";
import { Dialog, fmtBytes, html, toast } from "./ui.js";
import { domPath, errText } from "./vmutil.js";

const GIB = 1024 ** 3;
const ACTIVE = new Set(["running", "paused", "in shutdown", "pmsuspended"]);

/** The guest's name for disk i (vda, vdb, ... vdz, vdaa): as the daemon's disk_target. */
export function diskTarget(i) {
  let s = "";
  let n = i;
  do {
    s = String.fromCharCode(97 + (n % 26)) + s;
    n = Math.floor(n / 26) - 1;
  } while (n >= 0);
  return "vd" + s;
}

function appliesText(applies, what) {
  return applies === "next-start" ? `${what}: applies at the next start.` : `${what}.`;
}

function NextStartNote({ dom }) {
  if (!ACTIVE.has(dom.state)) return null;
  return html`<p class="alert alert-info">The virtual machine is running: changes here apply at its next start.</p>`;
}

// ---------------------------------------------------------------- disks

export function DisksPanel({ name, dom, writable, onChanged }) {
  const disks = (dom.definition && dom.definition.disks) || [];
  const [sizes, setSizes] = useState({}); // index -> capacity bytes (volume disks)
  const [pools, setPools] = useState(null);
  const [pool, setPool] = useState("");
  const [sizeGiB, setSizeGiB] = useState("1");
  const [errs, setErrs] = useState({}); // field -> message
  const [err, setErr] = useState("");
  const [notice, setNotice] = useState("");
  const [busy, setBusy] = useState(false);
  const [resizing, setResizing] = useState(null); // index
  const [removing, setRemoving] = useState(null); // index
  const [gen, setGen] = useState(0); // bumped when sizes may have changed
  const running = ACTIVE.has(dom.state);

  useEffect(() => {
    let live = true;
    api.get("/v1/pools").then((ps) => {
      if (!live) return;
      const usable = ps.filter((p) => p.active !== false && p.state !== "inactive");
      setPools(usable);
      if (usable.length && !pool) setPool(usable[0].name);
    }).catch(() => live && setPools([]));
    return () => { live = false; };
  }, []);

  // capacities of volume disks (a path disk has none we may ask for)
  const key = JSON.stringify(disks);
  useEffect(() => {
    let live = true;
    disks.forEach((d, i) => {
      if (!d.volume || !d.volume.includes("/")) return;
      const [p, v] = d.volume.split("/", 2);
      api.get(`/v1/pools/${encodeURIComponent(p)}/volumes/${encodeURIComponent(v)}`)
        .then((vol) => live && setSizes((s) => ({ ...s, [i]: vol.capacity })))
        .catch(() => {});
    });
    return () => { live = false; };
  }, [key, gen]);

  async function add(ev) {
    ev.preventDefault();
    setErr("");
    setNotice("");
    const e = {};
    const gib = Number(sizeGiB);
    if (!pool) e.pool = "Choose a storage pool.";
    if (!(gib > 0) || gib > 65536) e.size_bytes = "A size from 0.1 to 65536 GiB.";
    setErrs(e);
    if (Object.keys(e).length) return;
    setBusy(true);
    try {
      const r = await api.post(domPath(name, "/disks"),
                               { pool, size_bytes: Math.round(gib * GIB), format: "qcow2" });
      setNotice(appliesText(r && r.applies, `Disk ${diskTarget(r ? r.index : disks.length)} added`));
    } catch (ex) {
      if (ex.field === "pool" || ex.field === "size_bytes") setErrs({ [ex.field]: errText(ex) });
      else setErr(errText(ex));
    } finally {
      setBusy(false);
      onChanged();
    }
  }

  return html`
    <div class="devices">
      <${NextStartNote} dom=${dom} />
      <p role="status" class="vm-notice">${notice}</p>
      ${err && html`<p role="alert" class="alert alert-error">${err}</p>`}
      <div class="table-wrap">
        <table class="dev-table">
          <caption>Disks</caption>
          <thead><tr><th scope="col">Device</th><th scope="col">Source</th><th scope="col">Size</th>
            <th scope="col"><span class="sr-only">Actions</span></th></tr></thead>
          <tbody>
            ${disks.length === 0 && html`<tr><td colspan="4" class="muted">No disks.</td></tr>`}
            ${disks.map((d, i) => html`
              <tr key=${i} data-disk=${i}>
                <th scope="row">${diskTarget(i)}</th>
                <td><code>${d.volume || d.path}</code>${d.readonly ? " (read-only)" : ""}
                  ${d.volume ? html` <span class="muted">volume</span>` : html` <span class="muted">file</span>`}</td>
                <td>${sizes[i] !== undefined ? fmtBytes(sizes[i]) : "–"}</td>
                <td><div class="row-actions">
                  <button type="button" class="btn btn-small" disabled=${!writable || busy || running || !d.volume}
                          title=${running ? "Shut the virtual machine off to resize its disk" : undefined}
                          aria-describedby=${"disk-" + i}
                          onClick=${() => setResizing(i)}>Resize</button>
                  <button type="button" class="btn btn-small btn-danger" disabled=${!writable || busy}
                          onClick=${() => setRemoving(i)}>Remove</button>
                  <span id=${"disk-" + i} class="sr-only">disk ${diskTarget(i)}</span>
                </div></td>
              </tr>`)}
          </tbody>
        </table>
      </div>
      ${running && html`<p class="muted">Disks are resized while the virtual machine is off.</p>`}

      <form class="inline-form" onSubmit=${add} novalidate>
        <h2>Add a disk</h2>
        <p class="muted">A new qcow2 volume in a storage pool.</p>
        <div class="field">
          <label for="disk-pool">Pool</label>
          <select id="disk-pool" value=${pool} disabled=${!pools || pools.length === 0}
                  aria-invalid=${errs.pool ? "true" : "false"} aria-describedby="disk-pool-err"
                  onChange=${(e) => setPool(e.currentTarget.value)}>
            ${pools === null ? html`<option value="">loading…</option>`
              : pools.length === 0 ? html`<option value="">no storage pool</option>`
              : pools.map((p) => html`<option value=${p.name}>${p.name}</option>`)}
          </select>
          <span id="disk-pool-err" class="field-error" data-error-for="pool">${errs.pool || ""}</span>
        </div>
        <div class="field">
          <label for="disk-size">Size (GiB)</label>
          <input id="disk-size" type="number" min="0.1" step="0.1" inputmode="decimal" value=${sizeGiB}
                 aria-invalid=${errs.size_bytes ? "true" : "false"} aria-describedby="disk-size-err"
                 onInput=${(e) => setSizeGiB(e.currentTarget.value)} />
          <span id="disk-size-err" class="field-error" data-error-for="size_bytes">${errs.size_bytes || ""}</span>
        </div>
        <button type="submit" class="btn btn-primary" disabled=${!writable || busy}>Add disk</button>
      </form>

      ${resizing !== null && html`<${ResizeDialog} name=${name} index=${resizing}
          current=${sizes[resizing]} onClose=${() => setResizing(null)}
          onDone=${(msg) => { setResizing(null); setNotice(msg); setGen((g) => g + 1); onChanged(); }} />`}
      ${removing !== null && html`<${RemoveDiskDialog} name=${name} index=${removing}
          disk=${disks[removing]} onClose=${() => setRemoving(null)}
          onDone=${(msg) => { setRemoving(null); setNotice(msg); setSizes({}); setGen((g) => g + 1); onChanged(); }} />`}
    </div>`;
}

function ResizeDialog({ name, index, current, onClose, onDone }) {
  const cur = current ? current / GIB : null;
  const [gib, setGib] = useState(cur ? String(Math.ceil(cur * 10 + 1) / 10) : "");
  const [err, setErr] = useState("");
  const [busy, setBusy] = useState(false);

  async function submit(ev) {
    ev.preventDefault();
    const n = Number(gib);
    const bytes = Math.round(n * GIB);
    if (!(n > 0)) { setErr("A size in GiB."); return; }
    if (current && bytes <= current) { setErr(`Grow only: more than ${fmtBytes(current)}.`); return; }
    setBusy(true);
    setErr("");
    try {
      await api.post(domPath(name, `/disks/${index}/resize`), { size_bytes: bytes });
      onDone(`Disk ${diskTarget(index)} is now ${fmtBytes(bytes)}.`);
    } catch (e) {
      setErr(errText(e));
      setBusy(false);
    }
  }

  return html`
    <${Dialog} title=${`Resize disk ${diskTarget(index)}`} onClose=${onClose}>
      <form onSubmit=${submit} novalidate>
        <p>Disks only grow; the guest sees the new size at its next boot${current ? html` (now ${fmtBytes(current)})` : ""}.</p>
        <div class="field">
          <label for="resize-gib">New size (GiB)</label>
          <input id="resize-gib" type="number" step="0.1" min="0.1" value=${gib}
                 aria-invalid=${err ? "true" : "false"} aria-describedby="resize-err"
                 onInput=${(e) => setGib(e.currentTarget.value)} />
          <span id="resize-err" class="field-error" data-error-for="size_bytes">${err}</span>
        </div>
        <div class="row-actions">
          <button type="submit" class="btn btn-primary" disabled=${busy}>Resize</button>
          <button type="button" class="btn" onClick=${onClose}>Cancel</button>
        </div>
      </form>
    <//>`;
}

function RemoveDiskDialog({ name, index, disk, onClose, onDone }) {
  const [storage, setStorage] = useState(false);
  const [err, setErr] = useState("");
  const [busy, setBusy] = useState(false);

  async function submit(ev) {
    ev.preventDefault();
    setBusy(true);
    setErr("");
    try {
      await api.del(domPath(name, `/disks/${index}${storage ? "?remove_storage=true" : ""}`));
      onDone(`Disk ${diskTarget(index)} removed${storage ? " with its volume" : ""}.`);
    } catch (e) {
      setErr(errText(e));
      setBusy(false);
    }
  }

  return html`
    <${Dialog} title=${`Remove disk ${diskTarget(index)}?`} onClose=${onClose}>
      <form onSubmit=${submit}>
        <p>It is detached from the definition: <code>${disk && (disk.volume || disk.path)}</code>.</p>
        ${disk && disk.volume && html`
          <label class="check">
            <input type="checkbox" checked=${storage} onChange=${(e) => setStorage(e.currentTarget.checked)} />
            Also delete its volume
          </label>`}
        ${err && html`<p class="alert alert-error" role="alert">${err}</p>`}
        <div class="row-actions">
          <button type="submit" class="btn btn-danger" disabled=${busy}>Remove</button>
          <button type="button" class="btn" onClick=${onClose}>Cancel</button>
        </div>
      </form>
    <//>`;
}

// ---------------------------------------------------------------- NICs

export function NicsPanel({ name, dom, writable, onChanged }) {
  const [nics, setNics] = useState(null);
  const [nets, setNets] = useState(null);
  const [net, setNet] = useState("");
  const [mac, setMac] = useState("");
  const [errs, setErrs] = useState({});
  const [err, setErr] = useState("");
  const [notice, setNotice] = useState("");
  const [busy, setBusy] = useState(false);
  const [removing, setRemoving] = useState(null);

  const key = JSON.stringify((dom.definition && dom.definition.nics) || []) + dom.state;
  useEffect(() => {
    let live = true;
    api.get(domPath(name, "/interfaces")).then((l) => live && setNics(l))
      .catch((e) => live && setErr(errText(e)));
    return () => { live = false; };
  }, [name, key]);

  useEffect(() => {
    let live = true;
    api.get("/v1/networks").then((ns) => {
      if (!live) return;
      setNets(ns);
      if (ns.length && !net) setNet(ns[0].name);
    }).catch(() => live && setNets([]));
    return () => { live = false; };
  }, []);

  async function add(ev) {
    ev.preventDefault();
    setErr("");
    setNotice("");
    const e = {};
    if (!net) e.network = "Choose a network.";
    if (mac && !/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/i.test(mac)) e.mac = "Six hex pairs: 52:54:00:12:34:56.";
    setErrs(e);
    if (Object.keys(e).length) return;
    setBusy(true);
    try {
      const body = { network: net };
      if (mac) body.mac = mac.toLowerCase();
      const r = await api.post(domPath(name, "/interfaces"), body);
      setNotice(appliesText(r && r.applies, `Interface ${r && r.mac ? r.mac : ""} added`));
      setMac("");
    } catch (ex) {
      if (ex.field === "network" || ex.field === "mac") setErrs({ [ex.field]: errText(ex) });
      else setErr(errText(ex));
    } finally {
      setBusy(false);
      onChanged();
    }
  }

  async function remove() {
    const i = removing;
    setRemoving(null);
    setBusy(true);
    setErr("");
    try {
      await api.del(domPath(name, `/interfaces/${i}`));
      setNotice(ACTIVE.has(dom.state) ? `Interface ${i} removed: applies at the next start.`
                                      : `Interface ${i} removed.`);
      toast(`Interface ${i} of ${name} removed.`);
    } catch (ex) {
      setErr(errText(ex));
    } finally {
      setBusy(false);
      onChanged();
    }
  }

  return html`
    <div class="devices">
      <${NextStartNote} dom=${dom} />
      <p role="status" class="vm-notice">${notice}</p>
      ${err && html`<p role="alert" class="alert alert-error">${err}</p>`}
      <div class="table-wrap">
        <table class="dev-table">
          <caption>Network interfaces</caption>
          <thead><tr><th scope="col">#</th><th scope="col">Connected to</th><th scope="col">MAC address</th>
            <th scope="col">Host device</th><th scope="col"><span class="sr-only">Actions</span></th></tr></thead>
          <tbody>
            ${nics === null && html`<tr><td colspan="5" class="muted">Loading…</td></tr>`}
            ${nics !== null && nics.length === 0 && html`<tr><td colspan="5" class="muted">No network interfaces.</td></tr>`}
            ${(nics || []).map((n, i) => html`
              <tr key=${i} data-nic=${i}>
                <th scope="row">${i}</th>
                <td>${n.type === "network" ? html`network <strong>${n.source}</strong>` : `${n.type}${n.source && n.source !== "-" ? " " + n.source : ""}`}</td>
                <td><code>${n.mac}</code></td>
                <td>${n.interface && n.interface !== "-" ? html`<code>${n.interface}</code>` : "–"}</td>
                <td><div class="row-actions">
                  <button type="button" class="btn btn-small btn-danger" disabled=${!writable || busy}
                          aria-describedby=${"nic-" + i} onClick=${() => setRemoving(i)}>Remove</button>
                  <span id=${"nic-" + i} class="sr-only">interface ${i} (${n.mac})</span>
                </div></td>
              </tr>`)}
          </tbody>
        </table>
      </div>

      <form class="inline-form" onSubmit=${add} novalidate>
        <h2>Add a network interface</h2>
        <div class="field">
          <label for="nic-net">Network</label>
          <select id="nic-net" value=${net} disabled=${!nets || nets.length === 0}
                  aria-invalid=${errs.network ? "true" : "false"} aria-describedby="nic-net-err"
                  onChange=${(e) => setNet(e.currentTarget.value)}>
            ${nets === null ? html`<option value="">loading…</option>`
              : nets.length === 0 ? html`<option value="">no network defined</option>`
              : nets.map((n) => html`<option value=${n.name}>${n.name}</option>`)}
          </select>
          <span id="nic-net-err" class="field-error" data-error-for="network">${errs.network || ""}</span>
        </div>
        <div class="field">
          <label for="nic-mac">MAC address (optional)</label>
          <input id="nic-mac" value=${mac} autocomplete="off" placeholder="generated when empty"
                 aria-invalid=${errs.mac ? "true" : "false"} aria-describedby="nic-mac-err"
                 onInput=${(e) => setMac(e.currentTarget.value.trim())} />
          <span id="nic-mac-err" class="field-error" data-error-for="mac">${errs.mac || ""}</span>
        </div>
        <button type="submit" class="btn btn-primary" disabled=${!writable || busy || !nets || nets.length === 0}>Add interface</button>
      </form>

      ${removing !== null && html`
        <${Dialog} title=${`Remove interface ${removing}?`} onClose=${() => setRemoving(null)}>
          <p>The virtual machine loses this network interface${ACTIVE.has(dom.state) ? " at its next start" : ""}.</p>
          <div class="row-actions">
            <button type="button" class="btn btn-danger" onClick=${remove}>Remove</button>
            <button type="button" class="btn" onClick=${() => setRemoving(null)}>Cancel</button>
          </div>
        <//>`}
    </div>`;
}
