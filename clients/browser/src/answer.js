// What an answer to GET /token means: a token with its times moved onto the browser's clock, or a failure of
// some kind (schedule.js's classify) with the BFF's error and its Retry-After.
import { TokenError } from "./errors.js";
import { classify, parseRetryAfter } from "./schedule.js";

/**
 * @typedef {import("./schedule.js").Grant & { refreshAtServer: number, expiresAtServer: number }} HeldGrant
 * @typedef {{ kind: "signed_out" | "retry" | "fatal", error: TokenError, retryAfter: number | null }} Failed
 * @typedef {{ grant: HeldGrant } | Failed} Answer
 */

/**
 * @param {Response} response the BFF's answer, headers in
 * @param {string} url what was asked, for the error's message
 * @param {number} receivedAt the browser's clock when the headers came
 * @returns {Promise<Answer>}
 */
export async function readAnswer(response, url, receivedAt) {
  // The BFF's times are on its clock. A browser clock running ahead of it would make each new token look due
  // at once, so times are moved onto the browser's clock by the difference its Date header shows.
  const serverNow = Date.parse(response.headers.get("Date") ?? "");
  const skew = Number.isNaN(serverNow) ? 0 : receivedAt - serverNow;
  /** @type {any} */
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Checked below: a body that is not JSON is a failure like any other.
  }
  const kind = classify(response.status);
  if (kind === "ok") {
    const grant = body && toGrant(body, skew, receivedAt);
    if (grant) return { grant };
    const error = new TokenError(response.status, `GET ${url}: the answer has no token`);
    return { kind: "retry", error, retryAfter: null };
  }
  const said = body?.error ?? {};
  // The status and the BFF's code and reason: its message may name things the page has no use for.
  const message = `GET ${url}: ${response.status} ${said.code ?? ""} ${said.reason ?? ""}`.replace(/ +/g, " ").trim();
  const retryAfter = parseRetryAfter(response.headers.get("Retry-After"), receivedAt, skew);
  return { kind, error: new TokenError(response.status, message, said), retryAfter };
}

/**
 * The BFF's body as a grant on the browser's clock, or null when it is not one.
 * @param {any} body
 * @param {number} skew the browser's clock minus the BFF's
 * @param {number} receivedAt
 * @returns {HeldGrant | null}
 */
function toGrant(body, skew, receivedAt) {
  const refreshAtServer = Date.parse(body.refresh_after);
  const expiresAtServer = Date.parse(body.expires_at);
  if (typeof body.token !== "string" || Number.isNaN(refreshAtServer) || Number.isNaN(expiresAtServer)) return null;
  return {
    token: body.token,
    identity: String(body.identity ?? ""),
    refreshAt: refreshAtServer + skew,
    expiresAt: expiresAtServer + skew,
    refreshAtServer,
    expiresAtServer,
    receivedAt,
  };
}

/**
 * Whether another tab's message holds a grant (a tab of another version could send anything).
 * @param {any} value
 * @returns {value is HeldGrant}
 */
export function isGrant(value) {
  return (
    typeof value?.token === "string" &&
    ["refreshAt", "expiresAt", "receivedAt", "refreshAtServer", "expiresAtServer"].every(
      (key) => typeof value[key] === "number",
    )
  );
}
