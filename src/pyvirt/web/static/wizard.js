// The create wizard: one form that cannot produce a broken VM. Checked in the page
// first; then, as `pyvirt create` does, the new volumes are made (tasks, followed),
// the domain defined (with a fresh uuid, so an existing name is refused rather than
// replaced), and started on request. An API error is shown next to the field it names;
// volumes made for a definition that was then refused are removed again.
import { useEffect, useRef, useState } from "preact/hooks";
import { api, ApiError } from "./api.js";
import { html, fmtBytes, toast } from "./ui.js";

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const MiB = 1048576, GiB = 1073741824;
const MAX_DISKS = 24;

function newUuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const x = [...b].map((v) => v.toString(16).padStart(2, "0")).join("");
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

const errId = (field) => "err-" + field.replace(/[^A-Za-z0-9_-]/g, "_");

function FieldError({ field, errors }) {
  const msg = errors[field];
  return html`<p class="field-error" id=${errId(field)} data-error-for=${field} hidden=${!msg}>${msg || ""}</p>`;
}

/** Props for an input that has an error slot: aria-invalid + aria-describedby. */
const errAttrs = (field, errors, hint) => ({
  "aria-invalid": errors[field] ? "true" : undefined,
  "aria-describedby": [errors[field] ? errId(field) : null, hint].filter(Boolean).join(" ") || undefined,
});

function Radio({ name, value, checked, onChange, label, disabled, hint }) {
  const id = `${name}-${value}`;
  return html`<div class=${"radio" + (disabled ? " disabled" : "")}>
    <input type="radio" id=${id} name=${name} value=${value} checked=${checked} disabled=${disabled}
      aria-describedby=${hint ? id + "-hint" : undefined} onChange=${() => onChange(value)} />
    <label for=${id}>${label}</label>
    ${hint ? html`<span class="hint" id=${id + "-hint"}>${hint}</span>` : null}
  </div>`;
}

