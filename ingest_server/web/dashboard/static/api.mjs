// The API client: the token lives in sessionStorage; a 401 sends the user back to the login.

const TOKEN_KEY = "campus.token";
const API = "/api/v1";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const token = () => sessionStorage.getItem(TOKEN_KEY);
export const setToken = (value) => sessionStorage.setItem(TOKEN_KEY, value);
export const clearToken = () => sessionStorage.removeItem(TOKEN_KEY);

let onUnauthorized = () => {};
/** Called with the server's message when a call answers 401. */
export function whenUnauthorized(handler) {
  onUnauthorized = handler;
}

/** FastAPI's `detail` as one line: a string, or a 422's list of {loc, msg}. */
function detailText(body, fallback) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  }
  return fallback;
}

/** `method path` with the token; the JSON answer, or an ApiError saying what the server said. */
export async function call(path, options = {}) {
  return (await request(path, options)).body;
}

/** One page of the device listing (keyset paged by the `X-Next-Cursor` header): its devices
 * and the cursor of the next page (null on the last). */
export async function devicePage(params) {
  const { body, headers } = await request(`/devices?${new URLSearchParams(params)}`);
  return { items: body, cursor: headers.get("X-Next-Cursor") };
}

/** Every device matching `params`, page by page (pages of 1000, at most `maxPages`: a view that
 * needs them all stays bounded at district size). */
export async function allDevices(params = {}, maxPages = 30) {
  const items = [];
  let cursor = null;
  for (let i = 0; i < maxPages; i++) {
    const page = await devicePage({ ...params, limit: "1000", ...(cursor ? { cursor } : {}) });
    items.push(...page.items);
    cursor = page.cursor;
    if (!cursor) break;
  }
  return items;
}

async function request(path, { method = "GET", body, tokenOverride, quiet401 = false } = {}) {
  const headers = { Accept: "application/json" };
  const bearer = tokenOverride ?? token();
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(API + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let parsed = null;
  try {
    parsed = await resp.json();
  } catch {
    parsed = null;
  }
  if (!resp.ok) {
    const error = new ApiError(resp.status, detailText(parsed, resp.statusText));
    if (resp.status === 401 && !quiet401) onUnauthorized(error.message);
    throw error;
  }
  return { body: parsed, headers: resp.headers };
}

/** Up to `maxPages` pages of a cursor listing, concatenated. */
export async function pages(path, maxPages = 5) {
  const items = [];
  let next = path;
  for (let i = 0; i < maxPages && next; i++) {
    const page = await call(next);
    items.push(...page.items);
    next = page.cursor ? `${path}${path.includes("?") ? "&" : "?"}cursor=${encodeURIComponent(page.cursor)}` : null;
  }
  return items;
}

/** The server's /meta: district time zone and today, version, and the token's role and schools. */
export const meta = (candidate) => call("/meta", candidate ? { tokenOverride: candidate, quiet401: true } : {});

/** Roles that send commands and read quarantine (a school admin: for its schools only). */
export const ADMIN_ROLES = new Set(["district_admin", "school_admin"]);

/** What the token may do, as the server says: its role and schools (null: every school). The
 * server already cuts every answer to those schools; the dashboard only says so. An older
 * server without roles: its scopes ("admin" was district-wide). */
export async function scopeOf(candidate) {
  const m = await meta(candidate);
  const role = m.role || (m.scopes.includes("admin") ? "district_admin" : "reader");
  return { role, schools: Array.isArray(m.schools) ? m.schools : null };
}

/** The live stream URL (EventSource cannot send headers, so the token rides in the query). */
export const liveUrl = () => `${API}/live?access_token=${encodeURIComponent(token() || "")}`;
