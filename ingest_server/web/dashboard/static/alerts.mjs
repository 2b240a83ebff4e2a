// The alerts view and the fleet's open-alert counts, against the alerts API:
//   GET  /api/v1/alerts?state=open|acknowledged|resolved  → {"items": [...], "cursor": c, "next": url}
//   POST /api/v1/alerts/{id}/acknowledge, POST /api/v1/alerts/{id}/resolve
// Text only: nothing from the server is parsed as HTML.

import { ApiError, call, pages } from "./api.mjs";
import { ago, lang, t } from "./i18n.mjs";
import { h } from "./dom.mjs";

const SEVERITY_RANK = { critical: 0, warning: 1, info: 2 };
const STATE_RANK = { open: 0, acknowledged: 1, resolved: 2 };
const MAX_PAGES = 5;
const RESOLVED_SHOWN = 20;

/** Up to `maxPages` pages of `GET /alerts?state=…`: the API's `cursor` goes back as
 * `?cursor=` (its `next` is the whole URL of the next page, not a cursor). */
export function listAlerts(state, maxPages = MAX_PAGES, limit = 200) {
  return pages(`/alerts?${new URLSearchParams({ state, limit: String(limit) })}`, maxPages);
}

/** Open first, then acknowledged, then resolved; within each critical first, newest first. */
export function alertOrder(a, b) {
  return (
    (STATE_RANK[a.state] ?? 9) - (STATE_RANK[b.state] ?? 9) ||
    (SEVERITY_RANK[a.severity] ?? 9) - (SEVERITY_RANK[b.severity] ?? 9) ||
    new Date(b.opened_at) - new Date(a.opened_at)
  );
}

const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString(lang() === "zh" ? "zh-CN" : "en-GB") : t("none"));

/** The fleet page's line: counts of open alerts by severity, linking to the alerts view;
 * null when the server has no alerts API (the fleet page goes on without it). */
export async function openAlertSummary() {
  let open;
  try {
    open = await listAlerts("open", 2);
  } catch (error) {
    // the fleet page goes on without the count; a dead token still signs out
    if (error instanceof ApiError && error.status === 401) throw error;
    return null;
  }
  const n = { critical: 0, warning: 0, info: 0 };
  for (const a of open) if (a.severity in n) n[a.severity] += 1;
  const total = open.length;
  return h(
    "a",
    {
      id: "alert-summary",
      href: "#/alerts",
      class: `alert-summary ${n.critical ? "critical" : total ? "warning" : "calm"}`,
      "data-open": total,
      "data-critical": n.critical,
      "data-warning": n.warning,
      "data-info": n.info,
    },
    total ? t("alerts.summary", { total, ...n }) : t("alerts.summary_none"),
  );
}

function alertCard(a, redraw) {
  const status = h("div", { class: "alert-status", role: "status" });
  const act = (what) => async (e) => {
    const buttons = e.target.closest(".alert-actions").querySelectorAll("button");
    for (const b of buttons) b.disabled = true;
    status.replaceChildren(h("span", { class: "muted" }, t("alerts.working")));
    try {
      await call(`/alerts/${encodeURIComponent(a.id)}/${what}`, { method: "POST", body: {} });
      await redraw();
    } catch (error) {
      for (const b of buttons) b.disabled = false;
      const text =
        error instanceof ApiError
          ? t("error.server", { status: error.status, message: error.message })
          : t("error.network", { message: error.message });
      status.replaceChildren(h("div", { class: "error", role: "alert" }, text));
    }
  };
  const actions = h(
    "div",
    { class: "alert-actions" },
    a.state === "open" ? h("button", { type: "button", class: "ack", "data-action": "acknowledge", onclick: act("acknowledge") }, t("alerts.ack")) : null,
    a.state !== "resolved" ? h("button", { type: "button", class: "plain resolve", "data-action": "resolve", onclick: act("resolve") }, t("alerts.resolve")) : null,
  );
  const who = [];
  if (a.acknowledged_by) who.push(t("alerts.acked_by", { who: a.acknowledged_by }));
  if (a.resolved_by) who.push(t("alerts.resolved_by", { who: a.resolved_by }));
  return h(
    "article",
    { class: `card alert ${a.severity} ${a.state}`, "data-alert": a.id, "data-rule": a.rule, "data-state": a.state, "data-severity": a.severity },
    h(
      "div",
      { class: "alert-head" },
      h("span", { class: `sev ${a.severity}` }, t(`severity.${a.severity}`)),
      h("strong", { class: "alert-rule" }, a.rule),
      h("span", { class: "muted", title: fmtTime(a.opened_at) }, t("alerts.opened", { ago: ago(a.opened_at) })),
    ),
    h("p", { class: "alert-message" }, a.message),
    h(
      "p",
      { class: "muted" },
      t("alerts.where", { school: a.school_id, room: a.room || t("none"), device: "" }),
      h("a", { href: `#/device/${encodeURIComponent(a.device_id)}` }, a.device_id),
    ),
    who.length ? h("p", { class: "muted alert-who" }, who.join(" · ")) : null,
    a.state === "resolved" ? null : actions,
    status,
  );
}

/** The alerts view: open alerts first (critical first), then acknowledged, then recently
 * resolved; acknowledge and resolve buttons finger-sized. */
export async function renderAlerts(view) {
  let open;
  let acknowledged;
  let resolved;
  try {
    [open, acknowledged, resolved] = await Promise.all([
      listAlerts("open"),
      listAlerts("acknowledged"),
      listAlerts("resolved", 1, RESOLVED_SHOWN),
    ]);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      view.replaceChildren(h("h1", {}, t("alerts.title")), h("p", { class: "notice" }, t("alerts.unavailable")));
      return;
    }
    throw error;
  }
  const redraw = () => renderAlerts(view);
  const section = (key, items) =>
    items.length
      ? [h("h2", {}, `${t(key)} (${items.length})`), h("div", { class: "alert-list", id: `alerts-${key.split(".")[1]}` }, items.sort(alertOrder).map((a) => alertCard(a, redraw)))]
      : [];
  // replaceChildren writes a null as the text "null": leave the notice out instead
  const none = open.length ? [] : [h("p", { class: "muted", id: "alerts-none" }, t("alerts.none"))];
  view.replaceChildren(
    h("h1", {}, t("alerts.title")),
    ...none,
    ...section("alerts.open", open),
    ...section("alerts.acknowledged", acknowledged),
    ...section("alerts.resolved", resolved.slice(0, RESOLVED_SHOWN)),
  );
  view.dataset.ready = "alerts";
}