export function Wizard({ session }) {
  const [name, setName] = useState("");
  const [description, setDescription] = useState("");
  const [boot, setBoot] = useState("default");
  const [kernel, setKernel] = useState("");
  const [initrd, setInitrd] = useState("");
  const [cmdline, setCmdline] = useState("");
  const [imgPool, setImgPool] = useState("");
  const [imgVol, setImgVol] = useState("");
  const [imgMode, setImgMode] = useState("copy");
  const [cpus, setCpus] = useState("1");
  const [memory, setMemory] = useState("512");
  const [accel, setAccel] = useState("auto");
  const [disks, setDisks] = useState([]); // [{key, pool, size}]
  const [network, setNetwork] = useState("");
  const [autostart, setAutostart] = useState(false);
  const [errors, setErrors] = useState({});
  const [busy, setBusy] = useState(null); // progress text while creating
  const [host, setHost] = useState(null);
  const [pools, setPools] = useState(null);
  const [volumes, setVolumes] = useState(null);
  const [networks, setNetworks] = useState(null);
  const diskKey = useRef(0);
  const formRef = useRef(null);
  const isAdmin = session && session.role === "admin";

  useEffect(() => {
    document.title = "New virtual machine · pyvirt";
    api.get("/v1/host").then(setHost).catch(() => setHost(false));
    api.get("/v1/pools").then((ps) => {
      setPools(ps);
      const def = ps.find((p) => p.name === "default" && p.state === "active") || ps.find((p) => p.state === "active");
      if (def) setImgPool(def.name);
    }).catch(() => setPools([]));
    api.get("/v1/networks").then((ns) => {
      setNetworks(ns);
      const def = ns.find((n) => n.name === "default" && n.state === "active");
      if (def) setNetwork(def.name);
    }).catch(() => setNetworks([]));
  }, []);

  useEffect(() => {
    if (boot !== "disk" || !imgPool) return;
    let live = true;
    setVolumes(null);
    api.get(`/v1/pools/${encodeURIComponent(imgPool)}/volumes`).then((vs) => {
      if (!live) return;
      setVolumes(vs);
      setImgVol((v) => (vs.some((x) => x.name === v) ? v : vs.length ? vs[0].name : ""));
    }).catch(() => live && setVolumes([]));
    return () => { live = false; };
  }, [boot, imgPool]);

  const limits = host && host.limits ? host.limits : null;
  // per accelerator: the software CPU runs fewer vCPUs than KVM ("auto" is what this host gives)
  const byAccel = limits && limits.max_vcpus_by_accel ? limits.max_vcpus_by_accel : null;
  const maxCpus = byAccel && byAccel[accel] !== undefined ? byAccel[accel]
    : limits ? limits.max_vcpus : (host ? host.cpus : 255);
  const accelNote = accel === "emu" || (accel === "auto" && limits && limits.accel_auto === "emu")
    ? " with the software CPU" : "";
  const maxMem = limits ? limits.max_memory_mib : null;
  const activePools = (pools || []).filter((p) => p.state === "active");
  const firstDiskIndex = boot === "disk" ? 1 : 0;

  const addDisk = () => {
    if (disks.length + firstDiskIndex >= MAX_DISKS) return;
    const def = activePools.find((p) => p.name === "default") || activePools[0];
    setDisks([...disks, { key: ++diskKey.current, pool: def ? def.name : "", size: "10" }]);
  };
  const setDisk = (i, patch) => setDisks(disks.map((d, j) => (j === i ? { ...d, ...patch } : d)));
  const removeDisk = (i) => setDisks(disks.filter((_, j) => j !== i));

  /** The page's own checks: {field: message}. */
  const check = () => {
    const e = {};
    const n = name.trim();
    if (!n) e.name = "Enter a name.";
    else if (!NAME_RE.test(n)) e.name = "1–64 letters, digits, '.', '_' or '-', starting with a letter or digit.";
    if (description.length > 1024) e.description = "At most 1024 characters.";
    const c = Number(cpus);
    if (!Number.isInteger(c) || c < 1) e.cpus = "At least 1 CPU.";
    else if (maxCpus === 0) e.accel = "KVM is not available to this host's VMs.";
    else if (maxCpus && c > maxCpus) e.cpus = `At most ${maxCpus} CPU${maxCpus === 1 ? "" : "s"}${accelNote} on this host.`;
    const m = Number(memory);
    if (!Number.isInteger(m) || m < 16) e.memory = "At least 16 MiB.";
    else if (m % 2) e.memory = "A multiple of 2 MiB.";
    else if (maxMem && m > maxMem) e.memory = `At most ${maxMem} MiB on this host.`;
    if (boot === "kernel") {
      if (!kernel.trim()) e.kernel = "Enter the kernel's path on the host.";
      else if (!kernel.trim().startsWith("/")) e.kernel = "An absolute path (starting with /).";
      if (initrd.trim() && !initrd.trim().startsWith("/")) e.initrd = "An absolute path (starting with /).";
    }
    if (boot === "disk") {
      if (!imgPool) e["disks[0].pool"] = "Choose a pool.";
      else if (!imgVol) e["disks[0].volume"] = "Choose a volume.";
    }
    disks.forEach((d, i) => {
      const k = i + firstDiskIndex;
      if (!d.pool) e[`disks[${k}].pool`] = "Choose a pool.";
      const s = Number(d.size);
      if (!(s > 0)) e[`disks[${k}].size`] = "A size above 0 GiB.";
      else if (s > 65536) e[`disks[${k}].size`] = "At most 65536 GiB.";
    });
    return e;
  };

  const showErrors = (e) => {
    setErrors(e);
    // Focus the first field in error (keyboard and screen-reader users land on it).
    requestAnimationFrame(() => {
      const first = formRef.current && formRef.current.querySelector('[aria-invalid="true"]');
      if (first) first.focus();
      else { const a = formRef.current && formRef.current.querySelector(".form-errors"); if (a) a.focus(); }
    });
  };

  const submit = async (start) => {
    const e = check();
    if (Object.keys(e).length) { showErrors(e); return; }
    setErrors({});
    const n = name.trim();
    const made = []; // [pool, volume] made here: removed again if the definition fails
    const taken = new Set();
    const volName = (ext) => {
      for (let i = 0; ; i++) {
        const cand = i === 0 ? `${n}.${ext}` : `${n}-${i}.${ext}`;
        if (!taken.has(cand)) { taken.add(cand); return cand; }
      }
    };
    const doc = { name: n, uuid: newUuid(), cpus: Number(cpus), memory: Number(memory) * MiB, autostart };
    if (description.trim()) doc.description = description.trim();
    if (accel !== "auto") doc.accel = accel;
    if (boot === "kernel") {
      doc.kernel = kernel.trim();
      if (initrd.trim()) doc.initrd = initrd.trim();
      if (cmdline.trim()) doc.cmdline = cmdline.trim();
    }
    doc.disks = [];
    doc.nics = network ? [{ network }] : [];
    let stage = "volumes";
    try {
      if (boot === "disk") {
        const src = (volumes || []).find((v) => v.name === imgVol);
        const vol = volName(imgMode === "overlay" || (src && src.format === "qcow2") ? "qcow2" : "img");
        setBusy(imgMode === "overlay" ? "Creating the overlay…" : "Copying the image…");
        const t = await api.post(`/v1/pools/${encodeURIComponent(imgPool)}/volumes/${encodeURIComponent(imgVol)}/clone`,
          { name: vol, mode: imgMode }).catch((x) => { throw tag(x, 0); });
        made.push([imgPool, vol]);
        await api.waitTask(t.task, (f) => setBusy(`${imgMode === "overlay" ? "Creating the overlay" : "Copying the image"}… ${Math.round(f * 100)} %`))
          .catch((x) => { throw tag(x, 0); });
        doc.disks.push({ volume: `${imgPool}/${vol}` });
      }
      for (let i = 0; i < disks.length; i++) {
        const d = disks[i];
        const k = i + firstDiskIndex;
        const vol = volName("qcow2");
        setBusy(`Creating disk ${k + 1}…`);
        const t = await api.post(`/v1/pools/${encodeURIComponent(d.pool)}/volumes`,
          { name: vol, capacity: Math.round(Number(d.size) * GiB), format: "qcow2" }).catch((x) => { throw tag(x, k); });
        made.push([d.pool, vol]);
        await api.waitTask(t.task).catch((x) => { throw tag(x, k); });
        doc.disks.push({ volume: `${d.pool}/${vol}` });
      }
      stage = "define";
      setBusy("Defining…");
      await api.post("/v1/domains", doc);
      stage = "start";
      if (start) {
        setBusy("Starting…");
        await api.post(`/v1/domains/${encodeURIComponent(n)}/start`, {});
        location.hash = `#/vms/${encodeURIComponent(n)}/console`;
      } else {
        location.hash = `#/vms/${encodeURIComponent(n)}`;
      }
    } catch (x) {
      setBusy(null);
      if (stage === "start") {
        // Defined but not started: its page says why and offers Start again.
        toast(`${n} was created, but did not start: ${x.message || x}`, "error");
        location.hash = `#/vms/${encodeURIComponent(n)}`;
        return;
      }
      {
        // Nothing half-made stays behind.
        for (const [p, v] of made) {
          api.del(`/v1/pools/${encodeURIComponent(p)}/volumes/${encodeURIComponent(v)}`).catch(() => {});
        }
      }
      showErrors(errorsOf(x, stage));
      return;
    }
  };

  const known = new Set();
  const E = (field) => {
    known.add(field); // while the template is built, before the form-level list below
    return html`<${FieldError} field=${field} errors=${errors} />`;
  };
  const vmDisk = (k) => "vd" + String.fromCharCode(97 + k);
  const formErrors = () => Object.entries(errors).filter(([f]) => !known.has(f));

  const form = html`<form ref=${formRef} class="wizard" novalidate onSubmit=${(e) => { e.preventDefault(); submit(false); }}>
    <section class="card form-section" aria-labelledby="wz-general">
      <h2 id="wz-general">General</h2>
      <div class="field">
        <label for="wz-name">Name</label>
        <input id="wz-name" value=${name} autocomplete="off" spellcheck="false" required maxlength="64"
          onInput=${(e) => setName(e.currentTarget.value)} ...${errAttrs("name", errors, "wz-name-hint")} />
        <span class="hint" id="wz-name-hint">Letters, digits, '.', '_' or '-'.</span>
        ${E("name")}
      </div>
      <div class="field">
        <label for="wz-desc">Description <span class="muted">(optional)</span></label>
        <input id="wz-desc" value=${description} onInput=${(e) => setDescription(e.currentTarget.value)}
          ...${errAttrs("description", errors)} />
        ${E("description")}
      </div>
    </section>

    <section class="card form-section" aria-labelledby="wz-boot">
      <h2 id="wz-boot">What to boot</h2>
      <fieldset>
        <legend>Boot from</legend>
        <${Radio} name="boot" value="default" checked=${boot === "default"} onChange=${setBoot} label="Default guest"
          hint="pyvirt's own small Linux guest." />
        <${Radio} name="boot" value="kernel" checked=${boot === "kernel"} onChange=${setBoot} label="Kernel and initrd"
          disabled=${!isAdmin} hint=${isAdmin ? "Files on the host." : "Files on the host: administrators only."} />
        <${Radio} name="boot" value="disk" checked=${boot === "disk"} onChange=${setBoot} label="Existing disk image"
          hint="A volume of a storage pool, with the default guest's kernel." />
        <${Radio} name="boot" value="iso" checked=${false} onChange=${() => {}} label="ISO image" disabled=${true}
          hint="needs the CD-ROM: a later release" />
      </fieldset>
      ${boot === "kernel" ? html`<div class="subfields">
        <div class="field"><label for="wz-kernel">Kernel path</label>
          <input id="wz-kernel" value=${kernel} spellcheck="false" placeholder="/boot/vmlinuz"
            onInput=${(e) => setKernel(e.currentTarget.value)} ...${errAttrs("kernel", errors)} />${E("kernel")}</div>
        <div class="field"><label for="wz-initrd">Initrd path</label>
          <input id="wz-initrd" value=${initrd} spellcheck="false" placeholder="/boot/initrd.img (optional)"
            onInput=${(e) => setInitrd(e.currentTarget.value)} ...${errAttrs("initrd", errors)} />${E("initrd")}</div>
        <div class="field"><label for="wz-cmdline">Kernel command line</label>
          <input id="wz-cmdline" value=${cmdline} spellcheck="false" placeholder="console=ttyS0 (optional)"
            onInput=${(e) => setCmdline(e.currentTarget.value)} ...${errAttrs("cmdline", errors)} />${E("cmdline")}</div>
      </div>` : null}
      ${boot === "disk" ? html`<div class="subfields">
        <div class="field"><label for="wz-img-pool">Pool</label>
          <select id="wz-img-pool" value=${imgPool} onChange=${(e) => setImgPool(e.currentTarget.value)}
            ...${errAttrs("disks[0].pool", errors)}>
            ${activePools.length === 0 ? html`<option value="">No active pool</option>` : null}
            ${activePools.map((p) => html`<option value=${p.name}>${p.name}</option>`)}
          </select>${E("disks[0].pool")}</div>
        <div class="field"><label for="wz-img-vol">Volume</label>
          <select id="wz-img-vol" value=${imgVol} onChange=${(e) => setImgVol(e.currentTarget.value)}
            ...${errAttrs("disks[0].volume", errors)}>
            ${volumes === null ? html`<option value="">Loading…</option>` : volumes.length === 0 ? html`<option value="">No volume in this pool</option>` : null}
            ${(volumes || []).map((v) => html`<option value=${v.name}>${v.name} (${v.format}, ${fmtBytes(v.capacity, 0)})</option>`)}
          </select>${E("disks[0].volume")}${E("disks[0]")}</div>
        <fieldset>
          <legend>Use as</legend>
          <${Radio} name="imgmode" value="copy" checked=${imgMode === "copy"} onChange=${setImgMode} label="Import a copy"
            hint="A full copy: the original stays untouched." />
          <${Radio} name="imgmode" value="overlay" checked=${imgMode === "overlay"} onChange=${setImgMode} label="Backing file (overlay)"
            hint="A qcow2 overlay: fast, the original must stay." />
        </fieldset>
      </div>` : null}
    </section>

    <section class="card form-section" aria-labelledby="wz-res">
      <h2 id="wz-res">Resources</h2>
      <div class="row-fields">
        <div class="field"><label for="wz-cpus">CPUs</label>
          <input id="wz-cpus" type="number" inputmode="numeric" min="1" max=${maxCpus || undefined} step="1" value=${cpus}
            onInput=${(e) => setCpus(e.currentTarget.value)} ...${errAttrs("cpus", errors, "wz-cpus-hint")} />
          <span class="hint" id="wz-cpus-hint">${maxCpus ? `At most ${maxCpus}${accelNote} on this host.` : ""}</span>${E("cpus")}</div>
        <div class="field"><label for="wz-mem">Memory (MiB)</label>
          <input id="wz-mem" type="number" inputmode="numeric" min="16" max=${maxMem || undefined} step="2" value=${memory}
            onInput=${(e) => setMemory(e.currentTarget.value)} ...${errAttrs("memory", errors, "wz-mem-hint")} />
          <span class="hint" id="wz-mem-hint">${maxMem ? `At most ${maxMem} MiB on this host.` : "At least 16 MiB, a multiple of 2."}</span>${E("memory")}</div>
        <div class="field"><label for="wz-accel">Accelerator</label>
          <select id="wz-accel" value=${accel} onChange=${(e) => setAccel(e.currentTarget.value)} ...${errAttrs("accel", errors)}>
            <option value="auto">Automatic${limits && limits.accel_auto ? (limits.accel_auto === "kvm" ? " (KVM)" : " (software CPU)") : ""}</option>
            <option value="kvm">KVM</option>
            <option value="emu">Software CPU (emulation)</option>
          </select>${E("accel")}</div>
      </div>
    </section>

    <section class="card form-section" aria-labelledby="wz-disks">
      <h2 id="wz-disks">Storage</h2>
      ${disks.length === 0 ? html`<p class="muted">${boot === "disk" ? "Only the disk image above." : "No disk: the default guest runs from its initrd."}</p>` : null}
      ${disks.map((d, i) => {
        const k = i + firstDiskIndex;
        return html`<fieldset key=${d.key} class="disk" data-disk=${k}>
          <legend>Disk ${k + 1} (${vmDisk(k)}), new qcow2</legend>
          <div class="row-fields">
            <div class="field"><label for=${"wz-dpool-" + d.key}>Pool</label>
              <select id=${"wz-dpool-" + d.key} value=${d.pool} onChange=${(e) => setDisk(i, { pool: e.currentTarget.value })}
                ...${errAttrs(`disks[${k}].pool`, errors)}>
                ${activePools.length === 0 ? html`<option value="">No active pool</option>` : null}
                ${activePools.map((p) => html`<option value=${p.name}>${p.name}${p.available !== null && p.available !== undefined ? ` (${fmtBytes(p.available, 0)} free)` : ""}</option>`)}
              </select>${E(`disks[${k}].pool`)}</div>
            <div class="field"><label for=${"wz-dsize-" + d.key}>Size (GiB)</label>
              <input id=${"wz-dsize-" + d.key} type="number" min="0.001" step="any" inputmode="decimal" value=${d.size}
                onInput=${(e) => setDisk(i, { size: e.currentTarget.value })} ...${errAttrs(`disks[${k}].size`, errors)} />
              ${E(`disks[${k}].size`)}</div>
            <button type="button" class="btn btn-quiet" aria-label=${`Remove disk ${k + 1}`} onClick=${() => removeDisk(i)}>Remove</button>
          </div>
          ${E(`disks[${k}].volume`)}${E(`disks[${k}]`)}
        </fieldset>`;
      })}
      <button type="button" class="btn" onClick=${addDisk} disabled=${disks.length + firstDiskIndex >= MAX_DISKS}>Add disk</button>
      ${E("disks")}
    </section>

    <section class="card form-section" aria-labelledby="wz-net">
      <h2 id="wz-net">Connectivity and start-up</h2>
      <div class="field"><label for="wz-net-sel">Network</label>
        <select id="wz-net-sel" value=${network} onChange=${(e) => setNetwork(e.currentTarget.value)}
          ...${errAttrs("nics[0].network", errors)}>
          <option value="">None</option>
          ${(networks || []).map((nw) => html`<option value=${nw.name}>${nw.name}${nw.state !== "active" ? " (inactive)" : ""}</option>`)}
        </select>${E("nics[0].network")}${E("nics")}</div>
      <div class="check">
        <input type="checkbox" id="wz-auto" checked=${autostart} onChange=${(e) => setAutostart(e.currentTarget.checked)} />
        <label for="wz-auto">Autostart</label>
        <span class="hint">Start it when the daemon starts.</span>
      </div>
    </section>

    ${(() => {
      const rest = formErrors();
      return rest.length ? html`<div class="alert alert-error form-errors" role="alert" tabindex="-1">
        ${rest.map(([f, m]) => html`<p data-error-for=${f}>${f === "_" ? m : `${f}: ${m}`}</p>`)}</div>` : null;
    })()}
    <div class="actions sticky-actions">
      ${busy ? html`<span class="muted" role="status" aria-live="polite">${busy}</span>` : html`<span role="status" aria-live="polite"></span>`}
      <button type="submit" class="btn" disabled=${busy !== null}>Create</button>
      <button type="button" class="btn btn-primary" disabled=${busy !== null} onClick=${() => submit(true)}>Create and start</button>
    </div>
  </form>`;

  const bootText = { default: "Default guest", kernel: "Kernel and initrd", disk: "Existing disk image" }[boot];
  const newBytes = disks.reduce((a, d) => a + (Number(d.size) > 0 ? Number(d.size) * GiB : 0), 0);
  return html`<div class="page wizard-page">
    <div class="page-head"><h1>New virtual machine</h1>
      <p class="muted">Everything is checked here first, then again by the daemon.</p></div>
    <div class="wizard-layout">
      ${form}
      <aside class="card summary" aria-label="Summary">
        <h2>Summary</h2>
        <dl>
          <dt>Name</dt><dd>${name.trim() || "–"}</dd>
          <dt>Boots</dt><dd>${bootText}${boot === "disk" && imgVol ? html`<br /><span class="muted">${imgPool}/${imgVol}, ${imgMode === "overlay" ? "overlay" : "copy"}</span>` : null}</dd>
          <dt>CPUs</dt><dd>${cpus || "–"}</dd>
          <dt>Memory</dt><dd>${memory ? `${memory} MiB` : "–"}</dd>
          <dt>New disks</dt><dd>${disks.length ? `${disks.length}, ${fmtBytes(newBytes, 0)}` : "none"}</dd>
          <dt>Network</dt><dd>${network || "none"}</dd>
          <dt>Autostart</dt><dd>${autostart ? "yes" : "no"}</dd>
        </dl>
      </aside>
    </div>
  </div>`;
}

/** Attach the disk index a volume step failed on. */
function tag(err, diskIndex) {
  err.diskIndex = diskIndex;
  return err;
}

/** The API's error as {field: message}, placed next to the field it names. */
function errorsOf(x, stage) {
  if (!(x instanceof ApiError)) return { _: String(x && x.message || x) };
  if (x.code === "forbidden") return { _: "Not allowed: " + x.message };
  if (stage === "volumes") {
    const k = x.diskIndex ?? 0;
    // A volume's own fields mean nothing in this form: show it at the disk.
    return { [`disks[${k}].volume`]: x.message };
  }
  if (stage === "define") {
    let field = x.field;
    if (!field && x.code === "already-exists") field = "name";
    if (field) return { [field]: x.message.startsWith(field + ":") ? x.message.slice(field.length + 1).trim() : x.message };
    return { _: x.message };
  }
  return { _: x.message };
}
