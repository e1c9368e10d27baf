// The Tasks tab: this domain's tasks (snapshots, saves, clones...) newest first, each
// with a <progress> bar that follows the task's events from the app's one event stream.

import { useEffect, useRef, useState } from "preact/hooks";
import { api } from "./api.js";
import { store } from "./store.js";
import { fmtDuration, fmtTime, html } from "./ui.js";
import { errText } from "./vmutil.js";

const KEEP = 100; // rows shown: the daemon keeps more, the page needs no more

export function TasksPanel({ name }) {
  const [tasks, setTasks] = useState(null); // id -> task, as a Map in state
  const [err, setErr] = useState("");
  const seen = useRef(store.lastEventId || 0);

  useEffect(() => {
    let live = true;
    const upsert = (t) => {
      if (!live || !t || t.object !== name) return;
      setTasks((m) => {
        const next = new Map(m || []);
        next.set(t.id, { ...(next.get(t.id) || {}), ...t });
        return next;
      });
    };
    const fetchTask = (id) => api.get(`/v1/tasks/${encodeURIComponent(id)}`).then(upsert).catch(() => {});

    api.get("/v1/tasks").then((list) => {
      if (!live) return;
      const m = new Map();
      for (const t of Array.isArray(list) ? list : []) if (t.object === name) m.set(t.id, t);
      setTasks((old) => {
        // keep what events brought meanwhile
        for (const [id, t] of old || []) if (!m.has(id) || t.progress > m.get(id).progress) m.set(id, t);
        return m;
      });
    }).catch((e) => live && setErr(errText(e)));

    // The store notifies "tasks" once per frame for however many task events came:
    // walk its recent events back to the last one this panel saw.
    const onTasks = () => {
      const fresh = [];
      for (const ev of store.recentEvents) {
        if (typeof ev.id !== "number" || ev.id <= seen.current) break;
        if (ev.kind === "task") fresh.push(ev);
      }
      if (store.recentEvents.length && typeof store.recentEvents[0].id === "number") {
        seen.current = Math.max(seen.current, store.recentEvents[0].id);
      }
      for (const ev of fresh.reverse()) {
        const id = Number(ev.object);
        if (ev.event === "progress") {
          const m = /^(\d+)%\s*(.*)$/.exec(ev.detail || "");
          if (!m) continue;
          setTasks((old) => {
            if (!old || !old.has(id)) return old;
            const next = new Map(old);
            next.set(id, { ...old.get(id), progress: Number(m[1]) / 100, message: m[2] });
            return next;
          });
        } else {
          // started (is it ours? the task says), done, failed: read the task once
          fetchTask(id);
        }
      }
    };
    const off = store.subscribe("tasks", onTasks);
    return () => { live = false; off(); };
  }, [name]);

  const rows = tasks ? [...tasks.values()].sort((a, b) => b.id - a.id).slice(0, KEEP) : [];
  return html`
    <div class="vm-tasks">
      ${err && html`<p role="alert" class="alert alert-error">${err}</p>`}
      <div class="table-wrap">
        <table class="task-table">
          <caption>Tasks of ${name}</caption>
          <thead><tr><th scope="col">Task</th><th scope="col">Started</th><th scope="col">Progress</th>
            <th scope="col">State</th><th scope="col">Message</th></tr></thead>
          <tbody>
            ${tasks === null && html`<tr><td colspan="5" class="muted">Loading…</td></tr>`}
            ${tasks !== null && rows.length === 0 && html`<tr><td colspan="5" class="muted">No tasks yet.</td></tr>`}
            ${rows.map((t) => html`
              <tr key=${t.id} data-task=${t.id} class=${"task-" + t.state}>
                <th scope="row">${t.kind} <span class="muted">#${t.id}</span></th>
                <td>${fmtTime(t.created)}</td>
                <td><div class="task-bar">
                  <progress max="1" value=${t.state === "done" ? 1 : t.progress || 0}
                            aria-label=${`${t.kind} #${t.id} progress`}></progress>
                  <span class="muted nowrap">${Math.round((t.state === "done" ? 1 : t.progress || 0) * 100)} %</span>
                </div></td>
                <td><span class=${"task-state task-state-" + t.state}>${t.state}</span>
                  ${t.finished && t.created ? html` <span class="muted">in ${fmtDuration(Math.max(1, t.finished - t.created))}</span>` : ""}</td>
                <td>${t.state === "failed" ? html`<span class="task-error">${t.error}</span>` : t.message || ""}</td>
              </tr>`)}
          </tbody>
        </table>
      </div>
    </div>`;
}
