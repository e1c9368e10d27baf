// Small pieces the VM page's modules share (the app-wide ones live in ui.js).

/** `/v1/domains/NAME` + rest, NAME escaped (names are the daemon's, but never trust a string). */
export function domPath(name, rest = "") {
  return `/v1/domains/${encodeURIComponent(name)}${rest}`;
}

const loadedCss = new Set();
/** Add a style sheet once (the terminal's CSS is needed only when a console is shown). */
export function ensureCss(href) {
  if (loadedCss.has(href)) return;
  loadedCss.add(href);
  if (document.querySelector(`link[rel="stylesheet"][href="${href}"]`)) return;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = href;
  document.head.appendChild(link);
}

/** Memory as a definition holds it ("512M", "1G", a number of bytes) → bytes, or null. */
export function memBytes(mem) {
  if (typeof mem === "number") return mem;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$/i.exec(String(mem ?? ""));
  if (!m) return null;
  const mult = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[m[2].toLowerCase()];
  return Math.round(Number(m[1]) * mult);
}

/** One line for an error thrown by api.*. */
export function errText(e) {
  if (!e) return "";
  return e.message || String(e);
}

/** The logged-in principal may change things (viewers only look). */
export function canWrite(session) {
  return !!session && session.role !== "viewer";
}
