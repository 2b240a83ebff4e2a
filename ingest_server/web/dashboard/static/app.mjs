// The dashboard: a hash router over five pages, each drawn from /api/v1 calls.

import { ADMIN_ROLES, ApiError, allDevices, call, clearToken, devicePage, liveUrl, meta, pages, scopeOf, setToken, token, whenUnauthorized } from "./api.mjs";
import { disposeCharts, drawChart } from "./charts.mjs";
import { ago, lang, setLang, t } from "./i18n.mjs";
import { h } from "./dom.mjs";
import { openAlertSummary, renderAlerts } from "./alerts.mjs";

const SCOPE_KEY = "campus.scope"; // the token's role
const SCHOOLS_KEY = "campus.schools"; // JSON: its schools, or null for every school
const LIVE_MAX = 200; // rows kept in the live feed
const PING_POLL_MS = 1000;
const PING_POLLS = 60;
const RECENT_EVENTS = 25;
const OK_DRIVER_STATES = new Set(["ok", "starting", "stopped", "running"]);
const FLEET_PAGE = 500; // devices per fleet page (the API's keyset pages; ?limit= 1..1000)
const SCHOOL_COLUMNS = [
  ["school_id", "col.school"],
  ["devices", "col.devices"],
  ["online", "state.online"],
  ["offline", "state.offline"],
  ["attendance_today", "col.attendance_today"],
  ["open_alerts", "col.open_alerts"],
];
let schoolSort = { key: "school_id", desc: false }; // the schools table's order, kept across redraws

const view = document.getElementById("view");
let leave = () => {}; // tears down the current page (timers, streams, charts)
let loginMessage = "";

// ---- small DOM helpers (text only: nothing from the server is parsed as HTML) ----

/** A table: `columns` are [labelKey, cell(row) -> node|text, className?]; `attrs(row)` per row. */
function table(id, columns, rows, attrs = () => ({})) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { id },
      h("thead", {}, h("tr", {}, columns.map(([label, , cls]) => h("th", { class: cls }, t(label))))),
      h("tbody", {}, rows.map((row) => h("tr", attrs(row), columns.map(([, cell, cls]) => h("td", { class: cls }, cell(row)))))),
    ),
  );
}

const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString(lang() === "zh" ? "zh-CN" : "en-GB") : t("none"));
const fmtClock = (iso) => new Date(iso).toLocaleTimeString(lang() === "zh" ? "zh-CN" : "en-GB");
const timeAxis = (extra = {}) => ({ type: "time", splitNumber: 4, axisLabel: { hideOverlap: true }, ...extra });
const fmtNum = (n, digits = 0) => (n === null || n === undefined ? t("none") : Number(n).toFixed(digits));
const stateOf = (d) => (d.state === "online" ? "online" : d.state === "offline" ? "offline" : "unknown");
const badge = (state) => h("span", { class: `badge ${state}`, "data-state": state }, t(`state.${state}`));

function showError(where, error) {
  const text =
    error instanceof ApiError
      ? t("error.server", { status: error.status, message: error.message })
      : t("error.network", { message: error.message });
  where.append(h("div", { class: "error", role: "alert" }, text));
}

function driverErrors(health) {
  if (!health) return [];
  return Object.entries(health.drivers).filter(([, state]) => !OK_DRIVER_STATES.has(state));
}

// ---- login and the header ----

function renderLogin() {
  const input = h("input", { id: "token", type: "password", autocomplete: "off", placeholder: "cet_…", "aria-label": t("login.token") });
  const status = h("div", { id: "login-status" });
  if (loginMessage) status.append(h("div", { class: "error", role: "alert" }, loginMessage));
  const form = h(
    "form",
    {
      onsubmit: async (e) => {
        e.preventDefault();
        const candidate = input.value.trim();
        status.replaceChildren();
        if (!candidate) {
          status.append(h("div", { class: "error", role: "alert" }, t("login.empty")));
          return;
        }
        status.append(h("div", { class: "muted" }, t("login.checking")));
        try {
          const { role, schools } = await scopeOf(candidate);
          setToken(candidate);
          sessionStorage.setItem(SCOPE_KEY, role);
          sessionStorage.setItem(SCHOOLS_KEY, JSON.stringify(schools));
          loginMessage = "";
          go("#/fleet");
        } catch (error) {
          status.replaceChildren();
          showError(status, error);
        }
      },
    },
    h("label", { for: "token" }, t("login.token")),
    input,
    h("button", { type: "submit", id: "login-submit" }, t("login.submit")),
  );
  view.replaceChildren(h("section", { class: "card login" }, h("h1", {}, t("login.title")), h("p", { class: "muted" }, t("login.help")), form, status));
  input.focus();
}

