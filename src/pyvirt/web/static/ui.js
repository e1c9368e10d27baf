// Small shared UI pieces for every page: the `html` template tag (htm over preact),
// formatters, the state badge and an accessible modal dialog.
import { h } from "preact";
import { useEffect, useRef } from "preact/hooks";
import htm from "htm";

export const html = htm.bind(h);

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
export function fmtBytes(n, digits = 1) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "–";
  let i = 0;
  let v = Math.abs(n);
  while (v >= 1024 && i < UNITS.length - 1) { v /= 1024; i++; }
  return `${n < 0 ? "-" : ""}${i === 0 ? v : v.toFixed(digits)} ${UNITS[i]}`;
}
export const fmtRate = (n) => (n === null || n === undefined ? "–" : fmtBytes(n) + "/s");
export const fmtPct = (f) => (f === null || f === undefined || !Number.isFinite(f) ? "–" : `${(f * 100).toFixed(f < 0.1 ? 1 : 0)} %`);
export function fmtDuration(s) {
  if (!Number.isFinite(s) || s < 0) return "–";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d} d ${hh} h`;
  if (hh) return `${hh} h ${m} min`;
  if (m) return `${m} min ${s % 60} s`;
  return `${s} s`;
}
export function fmtTime(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  const now = new Date();
  const sameDay = d.toDateString() === now.toDateString();
  return sameDay ? d.toLocaleTimeString() : d.toLocaleString();
}
export function fmtAgo(t) {
  if (!t) return "–";
  const s = Date.now() / 1000 - t;
  if (s < 5) return "just now";
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(t * 1000).toLocaleDateString();
}

/** CSS class of a state: colours always come with the state's text. */
export const stateClass = (state) => "state state-" + String(state || "unknown").replace(/\s+/g, "-");

/** The state as text plus a colour; withReason: "running (booted)" (the VM page). */
export function StateBadge({ state, reason, withReason = false }) {
  const text = withReason && reason ? `${state} (${reason})` : state;
  return html`<span class=${stateClass(state)}><span class="dot" aria-hidden="true"></span><span data-field="state">${text}</span></span>`;
}

const FOCUSABLE = 'a[href], button:not([disabled]), input:not([disabled]), select:not([disabled]), textarea:not([disabled]), [tabindex]:not([tabindex="-1"])';

/**
 * A modal dialog: focus moves in and is kept inside (Tab wraps), Escape or the
 * backdrop closes it, focus returns to where it was.
 */
export function Dialog({ title, onClose, children, describedBy }) {
  const ref = useRef(null);
  useEffect(() => {
    const before = document.activeElement;
    const box = ref.current;
    const first = box && box.querySelector(FOCUSABLE);
    (first || box).focus();
    const onKey = (e) => {
      if (e.key === "Escape") { e.preventDefault(); onClose(); return; }
      if (e.key !== "Tab" || !box) return;
      const items = [...box.querySelectorAll(FOCUSABLE)];
      if (!items.length) { e.preventDefault(); return; }
      const a = items[0], z = items[items.length - 1];
      if (e.shiftKey && document.activeElement === a) { e.preventDefault(); z.focus(); }
      else if (!e.shiftKey && document.activeElement === z) { e.preventDefault(); a.focus(); }
    };
    document.addEventListener("keydown", onKey, true);
    // everything outside the dialog is inert while it is open (pointer, keyboard and
    // screen readers alike): each ancestor's other children, up to <body>
    const inerted = [];
    for (let node = box; node && node.parentElement && node !== document.body; node = node.parentElement) {
      for (const sib of node.parentElement.children) {
        if (sib !== node && !sib.inert && sib.tagName !== "SCRIPT") { sib.inert = true; inerted.push(sib); }
      }
    }
    return () => {
      for (const el of inerted) el.inert = false;
      document.removeEventListener("keydown", onKey, true);
      if (before && before.focus) before.focus();
    };
  }, []);
  const titleId = "dlg-" + String(title).replace(/\W+/g, "-").toLowerCase();
  return html`<div class="backdrop" onClick=${(e) => { if (e.target === e.currentTarget) onClose(); }}>
    <div class="dialog" role="dialog" aria-modal="true" aria-labelledby=${titleId}
         aria-describedby=${describedBy} ref=${ref} tabindex="-1">
      <h2 id=${titleId}>${title}</h2>
      ${children}
    </div>
  </div>`;
}

/** A transient message in a polite live region (bottom of the page). */
export function toast(text, kind = "info") {
  window.dispatchEvent(new CustomEvent("pyvirt:toast", { detail: { text, kind } }));
}
