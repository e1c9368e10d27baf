// The Snapshots tab: the domain's snapshots as a tree by parent (nested lists), take one
// (name + description, with the task's progress), revert to one, delete one.

import { useEffect, useState } from "preact/hooks";
import { api } from "./api.js";
import { Dialog, fmtTime, html } from "./ui.js";
import { domPath, errText } from "./vmutil.js";

const SNAP_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** Snapshots → a forest: [{snap, children}] ordered by creation time. */
export function snapshotTree(snaps) {
  const byName = new Map(snaps.map((s) => [s.name, { snap: s, children: [] }]));
  const roots = [];
  const sorted = [...snaps].sort((a, b) => (a.created || 0) - (b.created || 0));
  for (const s of sorted) {
    const node = byName.get(s.name);
    const parent = s.parent ? byName.get(s.parent) : null;
    // a parent that was deleted: its children become roots
    if (parent && parent !== node) parent.children.push(node);
    else roots.push(node);
  }
  return roots;
}

export function SnapshotsPanel({ name, dom, writable, tick }) {
  const [snaps, setSnaps] = useState(null);
  const [err, setErr] = useState("");
  const [notice, setNotice] = useState("");
  const [snapName, setSnapName] = useState("");
  const [desc, setDesc] = useState("");
  const [fieldErr, setFieldErr] = useState("");
  const [progress, setProgress] = useState(null); // {fraction, message} while taking one
  const [confirm, setConfirm] = useState(null); // {verb: "revert"|"delete", snap}
  const [busy, setBusy] = useState(false);

  async function load() {
    try {
      setSnaps(await api.get(domPath(name, "/snapshots")));
      setErr("");
    } catch (e) {
      setErr(errText(e));
    }
  }

  // the page bumps `tick` on events about this domain (snapshot-created, -reverted, ...)
  useEffect(() => { load(); }, [name, tick]);

  async function take(ev) {
    ev.preventDefault();
    setFieldErr("");
    setErr("");
    const n = snapName.trim();
    if (n && !SNAP_NAME.test(n)) {
      setFieldErr("Letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit.");
      return;
    }
    setProgress({ fraction: 0, message: "starting" });
    setNotice("");
    try {
      const body = { description: desc };
      if (n) body.name = n;
      const r = await api.post(domPath(name, "/snapshots"), body);
      const task = await api.waitTask(r.task, (fraction, message) => setProgress({ fraction, message }));
      const made = (task.result && task.result.name) || n || "the snapshot";
      setNotice(`Snapshot ${made} taken.`);
      setSnapName("");
      setDesc("");
    } catch (e) {
      if (e.field === "name") setFieldErr(errText(e));
      else setErr(`Snapshot failed: ${errText(e)}`);
    } finally {
      setProgress(null);
      load();
    }
  }

  async function confirmed() {
    const { verb, snap } = confirm;
    setConfirm(null);
    setBusy(true);
    setErr("");
    setNotice(verb === "revert" ? `Reverting to ${snap}…` : `Deleting ${snap}…`);
    try {
      if (verb === "revert") {
        await api.post(domPath(name, `/snapshots/${encodeURIComponent(snap)}/revert`), {});
        setNotice(`Reverted to ${snap}.`);
      } else {
        await api.del(domPath(name, `/snapshots/${encodeURIComponent(snap)}`));
        setNotice(`Snapshot ${snap} deleted.`);
      }
    } catch (e) {
      setNotice("");
      setErr(`${verb === "revert" ? "Revert" : "Delete"} failed: ${errText(e)}`);
    } finally {
      setBusy(false);
      load();
    }
  }

  const renderNodes = (nodes) => html`
    <ul class="snap-tree">
      ${nodes.map(({ snap: s, children }) => html`
        <li key=${s.name}>
          <div class=${"snap-row" + (s.current ? " current" : "")} data-snapshot=${s.name}>
            <div class="snap-main">
              <strong class="snap-name" id=${"snapname-" + s.name}>${s.name}</strong>
              ${s.current && html`<span class="badge">current</span>`}
              <span class="badge muted-badge">${s.memory ? "memory + disks" : "disks only"}</span>
              <span class="snap-meta">${fmtTime(s.created)} · taken while ${s.state}</span>
              ${s.description && html`<span class="snap-desc">${s.description}</span>`}
            </div>
            <div class="row-actions">
              <button type="button" class="btn btn-small" disabled=${!writable || busy || progress !== null}
                      aria-describedby=${"snapname-" + s.name}
                      onClick=${() => setConfirm({ verb: "revert", snap: s.name })}>Revert</button>
              <button type="button" class="btn btn-small btn-danger" disabled=${!writable || busy || progress !== null}
                      aria-describedby=${"snapname-" + s.name}
                      onClick=${() => setConfirm({ verb: "delete", snap: s.name })}>Delete</button>
            </div>
          </div>
          ${children.length > 0 && renderNodes(children)}
        </li>`)}
    </ul>`;

  return html`
    <div class="snapshots">
      <form class="snap-form" onSubmit=${take} novalidate>
        <h2>Take a snapshot</h2>
        <p class="muted">${dom.state === "shut off" || dom.state === "crashed"
          ? "The virtual machine is off: the snapshot holds its disks."
          : "The virtual machine pauses a moment: the snapshot holds its memory and disks."}</p>
        <div class="field">
          <label for="snap-name">Snapshot name</label>
          <input id="snap-name" value=${snapName} autocomplete="off" placeholder="automatic when empty"
                 aria-invalid=${fieldErr ? "true" : "false"} aria-describedby="snap-name-err"
                 onInput=${(e) => setSnapName(e.currentTarget.value)} />
          <span id="snap-name-err" class="field-error" data-error-for="name">${fieldErr}</span>
        </div>
        <div class="field">
          <label for="snap-desc">Description</label>
          <input id="snap-desc" value=${desc} maxlength="4096"
                 onInput=${(e) => setDesc(e.currentTarget.value)} />
        </div>
        <button type="submit" class="btn btn-primary" disabled=${!writable || progress !== null || busy}>Take snapshot</button>
        ${progress !== null && html`
          <div class="task-progress">
            <progress max="1" value=${progress.fraction} aria-label="Snapshot progress"></progress>
            <span>${Math.round(progress.fraction * 100)} % ${progress.message}</span>
          </div>`}
      </form>
      <p role="status" class="vm-notice">${notice}</p>
      ${err && html`<p role="alert" class="alert alert-error">${err}</p>`}
      <section aria-labelledby="snap-list-title">
        <h2 id="snap-list-title">Snapshots</h2>
        ${snaps === null ? html`<p>Loading…</p>`
          : snaps.length === 0 ? html`<p class="muted">No snapshots yet.</p>`
          : renderNodes(snapshotTree(snaps))}
      </section>
      ${confirm && html`
        <${Dialog} onClose=${() => setConfirm(null)}
            title=${confirm.verb === "revert" ? `Revert to ${confirm.snap}?` : `Delete snapshot ${confirm.snap}?`}>
          <p>${confirm.verb === "revert"
            ? "The virtual machine goes back to this snapshot; what changed since is lost."
            : "Its metadata and memory image are removed; disk images stay while a later image needs them."}</p>
          <div class="row-actions">
            <button type="button" class=${"btn " + (confirm.verb === "revert" ? "btn-primary" : "btn-danger")}
                    onClick=${confirmed}>${confirm.verb === "revert" ? "Revert" : "Delete"}</button>
            <button type="button" class="btn" onClick=${() => setConfirm(null)}>Cancel</button>
          </div>
        <//>`}
    </div>`;
}