function renderHeader(page) {
  const signedIn = Boolean(token());
  document.title = t("app.title");
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("logout").hidden = !signedIn;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  const scope = document.getElementById("scope");
  const role = sessionStorage.getItem(SCOPE_KEY);
  const granted = role ? (ADMIN_ROLES.has(role) ? "admin" : "read") : "";
  const schools = signedIn ? tokenSchools() : null;
  scope.hidden = !signedIn;
  scope.className = `scope ${granted}`;
  scope.dataset.scope = granted;
  scope.dataset.role = role || "";
  scope.textContent = role ? t(`role.${role}`) + (schools ? ` · ${t("scope.schools", { schools: schools.join(", ") })}` : "") : "";
  document.getElementById("lang").textContent = t("lang.switch");
}

const isAdmin = () => ADMIN_ROLES.has(sessionStorage.getItem(SCOPE_KEY));

/** The schools the token is limited to (null: every school). */
function tokenSchools() {
  try {
    const schools = JSON.parse(sessionStorage.getItem(SCHOOLS_KEY) || "null");
    return Array.isArray(schools) ? schools.map(String) : null;
  } catch {
    return null;
  }
}

function signOut(message = "") {
  clearToken();
  sessionStorage.removeItem(SCOPE_KEY);
  sessionStorage.removeItem(SCHOOLS_KEY);
  loginMessage = message;
  go("#/login");
}

/** Show `hash`: a change of hash routes by itself, the same hash is routed again. */
function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

whenUnauthorized((message) => signOut(message));

// ---- fleet ----

/** The fleet's hash for `school` (all schools: "") and a page `cursor`, keeping `limit`. */
function fleetHash(school, cursor, limit) {
  const q = new URLSearchParams();
  if (school) q.set("school", school);
  if (limit !== FLEET_PAGE) q.set("limit", String(limit));
  if (cursor) q.set("cursor", cursor);
  const qs = q.toString();
  return qs ? `#/fleet?${qs}` : "#/fleet";
}

/** The per-school table: devices, online, offline, today's attendance, open alerts; sorted by
 * the header clicked (again: the other way); each school links to its devices. */
function schoolsTable(summary) {
  const { key, desc } = schoolSort;
  // ties by school, always ascending
  const sorted = [...summary].sort((a, b) => {
    const order = key === "school_id" ? a.school_id.localeCompare(b.school_id) : a[key] - b[key];
    return (desc ? -order : order) || a.school_id.localeCompare(b.school_id);
  });
  const header = SCHOOL_COLUMNS.map(([k, label]) =>
    h(
      "th",
      { class: k === "school_id" ? "" : "num", "aria-sort": k === key ? (desc ? "descending" : "ascending") : "none" },
      h("button", {
        type: "button",
        class: "sort",
        "data-sort": k,
        onclick: () => {
          schoolSort = { key: k, desc: k === key ? !desc : k !== "school_id" };
          document.getElementById("schools").replaceWith(schoolsTable(summary));
        },
      }, t(label), k === key ? (desc ? " ▼" : " ▲") : ""),
    ),
  );
  const cells = (r) => [
    h("td", {}, h("a", { href: fleetHash(r.school_id, null, FLEET_PAGE) }, r.school_id)),
    ...SCHOOL_COLUMNS.slice(1).map(([k]) => h("td", { class: k === "open_alerts" && r[k] > 0 ? "num bad" : "num" }, r[k])),
  ];
  return h(
    "div",
    { class: "table-wrap", id: "schools" },
    h(
      "table",
      {},
      h("thead", {}, h("tr", {}, header)),
      h("tbody", {}, sorted.map((r) => h("tr", {
        "data-school": r.school_id,
        "data-devices": r.devices,
        "data-online": r.online,
        "data-offline": r.offline,
        "data-attendance": r.attendance_today,
        "data-alerts": r.open_alerts,
      }, cells(r)))),
    ),
  );
}

