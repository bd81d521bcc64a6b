// When to fetch the next token, as a pure function of the clock and what happened so far: no timers, no I/O,
// no randomness of its own (the caller passes `random`), so Node's test runner can check every case.
// Every time here is milliseconds on the browser's clock (Date.now()); the provider converts the BFF's times
// to it with the skew it measured from the BFF's Date header.

/** The longest wait between two attempts after failures (and the cap of the exponential backoff). */
export const MAX_BACKOFF_MS = 5 * 60 * 1000;
/** The first backoff's cap; each failure in a row doubles it, up to MAX_BACKOFF_MS. */
export const BASE_BACKOFF_MS = 1000;
/** Retry-After is honoured, then stretched by up to this fraction: tabs told the same do not return together. */
export const RETRY_AFTER_JITTER = 0.2;
/**
 * The longest a fetch may take before it counts as a network error: a connection that died while the laptop
 * slept can leave a fetch with no answer and no error, holding the tabs' lock, and so every tab's refresh.
 */
export const FETCH_TIMEOUT_MS = 30_000;
/** The least time between two fetches that succeeded: whatever the clocks say, the BFF is not hammered. */
export const MIN_REFRESH_MS = 5000;

/**
 * @typedef {object} Grant A token as the provider keeps it, its times on the browser's clock.
 * @property {string} token
 * @property {string} identity
 * @property {number} refreshAt when to get the next one (the BFF's refresh_after)
 * @property {number} expiresAt when it stops working (the BFF's expires_at, the JWT's exp)
 * @property {number} receivedAt when it arrived
 */

/**
 * @typedef {"signed_out" | "retry" | "fatal"} FailureKind
 * @typedef {object} Failure The last attempt's failure, while no attempt has succeeded since.
 * @property {FailureKind} kind
 * @property {number} at when it failed
 * @property {number} retryAt when the next attempt may start (kind "retry" only)
 * @property {number} attempts failures in a row, this one included
 */

/**
 * What the answer to a GET /token means for the next attempt.
 * @param {number} status the HTTP status, or 0 for a network error (no answer at all)
 * @returns {"ok" | FailureKind}
 */
export function classify(status) {
  if (status >= 200 && status < 300) return "ok";
  // Not signed in: asking again will not sign anybody in; the app must.
  if (status === 401) return "signed_out";
  // No answer, too many requests, or the BFF or what is behind it failing: waiting may cure these.
  if (status === 0 || status === 408 || status === 429 || status >= 500) return "retry";
  // 400, 403 and the rest: the same request would get the same answer.
  return "fatal";
}

/**
 * A Retry-After header's delay: whole seconds, or an HTTP date (RFC 9110 section 10.2.3).
 * @param {string | null | undefined} header
 * @param {number} now the browser's clock, for a date
 * @param {number} skew the browser's clock minus the server's, for a date
 * @returns {number | null} milliseconds from now (never negative), or null when there is none or it is unreadable
 */
export function parseRetryAfter(header, now, skew = 0) {
  if (header == null) return null;
  const text = header.trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const date = Date.parse(text);
  if (Number.isNaN(date) || !/[a-z]/i.test(text)) return null;
  return Math.max(0, date + skew - now);
}

/**
 * How long to wait after `attempts` failures in a row: "full jitter" (a uniform draw between nothing and the
 * exponential cap), which spreads clients out best when many failed at once.
 * @param {number} attempts failures in a row, at least 1
 * @param {number} random a number in [0, 1)
 */
export function backoffDelay(attempts, random) {
  const cap = Math.min(MAX_BACKOFF_MS, BASE_BACKOFF_MS * 2 ** Math.min(30, Math.max(0, attempts - 1)));
  return Math.floor(random * cap);
}

/**
 * When the attempt after a retryable failure may start.
 * @param {number} at when it failed
 * @param {number} attempts failures in a row, this one included
 * @param {number | null} retryAfterMs the server's Retry-After, if it gave one
 * @param {number} random a number in [0, 1)
 */
export function retryTime(at, attempts, retryAfterMs, random) {
  const backoff = backoffDelay(attempts, random);
  if (retryAfterMs !== null) {
    // Never sooner than the server asked; a little later, by a different amount in each tab. Nor sooner than
    // the backoff: a Retry-After of 0 or a date already past (or a skewed clock) must not make a retry loop.
    return at + Math.max(backoff, Math.min(MAX_BACKOFF_MS, retryAfterMs) * (1 + RETRY_AFTER_JITTER * random));
  }
  return at + backoff;
}

/**
 * The failure with its times moved back by as much as the clock was set back since: a retry never waits longer
 * than was decided when it failed.
 * @template {Failure} F
 * @param {F | null} failure
 * @param {number} now
 * @returns {F | null} the same failure, unless the clock was set back
 */
export function rebaseFailure(failure, now) {
  if (failure === null || now >= failure.at) return failure;
  return { ...failure, at: now, retryAt: now + (failure.retryAt - failure.at) };
}

/**
 * The token's state at `now`, when no fetch is in flight and nothing failed for good.
 * @param {Grant | null} grant
 * @param {number} now
 * @returns {"fresh" | "stale" | "expired" | "none"}
 */
export function grantState(grant, now) {
  if (grant === null) return "none";
  if (now >= grant.expiresAt) return "expired";
  return now >= grant.refreshAt ? "stale" : "fresh";
}

/**
 * @typedef {object} Step
 * @property {"fetch" | "wait" | "idle"} action fetch now; wait `delay` ms then ask again; or nothing until told
 * @property {number} delay milliseconds to wait ("wait" only; 0 otherwise)
 */

/**
 * The provider's next step. It waits for the earliest moment something changes: the token falls due
 * (refresh_after), the token expires (so the app hears "expired" on time, even while a retry waits), or a
 * retry may start. It never waits past exp without waking up to say so.
 * @param {object} input
 * @param {number} input.now
 * @param {Grant | null} input.grant the newest token
 * @param {Failure | null} input.failure the last failure, if none succeeded since
 * @returns {Step}
 */
export function nextStep({ now, grant, failure }) {
  if (failure !== null && failure.kind !== "retry") return { action: "idle", delay: 0 };
  /** @type {number[]} */
  const moments = [];
  if (failure !== null) {
    if (now >= failure.retryAt) return { action: "fetch", delay: 0 };
    moments.push(failure.retryAt);
  } else if (grant === null) {
    return { action: "fetch", delay: 0 };
  } else if (now < grant.receivedAt) {
    // A clock set back since the token came: its times on this clock no longer say when it expires. A new
    // token's do (and its receivedAt ends this).
    return { action: "fetch", delay: 0 };
  } else {
    // Due at refresh_after (or exp, should a BFF send a refresh_after later than that), but never sooner than
    // MIN_REFRESH_MS after the last token came.
    const due = Math.max(Math.min(grant.refreshAt, grant.expiresAt), grant.receivedAt + MIN_REFRESH_MS);
    if (now >= due) return { action: "fetch", delay: 0 };
    moments.push(due);
  }
  if (grant !== null && now < grant.expiresAt) moments.push(grant.expiresAt);
  return { action: "wait", delay: Math.max(0, Math.min(...moments) - now) };
}
