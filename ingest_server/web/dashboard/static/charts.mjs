// Charts through Apache ECharts, served from npm's copy at /dashboard/vendor/; if it is not
// there, each chart slot says so and the page's tables still carry the figures.

import { t } from "./i18n.mjs";

let library = null;

async function echarts() {
  if (library === null) {
    library = import("./vendor/echarts.esm.min.mjs").catch(() => undefined);
  }
  return library;
}

const live = new Set();

/** Dispose every chart (before a page is redrawn). */
export function disposeCharts() {
  for (const chart of live) chart.dispose();
  live.clear();
}

addEventListener("resize", () => {
  for (const chart of live) chart.resize();
});

/** Draw `option` into `slot`; false (and a notice in the slot) without the library. */
export async function drawChart(slot, option) {
  const lib = await echarts();
  if (!lib) {
    slot.classList.add("chart-missing");
    slot.textContent = t("charts.unavailable");
    return false;
  }
  const chart = lib.init(slot, null, { renderer: "canvas" });
  const { tooltip, ...rest } = option;
  chart.setOption({
    animation: false,
    grid: { left: 48, right: 16, top: 36, bottom: 40, containLabel: true },
    ...rest,
    // Drawn on the canvas: HTML tooltips carry inline style attributes, which the page's
    // Content-Security-Policy (style-src 'self') blocks.
    tooltip: { trigger: "axis", ...tooltip, renderMode: "richText" },
  });
  live.add(chart);
  return true;
}