async function renderFleet(query) {
  const school = query.get("school") || "";
  const cursor = query.get("cursor") || "";
  const asked = Number.parseInt(query.get("limit") || "", 10);
  const limit = asked >= 1 && asked <= 1000 ? asked : FLEET_PAGE;
  // the district in one call per school row, and one page of devices (keyset paged: at
  // district size there are tens of thousands), each with its agent's latest health
  const [summary, page] = await Promise.all([
    call("/schools/summary"),
    devicePage({ limit: String(limit), ...(school ? { school } : {}), ...(cursor ? { cursor } : {}) }),
  ]);
  const devices = page.items;
  const health = new Map(devices.map((d) => [d.device_id, d.health]));
  const alertSummary = await openAlertSummary();
  const shown = school ? summary.filter((r) => r.school_id === school) : summary;
  const total = (k) => shown.reduce((n, r) => n + r[k], 0);
  const schools = summary.map((r) => r.school_id).sort();

  const picker = h(
    "select",
    { id: "school-filter", "aria-label": t("fleet.filter"), onchange: (e) => { location.hash = fleetHash(e.target.value, null, limit); } },
    h("option", { value: "" }, t("fleet.all")),
    (school && !schools.includes(school) ? [...schools, school] : schools).map((s) => h("option", { value: s, selected: s === school }, s)),
  );
  const body = [
    h("h1", {}, t("fleet.title")),
    h("div", { class: "row" }, picker, h("span", { id: "fleet-summary", class: "muted" }, t("fleet.summary", { online: total("online"), offline: total("offline"), total: total("devices") })), alertSummary),
  ];
  if (!school && summary.length) body.push(h("h2", {}, t("fleet.schools")), h("section", { class: "card" }, schoolsTable(summary)));
  if (devices.length === 0 && !cursor) body.push(h("p", { class: "notice" }, t("fleet.empty")));
  const columns = [
    ["col.device", (d) => h("a", { href: `#/device/${d.device_id}` }, d.name ? `${d.device_id} (${d.name})` : d.device_id)],
    ["col.kind", (d) => d.kind || t("none"), "hide-narrow"],
    ["col.state", (d) => badge(stateOf(d))],
    ["col.last_seen", (d) => h("span", { title: fmtTime(d.last_seen) }, ago(d.last_seen))],
    ["col.backlog", (d) => fmtNum(health.get(d.device_id)?.outbox_depth), "num"],
    ["col.gaps", (d) => h("span", { class: d.missing > 0 ? "bad" : "" }, d.missing), "num"],
    ["col.version", (d) => d.agent_version || t("none")],
    ["col.driver_errors", (d) => {
      const bad = driverErrors(health.get(d.device_id));
      return bad.length ? h("span", { class: "bad" }, bad.map(([n, s]) => `${n}: ${s}`).join(", ")) : t("none");
    }],
  ];
  const rowAttrs = (d) => ({
    class: "link",
    "data-device": d.device_id,
    "data-state": stateOf(d),
    "data-missing": d.missing,
    "data-version": d.agent_version || "",
    "data-backlog": health.get(d.device_id)?.outbox_depth ?? "",
    "data-driver-errors": driverErrors(health.get(d.device_id)).length,
    onclick: (e) => { if (e.target.tagName !== "A") location.hash = `#/device/${d.device_id}`; },
  });
  // the page's devices, in the listing's order (school, then device), grouped by room
  for (const s of [...new Set(devices.map((d) => d.school_id))]) {
    body.push(h("h2", {}, t("fleet.school", { school: s })));
    const inSchool = devices.filter((d) => d.school_id === s);
    const rooms = [...new Set(inSchool.map((d) => d.room ?? ""))].sort();
    for (const room of rooms) {
      body.push(
        h(
          "section",
          { class: "card room", "data-school": s, "data-room": room },
          h("h3", {}, room ? t("fleet.room", { room }) : t("fleet.noroom")),
          table(null, columns, inSchool.filter((d) => (d.room ?? "") === room), rowAttrs),
        ),
      );
    }
  }
  if (cursor || page.cursor) {
    body.push(
      h(
        "div",
        { class: "pager", role: "navigation", "aria-label": t("fleet.pages") },
        cursor ? h("a", { id: "first-page", href: fleetHash(school, null, limit) }, t("fleet.first")) : null,
        page.cursor ? h("a", { id: "next-page", href: fleetHash(school, page.cursor, limit) }, t("fleet.next")) : null,
      ),
    );
  }
  view.replaceChildren(...body);
}

