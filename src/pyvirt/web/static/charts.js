// Charts for every page: TimeChart (uPlot, live time series) and Sparkline (one small
// canvas, no library). Both expose `data-points` = the samples drawn so far, which
// the tests watch grow, and show "no data" until there is some.
import { useEffect, useRef } from "preact/hooks";
import { html } from "./ui.js";

// uPlot (145 KB) loads with the first chart, not with pages that only have sparklines.
let uPlotLoading = null;
const loadUPlot = () => (uPlotLoading ||= import("uplot").then((m) => m.default));

const css = (name, fallback) =>
  getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;

const two = (n) => String(n).padStart(2, "0");
function clock(t, seconds) {
  const d = new Date(t * 1000);
  return `${two(d.getHours())}:${two(d.getMinutes())}${seconds ? ":" + two(d.getSeconds()) : ""}`;
}

export const PALETTE = ["--chart-1", "--chart-2", "--chart-3", "--chart-4"];

/**
 * A live time-series chart.
 * props: chart (the data-chart name), label (accessible name), series: [{label, color?}],
 * data: [ts[], ys1[], ys2[], ...] (unix seconds), format(v) for the axis and legend,
 * yMax (fixed upper bound, e.g. 1 for fractions), height.
 */
export function TimeChart({ chart, label, series, data, format = (v) => String(v), yMax = null, height = 160 }) {
  const box = useRef(null);
  const plot = useRef(null);
  // The axis reads these at draw time: a total (memory, disk) may arrive after the chart.
  const live = useRef({ yMax, format });
  live.current = { yMax, format };
  const n = data && data[0] ? data[0].length : 0;
  const latest = useRef(data);
  latest.current = data;

  useEffect(() => {
    const el = box.current;
    let dead = false;
    let ro = null;
    const grid = css("--chart-grid", "rgba(128,128,128,.2)");
    const axis = css("--muted", "#666");
    const opts = {
      width: Math.max(120, el.clientWidth),
      height,
      legend: { show: true, live: false },
      cursor: { show: true, drag: { x: false, y: false } },
      scales: {
        x: { time: true },
        y: {
          range: (u, min, max) => {
            const top = live.current.yMax;
            return [0, top ? Math.max(top, max || 0) : (max > 0 ? max * 1.15 : 1)];
          },
        },
      },
      axes: [
        { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid }, space: 70,
          // One short line of clock time (uPlot's default adds a date row that crowds phones).
          values: (u, splits, ax, space, incr) => splits.map((t) => clock(t, incr < 60)) },
        { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid },
          // as wide as the longest label ("190.7 MiB" would be clipped at a fixed width)
          size: (u, vals) => Math.max(48, 16 + 7 * Math.max(0, ...(vals || []).map((v) => String(v).length))),
          values: (u, vals) => vals.map((v) => live.current.format(v)) },
      ],
      series: [
        {},
        ...series.map((s, i) => {
          const c = s.color || css(PALETTE[i % PALETTE.length], "#3b82f6");
          return { label: s.label, stroke: c, width: 1.5, fill: c + "22", points: { show: false },
                   value: (u, v) => (v === null || v === undefined ? "–" : live.current.format(v)) };
        }),
      ],
    };
    loadUPlot().then((UPlot) => {
      if (dead) return;
      const d = latest.current;
      plot.current = new UPlot(opts, d && d[0] ? d : [[], ...series.map(() => [])], el);
      // Follow the panel's width (phones, resized windows, tabs shown later).
      ro = new ResizeObserver(() => {
        const w = el.clientWidth;
        if (plot.current && w > 0 && Math.abs(w - plot.current.width) > 2) plot.current.setSize({ width: w, height });
      });
      ro.observe(el);
    });
    return () => {
      dead = true;
      if (ro) ro.disconnect();
      if (plot.current) plot.current.destroy();
      plot.current = null;
    };
  }, [series.length, height]);

  useEffect(() => {
    if (plot.current && data) plot.current.setData(data);
  }, [data, n, data && data[0] && data[0][n - 1]]);

  return html`<figure class="chart" data-chart=${chart} data-points=${n} aria-label=${label} role="group">
    <div class="plot" ref=${box} aria-hidden="true"></div>
    ${n === 0 ? html`<p class="nodata">no data</p>` : null}
  </figure>`;
}

/**
 * A sparkline on a canvas (cheap enough for hundreds of rows).
 * props: values (array, nulls skipped), max (null: the values' max), label, field (data-field).
 */
export function Sparkline({ values, max = null, label, field, width = 96, height = 24, color = "--chart-1" }) {
  const ref = useRef(null);
  const n = values ? values.length : 0;
  const lastV = n ? values[n - 1] : null;
  useEffect(() => {
    const c = ref.current;
    if (!c) return;
    if (n < 1 && !c.dataset.drawn) return;
    c.dataset.drawn = "1";
    const dpr = window.devicePixelRatio || 1;
    if (c.width !== width * dpr) { c.width = width * dpr; c.height = height * dpr; }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, width, height);
    if (n < 1) return;
    const vs = values.slice(-60);
    let top = max;
    if (top === null) { top = 0; for (const v of vs) if (v > top) top = v; }
    if (!(top > 0)) top = 1;
    const step = width / Math.max(59, vs.length - 1);
    const x0 = width - step * (vs.length - 1);
    g.beginPath();
    let moved = false;
    vs.forEach((v, i) => {
      if (v === null || v === undefined) return;
      const x = x0 + i * step, y = height - 1 - (Math.min(v, top) / top) * (height - 3);
      if (!moved) { g.moveTo(x, y); moved = true; } else g.lineTo(x, y);
    });
    g.strokeStyle = css(color, "#3b82f6");
    g.lineWidth = 1.5;
    g.stroke();
  }, [n, lastV, max, width, height]);
  // Hundreds of rows, most of them shut off: a sparkline that never had data is a
  // plain box, not a canvas (the list's first paint creates none for them)
  if (n < 1 && !(ref.current && ref.current.dataset.drawn)) {
    return html`<span ref=${ref} class="spark spark-empty" data-field=${field} data-points="0"
      style=${`display:inline-block;width:${width}px;height:${height}px`}
      role="img" aria-label=${label}></span>`;
  }
  return html`<canvas ref=${ref} class="spark" data-field=${field} data-points=${n}
    width=${width} height=${height} style=${`width:${width}px;height:${height}px`}
    role="img" aria-label=${label}></canvas>`;
}
