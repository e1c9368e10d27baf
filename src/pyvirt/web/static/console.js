// The serial console in the page: xterm.js over the daemon's console WebSocket
// (binary frames both ways: the guest's bytes in, the user's keystrokes out as UTF-8).
// It fits its panel, copies and pastes, and reconnects with backoff (a daemon restart
// closes the socket; the session survives in the daemon's database).

import { useEffect, useRef, useState } from "preact/hooks";
import { Terminal } from "xterm";
import { FitAddon } from "xterm-addon-fit";
import { api, ApiError } from "./api.js";
import { html } from "./ui.js";
import { domPath, ensureCss } from "./vmutil.js";

const BACKOFF_MIN_MS = 250;
const BACKOFF_MAX_MS = 4000;
// two Escapes this close together leave the terminal (the first one still reaches the guest)
const ESC_ESC_MS = 600;
// states with a VMM, hence a console socket
const RUNNING = new Set(["running", "paused", "in shutdown", "pmsuspended"]);

/**
 * One console connection for one domain: connects while `wanted`, reconnects after a
 * close with exponential backoff, and reports "connected" | "reconnecting" | "disconnected".
 */
class ConsoleLink {
  constructor(name, term, onStatus) {
    this.name = name;
    this.term = term;
    this.onStatus = onStatus;
    this.ws = null;
    this.timer = null;
    this.attempt = 0;
    this.wanted = false;
    this.encoder = new TextEncoder();
  }

  want(on) {
    if (on === this.wanted) return;
    this.wanted = on;
    if (on) {
      this.attempt = 0;
      this.connect();
    } else {
      this.drop();
      this.onStatus("disconnected");
    }
  }

  /** Try now (a state change said the VM runs again): skip the backoff wait. */
  kick() {
    if (!this.wanted || (this.ws && this.ws.readyState <= WebSocket.OPEN)) return;
    this.attempt = 0;
    this.connect();
  }

  connect() {
    this.clearTimer();
    if (!this.wanted) return;
    let ws;
    try {
      ws = api.consoleSocket(this.name);
    } catch {
      this.retry();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.attempt = 0;
      // The daemon replays the last 256 KiB of output first: start from a clean screen
      // so that a reconnect does not show everything twice.
      this.term.reset();
      this.onStatus("connected");
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      const data = ev.data instanceof ArrayBuffer ? new Uint8Array(ev.data) : String(ev.data);
      this.term.write(data);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (ev.code === 4401) {
        // unauthenticated: ask once over HTTP so the app notices and shows the login page
        api.get("/v1/session").catch(() => {});
        this.wanted = false;
        this.onStatus("disconnected");
        return;
      }
      if (ev.code === 4403) {
        this.wanted = false;
        this.onStatus("disconnected");
        return;
      }
      this.retry();
    };
  }

  retry() {
    if (!this.wanted) {
      this.onStatus("disconnected");
      return;
    }
    this.onStatus("reconnecting");
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 10);
    const delay = base * (0.75 + Math.random() * 0.5); // jitter: tabs do not reconnect in step
    this.clearTimer();
    this.timer = setTimeout(() => this.reconnect(), delay);
  }

  /**
   * Ask first whether the VM still has a console: a closed socket often means the VM
   * ended or is being replaced (force off, a snapshot's revert), and a handshake to a
   * console that is going away fails noisily. The page's `active` flips soon after.
   */
  async reconnect() {
    this.timer = null;
    if (!this.wanted) return;
    let dom = null;
    try {
      dom = await api.get(domPath(this.name));
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) { this.want(false); return; }
      // the daemon is away (a restart) or the domain is gone: try again later
    }
    if (!this.wanted || this.ws) return;
    if (dom && RUNNING.has(dom.state)) this.connect();
    else this.retry();
  }

  send(text) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(typeof text === "string" ? this.encoder.encode(text) : text);
    return true;
  }

  clearTimer() {
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
  }

  drop() {
    this.clearTimer();
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000);
  }

  dispose() {
    this.wanted = false;
    this.drop();
  }
}