// ---- one device ----

async function renderDevice(id) {
  const enc = encodeURIComponent(id);
  const d = await call(`/devices/${enc}`);
  const now = new Date();
  const iso = (ms) => encodeURIComponent(new Date(now.getTime() - ms).toISOString());
  const [recent, healthEvents, commands] = await Promise.all([
    pages(`/events?device=${enc}&from=${iso(3600e3)}&limit=1000`, 3),
    pages(`/events?device=${enc}&type=agent.health&from=${iso(6 * 3600e3)}&limit=1000`, 2),
    call(`/devices/${enc}/commands?limit=20`),
  ]);
  const facts = t("device.facts", { school: d.school_id, room: d.room || t("none"), kind: d.kind || t("none"), boot: d.boot ?? t("none"), min: d.min_seq ?? "", max: d.max_seq ?? "" });
  const pingStatus = h("div", { id: "ping-status" });
  const pingButton = h("button", { id: "ping", type: "button", disabled: !isAdmin(), onclick: () => sendPing(id, pingStatus) }, t("device.ping"));
  const chartSlots = [
    ["cpu", "device.cpu", (e) => e.data.cpu_pct],
    ["rss", "device.rss", (e) => e.data.rss_mb],
    ["outbox", "device.outbox", (e) => e.data.outbox_depth],
  ].map(([key, label, pick]) => ({ key, label, pick, slot: h("div", { class: "chart", id: `chart-${key}`, role: "img", "aria-label": t(label) }) }));

  const newest = recent.slice(-RECENT_EVENTS).reverse();
  view.replaceChildren(
    h("p", {}, h("a", { href: "#/fleet" }, `← ${t("device.back")}`)),
    h("h1", {}, t("device.title", { id: d.device_id }), " ", badge(stateOf(d))),
    h("p", { class: "muted", id: "device-facts" }, facts),
    h(
      "section",
      { class: "card" },
      h("div", { class: "row" }, h("span", {}, `${t("col.last_seen")}: ${ago(d.last_seen)}`), h("span", {}, `${t("col.gaps")}: ${d.missing}`), h("span", {}, `${t("col.backlog")}: ${fmtNum(d.health?.outbox_depth)}`), h("span", {}, `${t("col.version")}: ${d.agent_version || t("none")}`)),
      driverErrors(d.health).length ? h("p", { class: "bad" }, `${t("col.driver_errors")}: ${driverErrors(d.health).map(([n, s]) => `${n}: ${s}`).join(", ")}`) : null,
    ),
    h("h2", {}, t("device.health")),
    healthEvents.length
      ? h("div", { class: "charts card", id: "health-charts", "data-points": healthEvents.length }, chartSlots.map((c) => h("div", {}, h("h3", {}, t(c.label)), c.slot)))
      : h("p", { class: "notice" }, t("device.nohealth")),
    h("h2", {}, t("device.commands")),
    h(
      "section",
      { class: "card" },
      h("div", { class: "row" }, pingButton, isAdmin() ? null : h("span", { class: "muted", id: "ping-readonly" }, t("device.ping_readonly"))),
      pingStatus,
      commands.length
        ? table("commands", [
            ["col.command", (c) => c.name],
            ["col.status", (c) => h("span", { "data-status": c.status }, c.status)],
            ["col.created", (c) => fmtTime(c.created_at)],
            ["col.detail", (c) => (c.detail === null || c.detail === undefined ? t("none") : JSON.stringify(c.detail)), "data"],
          ], commands, (c) => ({ "data-command": c.id, "data-status": c.status }))
        : h("p", { class: "muted" }, t("device.nocommands")),
    ),
    h("h2", {}, t("device.events")),
    newest.length
      ? table("events", [
          ["col.time", (e) => h("span", { title: fmtTime(e.time) }, fmtClock(e.time)), "nowrap"],
          ["col.seq", (e) => e.seq, "num"],
          ["col.type", (e) => e.type],
          ["col.data", (e) => JSON.stringify(e.data), "data"],
        ], newest, (e) => ({ "data-seq": e.seq }))
      : h("p", { class: "muted" }, t("device.noevents")),
  );
  for (const c of healthEvents.length ? chartSlots : []) {
    await drawChart(c.slot, {
      xAxis: timeAxis(),
      yAxis: { type: "value", scale: true },
      series: [{ type: "line", name: t(c.label), showSymbol: false, data: healthEvents.map((e) => [e.time, c.pick(e)]) }],
    });
  }
}

async function sendPing(id, status) {
  status.replaceChildren();
  let command;
  try {
    command = await call(`/devices/${encodeURIComponent(id)}/commands`, { method: "POST", body: { name: "ping", ttl_s: 120 } });
  } catch (error) {
    showError(status, error);
    return;
  }
  status.append(h("p", { class: "muted" }, t("device.ping_sent", { id: command.id })));
  let stop = false;
  const previousLeave = leave;
  leave = () => { stop = true; previousLeave(); };
  for (let i = 0; i < PING_POLLS && !stop; i++) {
    await new Promise((resolve) => setTimeout(resolve, PING_POLL_MS));
    const now = await call(`/commands/${encodeURIComponent(command.id)}`).catch(() => null);
    if (stop) return;
    if (now && !["pending", "sent"].includes(now.status)) {
      route(); // redraw with the answered command in the list
      return;
    }
  }
}

// ---- live feed ----

function renderLive() {
  const status = h("span", { id: "live-status", class: "muted", "data-status": "connecting" }, t("live.connecting"));
  const count = h("span", { id: "live-count", class: "muted" });
  const tbody = h("tbody", { id: "feed" });
  let paused = false;
  const pause = h("button", { type: "button", class: "plain", id: "live-pause", onclick: () => { paused = !paused; pause.textContent = t(paused ? "live.resume" : "live.pause"); } }, t("live.pause"));
  const clear = h("button", { type: "button", class: "plain", onclick: () => { tbody.replaceChildren(); updateCount(); } }, t("live.clear"));
  const notices = h("div");
  const updateCount = () => { count.textContent = t("live.count", { n: tbody.children.length, max: LIVE_MAX }); };
  view.replaceChildren(
    h("h1", {}, t("live.title")),
    h("p", { class: "muted" }, t("live.help")),
    h("div", { class: "row" }, status, pause, clear, count),
    notices,
    h(
      "div",
      { class: "table-wrap card" },
      h("table", {}, h("thead", {}, h("tr", {}, ["col.time", "col.school", "col.device", "col.seq", "col.type", "col.data"].map((k) => h("th", { class: k === "col.seq" ? "num" : (k === "col.school" ? "hide-narrow" : "") }, t(k))))), tbody),
    ),
  );
  updateCount();
  const source = new EventSource(liveUrl());
  source.onopen = () => { status.textContent = t("live.connected"); status.dataset.status = "connected"; notices.replaceChildren(); };
  source.onerror = () => { status.textContent = t("live.lost"); status.dataset.status = "lost"; };
  source.addEventListener("dropped", (m) => {
    let reason = "";
    try { reason = JSON.parse(m.data).reason; } catch { reason = m.data; }
    notices.replaceChildren(h("div", { class: "notice" }, t("live.dropped", { reason })));
  });
  source.onmessage = (m) => {
    if (paused) return;
    let e;
    try { e = JSON.parse(m.data); } catch { return; }
    const row = h(
      "tr",
      { class: "fresh", "data-device": e.device_id, "data-seq": e.seq },
      h("td", { class: "nowrap", title: fmtTime(e.time) }, fmtClock(e.time)),
      h("td", { class: "hide-narrow" }, e.school_id),
      h("td", {}, h("a", { href: `#/device/${e.device_id}` }, e.device_id)),
      h("td", { class: "num" }, e.seq),
      h("td", {}, e.type),
      h("td", { class: "data" }, JSON.stringify(e.data)),
    );
    tbody.prepend(row);
    while (tbody.children.length > LIVE_MAX) tbody.lastElementChild.remove();
    updateCount();
  };
  return () => source.close();
}