/** Text of the terminal's whole buffer (scrollback included), one line per row. */
function bufferText(term) {
  const buf = term.buffer.active;
  const lines = [];
  for (let i = 0; i < buf.length; i++) {
    const line = buf.getLine(i);
    if (line) lines.push(line.translateToString(true));
  }
  return lines.join("\n");
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch { /* permission refused: fall back below */ }
  }
  // Outside a secure context (plain http on a LAN address) the Clipboard API is absent.
  const ta = document.createElement("textarea");
  ta.value = text;
  ta.setAttribute("readonly", "");
  ta.style.position = "fixed";
  ta.style.opacity = "0";
  document.body.appendChild(ta);
  ta.select();
  let ok = false;
  try { ok = document.execCommand("copy"); } catch { ok = false; }
  ta.remove();
  return ok;
}

/**
 * The console panel. `active`: the domain has a VMM (running, paused, in shutdown);
 * `onLeave`: where keyboard focus goes after "Leave console" / Esc Esc.
 */
export function ConsolePanel({ name, active, writable = true, onLeave }) {
  const boxRef = useRef(null);
  const linkRef = useRef(null);
  const termRef = useRef(null);
  const leaveRef = useRef(null);
  const pasteRef = useRef(null);
  const [status, setStatus] = useState("disconnected");
  const [note, setNote] = useState("");
  const [pasteOpen, setPasteOpen] = useState(false);
  const [reader, setReader] = useState(false);

  useEffect(() => {
    ensureCss("/static/vendor/xterm/css/xterm.css");
    const term = new Terminal({
      cursorBlink: true,
      scrollback: 5000,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Cascadia Mono", Menlo, Consolas, monospace',
      fontSize: 14,
      allowProposedApi: false,
    });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(boxRef.current);
    termRef.current = term;
    const link = new ConsoleLink(name, term, setStatus);
    linkRef.current = link;

    const onData = term.onData((d) => link.send(d));
    const onBinary = term.onBinary((d) => {
      // xterm's binary strings are bytes 0..255 (some mouse reports): send them as such
      const bytes = new Uint8Array(d.length);
      for (let i = 0; i < d.length; i++) bytes[i] = d.charCodeAt(i) & 0xff;
      link.send(bytes);
    });

    let lastEsc = 0;
    term.attachCustomKeyEventHandler((ev) => {
      if (ev.type !== "keydown") return true;
      if (ev.key === "Escape" && !ev.ctrlKey && !ev.altKey && !ev.metaKey) {
        const now = performance.now();
        if (now - lastEsc < ESC_ESC_MS) {
          lastEsc = 0;
          ev.preventDefault();
          leaveRef.current && leaveRef.current.focus();
          return false;
        }
        lastEsc = now;
        return true;
      }
      if (ev.ctrlKey && ev.shiftKey && (ev.key === "C" || ev.key === "c")) {
        ev.preventDefault();
        doCopy();
        return false;
      }
      if (ev.ctrlKey && ev.shiftKey && (ev.key === "V" || ev.key === "v")) {
        // the browser's own paste event follows and xterm sends it: just do not send ^V
        return false;
      }
      return true;
    });

    // fit the panel: on any size change of the box (window resize, phone rotation, tab shown)
    let raf = 0;
    const refit = () => {
      cancelAnimationFrame(raf);
      raf = requestAnimationFrame(() => {
        if (boxRef.current && boxRef.current.offsetWidth > 0) {
          try { fit.fit(); } catch { /* not rendered yet */ }
        }
      });
    };
    const ro = new ResizeObserver(refit);
    ro.observe(boxRef.current);
    refit();

    // the tests' (and the benchmark's) window onto the terminal
    window.__pyvirtConsole = {
      name,
      term,
      text: () => bufferText(term),
      status: () => linkRef.current && linkRef.current.ws && linkRef.current.ws.readyState === 1
        ? "connected" : "not connected",
      send: (s) => link.send(s),
    };

    return () => {
      ro.disconnect();
      cancelAnimationFrame(raf);
      onData.dispose();
      onBinary.dispose();
      link.dispose();
      term.dispose();
      if (window.__pyvirtConsole && window.__pyvirtConsole.term === term) delete window.__pyvirtConsole;
    };
  }, [name]);

  useEffect(() => {
    const link = linkRef.current;
    if (!link) return;
    const on = !!active && writable; // viewers may not use the console (the daemon says 403)
    link.want(on);
    if (on) link.kick();
  }, [active, writable, name]);

  useEffect(() => {
    if (pasteOpen && pasteRef.current) pasteRef.current.focus();
  }, [pasteOpen]);

  async function doCopy() {
    const term = termRef.current;
    if (!term) return;
    const sel = term.getSelection();
    if (!sel) {
      setNote("Select text in the console first, then Copy.");
      return;
    }
    const ok = await copyText(sel);
    setNote(ok ? `Copied ${sel.length} characters.` : "The browser refused to copy.");
  }

  async function doPaste() {
    const term = termRef.current;
    if (!term) return;
    if (navigator.clipboard && navigator.clipboard.readText && window.isSecureContext) {
      try {
        const text = await navigator.clipboard.readText();
        if (text) {
          term.paste(text); // bracketed paste and newline handling as typed text would get
          setNote(`Pasted ${text.length} characters.`);
          term.focus();
          return;
        }
      } catch { /* no permission: ask for the text instead */ }
    }
    setPasteOpen(true);
  }

  function sendPasted(ev) {
    ev.preventDefault();
    const text = pasteRef.current ? pasteRef.current.value : "";
    setPasteOpen(false);
    if (text && termRef.current) {
      termRef.current.paste(text);
      setNote(`Pasted ${text.length} characters.`);
      termRef.current.focus();
    }
  }

  function toggleReader(ev) {
    const on = ev.currentTarget.checked;
    setReader(on);
    // xterm then mirrors its rows into an accessible tree and announces new output
    if (termRef.current) termRef.current.options.screenReaderMode = on;
  }

  function reconnectNow() {
    const link = linkRef.current;
    if (!link) return;
    link.want(true);
    link.kick();
  }

  function leave() {
    if (onLeave) onLeave();
  }

  const statusText = active && writable ? status : "disconnected";
  return html`
    <section class="console-panel" aria-label="Serial console">
      <div class="console-bar">
        <span class=${"console-status console-" + statusText.replace(/\s/g, "-")}>
          Console: <strong data-field="console-status">${statusText}</strong>
        </span>
        <span class="console-tools">
          <button type="button" class="btn btn-small" onClick=${doCopy} title="Copy the selection (Ctrl+Shift+C)">Copy</button>
          <button type="button" class="btn btn-small" onClick=${doPaste} title="Paste into the console (Ctrl+Shift+V)"
                  disabled=${!writable || statusText !== "connected"}>Paste</button>
          ${active && writable && statusText !== "connected" && html`
            <button type="button" class="btn btn-small" onClick=${reconnectNow}>Reconnect now</button>`}
          <button type="button" class="btn btn-small" onClick=${() => termRef.current && termRef.current.focus()}>Focus console</button>
          <button type="button" class="btn btn-small" ref=${leaveRef} onClick=${leave}>Leave console</button>
          <label class="check console-reader">
            <input type="checkbox" checked=${reader} onChange=${toggleReader} />
            Screen reader mode
          </label>
        </span>
      </div>
      <p class="console-hint" id="console-hint">
        Keys typed in the console go to the guest. Press Esc twice to leave it.
        ${!active && " The virtual machine is not running: start it to use its console."}
        ${active && !writable && " Your role may look, not type: the console is for users and admins."}
      </p>
      <div class="console-box" data-testid="console" ref=${boxRef} aria-describedby="console-hint"></div>
      <p class="console-note" role="status">${note}</p>
      ${pasteOpen && html`
        <form class="paste-form" onSubmit=${sendPasted}
              onKeyDown=${(e) => { if (e.key === "Escape") { e.preventDefault(); setPasteOpen(false); } }}>
          <label for="paste-text">Text to paste</label>
          <textarea id="paste-text" ref=${pasteRef} rows="3"></textarea>
          <div class="row-actions">
            <button type="submit" class="btn btn-primary">Send to console</button>
            <button type="button" class="btn" onClick=${() => setPasteOpen(false)}>Cancel</button>
          </div>
        </form>`}
    </section>`;
}