// ---- data quality ----

async function renderQuality() {
  const devices = await allDevices(); // page by page (bounded), not one call for the district
  const gaps = devices.filter((d) => d.missing > 0).sort((a, b) => b.missing - a.missing);
  const quarantine = h("section", { class: "card", id: "quarantine" });
  view.replaceChildren(
    h("h1", {}, t("quality.title")),
    h("h2", {}, t("quality.gaps")),
    h(
      "section",
      { class: "card" },
      gaps.length
        ? table("gaps", [
            ["col.device", (d) => h("a", { href: `#/device/${d.device_id}` }, d.device_id)],
            ["col.school", (d) => d.school_id],
            ["col.gaps", (d) => d.missing, "num"],
            ["col.events", (d) => d.event_count, "num"],
            ["col.last_seen", (d) => ago(d.last_seen)],
          ], gaps, (d) => ({ "data-device": d.device_id, "data-missing": d.missing }))
        : h("p", { class: "muted" }, t("quality.nogaps")),
    ),
    h("h2", {}, t("quality.quarantine")),
    quarantine,
  );
  if (!isAdmin()) {
    quarantine.append(h("p", { class: "notice", id: "quarantine-admin-only" }, t("quality.admin_only")));
    return;
  }
  let reasons;
  try {
    reasons = await call("/quarantine/reasons");
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) {
      quarantine.append(h("p", { class: "notice", id: "quarantine-admin-only" }, t("quality.admin_only")));
      return;
    }
    throw error;
  }
  if (!reasons.length) {
    quarantine.append(h("p", { class: "muted" }, t("quality.noquarantine")));
    return;
  }
  const slot = h("div", { class: "chart", id: "chart-quarantine" });
  quarantine.append(
    slot,
    table("reasons", [
      ["col.reason", (r) => r.reason],
      ["col.count", (r) => r.count, "num"],
      ["col.last", (r) => fmtTime(r.last)],
    ], reasons, (r) => ({ "data-reason": r.reason, "data-count": r.count })),
  );
  const short = (s) => (s.length > 28 ? `${s.slice(0, 27)}…` : s);
  await drawChart(slot, {
    grid: { left: 16, right: 24, top: 16, bottom: 16, containLabel: true },
    tooltip: { trigger: "item" },
    xAxis: { type: "value", minInterval: 1 },
    yAxis: { type: "category", inverse: true, data: reasons.map((r) => short(r.reason)) },
    series: [{ type: "bar", name: t("col.count"), data: reasons.map((r) => r.count), itemStyle: { color: "#c62828" } }],
  });
}

// ---- today's rollups ----

async function renderRollups() {
  // Rollup days are the district's local days: its today, from its midnight.
  const { today: day, today_start: since, timezone: tz } = await meta();
  const [devices, attendance, board, env] = await Promise.all([
    allDevices(), // the rooms of the boards, page by page (bounded)
    call(`/rollups/attendance?from=${day}&to=${day}`),
    call(`/rollups/board-power?from=${day}&to=${day}`),
    call(`/rollups/env?metric=co2_ppm&from=${encodeURIComponent(since)}`),
  ]);
  const roomOf = new Map(devices.map((d) => [d.device_id, `${d.school_id} / ${d.room || t("none")}`]));

  const classes = attendance.items.map((r) => ({ ...r, label: `${r.school_id} / ${r.class_id || t("none")}` }));
  const perRoom = new Map();
  for (const r of board.items) {
    const room = roomOf.get(r.device_id) || `${r.school_id} / ${t("none")}`;
    perRoom.set(room, (perRoom.get(room) || 0) + (r.on_minutes || 0));
  }
  const boardRows = [...perRoom.entries()].sort().map(([room, minutes]) => ({ room, minutes }));

  // CO2: per room and bucket, the mean of its sensors' 5-minute averages
  const co2 = new Map(); // room -> Map(bucket -> [sum, n])
  for (const r of env.items) {
    if (r.avg === null) continue;
    const room = roomOf.get(r.device_id) || `${r.school_id} / ${t("none")}`;
    if (!co2.has(room)) co2.set(room, new Map());
    const slot = co2.get(room).get(r.bucket) || [0, 0];
    co2.get(room).set(r.bucket, [slot[0] + r.avg, slot[1] + 1]);
  }
  const co2Series = [...co2.entries()].sort().map(([room, buckets]) => ({
    room,
    points: [...buckets.entries()].sort(([a], [b]) => new Date(a) - new Date(b)).map(([b, [sum, n]]) => [b, sum / n]),
  }));
  const co2Rows = co2Series.map(({ room, points }) => ({
    room,
    latest: points[points.length - 1],
    max: Math.max(...points.map((p) => p[1])),
  }));

  const attendanceChart = h("div", { class: "chart", id: "chart-attendance" });
  const boardChart = h("div", { class: "chart", id: "chart-board" });
  const co2Chart = h("div", { class: "chart", id: "chart-co2" });
  const none = () => h("p", { class: "muted" }, t("rollups.none"));
  view.replaceChildren(
    h("h1", {}, t("rollups.title", { day, tz })),
    h("h2", {}, t("rollups.attendance")),
    h("section", { class: "card" }, classes.length ? [attendanceChart, table("attendance", [
      ["col.class", (r) => r.label],
      ["col.checkins", (r) => r.checkins, "num"],
      ["col.on_time", (r) => r.on_time, "num"],
      ["col.late", (r) => r.late, "num"],
      ["col.outside", (r) => r.outside_period, "num"],
    ], classes, (r) => ({ "data-class": r.class_id || "", "data-checkins": r.checkins, "data-late": r.late }))] : none()),
    h("h2", {}, t("rollups.board")),
    h("section", { class: "card" }, boardRows.length ? [boardChart, table("board", [
      ["col.room", (r) => r.room],
      ["col.on_minutes", (r) => fmtNum(r.minutes, 1), "num"],
    ], boardRows, (r) => ({ "data-room": r.room, "data-minutes": r.minutes.toFixed(1) }))] : none()),
    h("h2", {}, t("rollups.co2")),
    h("section", { class: "card" }, co2Rows.length ? [co2Chart, table("co2", [
      ["col.room", (r) => r.room],
      ["col.bucket", (r) => fmtTime(r.latest[0])],
      ["col.co2_latest", (r) => fmtNum(r.latest[1]), "num"],
      ["col.co2_max", (r) => fmtNum(r.max), "num"],
    ], co2Rows, (r) => ({ "data-room": r.room, "data-latest": r.latest[1].toFixed(1), "data-max": r.max.toFixed(1) }))] : none()),
  );
  if (classes.length) {
    await drawChart(attendanceChart, {
      legend: { top: 0 },
      xAxis: { type: "category", data: classes.map((r) => r.label) },
      yAxis: { type: "value", minInterval: 1 },
      series: [
        ["col.on_time", "on_time", "#1a7f37"],
        ["col.late", "late", "#9a6700"],
        ["col.outside", "outside_period", "#5d6b7a"],
      ].map(([label, key, color]) => ({ type: "bar", stack: "checkins", name: t(label), itemStyle: { color }, data: classes.map((r) => r[key]) })),
    });
  }
  if (boardRows.length) {
    await drawChart(boardChart, {
      xAxis: { type: "category", data: boardRows.map((r) => r.room) },
      yAxis: { type: "value", name: t("col.on_minutes") },
      series: [{ type: "bar", name: t("col.on_minutes"), data: boardRows.map((r) => Number(r.minutes.toFixed(1))) }],
    });
  }
  if (co2Series.length) {
    await drawChart(co2Chart, {
      legend: { top: 0 },
      xAxis: timeAxis({ min: since, max: new Date().toISOString() }),
      yAxis: { type: "value", name: "ppm", scale: true },
      series: co2Series.map(({ room, points }) => ({ type: "line", name: room, showSymbol: points.length < 30, data: points })),
    });
  }
}

// ---- fleet rollouts ----

const OUTCOMES = ["ok", "failed", "pending", "sent", "skipped"];
const progressText = (r) => OUTCOMES.map((o) => r.counts[o]).join(" / ");
const whatText = (r) => (r.what === "config" ? "config" : `${r.command_name}`);

async function renderRollouts() {
  const rollouts = await call("/rollouts?limit=100");
  view.replaceChildren(
    h("h1", {}, t("rollouts.title")),
    h("section", { class: "card" }, rollouts.length ? table("rollouts", [
      ["col.id", (r) => h("a", { href: `#/rollout/${r.id}` }, String(r.id))],
      ["col.what", whatText],
      ["col.rollout_state", (r) => h("span", { class: `badge ${r.state}`, "data-state": r.state }, r.state)],
      ["col.progress", progressText, "num"],
      ["col.reason", (r) => r.reason || t("none")],
    ], rollouts, (r) => ({ "data-rollout": r.id, "data-state": r.state })) : h("p", { class: "muted" }, t("rollouts.none"))),
  );
}

async function renderRollout(id) {
  const r = await call(`/rollouts/${encodeURIComponent(id)}?limit=1000`);
  const status = h("p", { class: "muted", id: "rollout-status" });
  const act = (action) => h("button", {
    type: "button",
    id: `rollout-${action}`,
    onclick: async () => {
      try {
        await call(`/rollouts/${r.id}/${action}`, { method: "POST" });
        go(`#/rollout/${r.id}`);
      } catch (error) {
        status.replaceChildren();
        showError(status, error);
      }
    },
  }, t(`rollout.${action}`));
  const buttons = [];
  if (r.state === "running") buttons.push(act("pause"));
  if (r.state === "paused" || r.state === "halted") buttons.push(act("resume"));
  if (["running", "paused", "halted"].includes(r.state)) buttons.push(act("abort"));
  view.replaceChildren(
    h("h1", {}, t("rollout.title", { id: r.id })),
    h("section", { class: "card", id: "rollout-head", "data-state": r.state },
      h("p", {}, `${whatText(r)} · `, h("span", { class: `badge ${r.state}` }, r.state), ` · ${t("col.progress")}: `, h("span", { id: "rollout-counts" }, progressText(r))),
      r.reason ? h("p", { class: "muted" }, r.reason) : null,
      h("div", { class: "actions" }, buttons),
      status),
    h("h2", {}, t("rollout.devices")),
    h("section", { class: "card" }, table("rollout-devices", [
      ["col.device", (d) => h("a", { href: `#/device/${d.device_id}` }, d.device_id)],
      ["col.batch", (d) => (d.batch === null ? t("none") : String(d.batch)), "num"],
      ["col.outcome", (d) => h("span", { class: `badge ${d.outcome}` }, d.outcome)],
      ["col.detail", (d) => d.detail || t("none")],
    ], r.devices, (d) => ({ "data-device": d.device_id, "data-outcome": d.outcome }))),
  );
}

// ---- router ----

async function route() {
  leave();
  leave = () => {};
  disposeCharts();
  const [path, qs] = (location.hash.replace(/^#/, "") || "/fleet").split("?");
  const [, page = "fleet", arg] = path.split("/");
  if (!token()) {
    renderHeader("login");
    renderLogin();
    return;
  }
  renderHeader(page);
  view.replaceChildren(h("p", { class: "muted" }, t("loading")));
  view.dataset.page = page;
  view.dataset.ready = "";
  try {
    if (page === "device" && arg) await renderDevice(decodeURIComponent(arg));
    else if (page === "live") leave = renderLive();
    else if (page === "quality") await renderQuality();
    else if (page === "rollups") await renderRollups();
    else if (page === "alerts") await renderAlerts(view);
    else if (page === "rollouts") await renderRollouts();
    else if (page === "rollout" && arg) await renderRollout(decodeURIComponent(arg));
    else if (page === "login") { location.hash = "#/fleet"; return; }
    else await renderFleet(new URLSearchParams(qs || ""));
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return; // already back at the login
    view.replaceChildren();
    showError(view, error);
  }
  view.dataset.ready = page; // tests wait for this: the page has its data
}

document.getElementById("lang").addEventListener("click", () => {
  setLang(lang() === "zh" ? "en" : "zh");
  route();
});
document.getElementById("logout").addEventListener("click", () => signOut());
addEventListener("hashchange", route);
setLang(lang());
route();
