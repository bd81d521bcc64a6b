// What the page is told through its hooks: the provider's state as one word with its times, and each token with
// where it came from. A hook's throw is the page's bug, never the provider's.
import { grantState } from "./schedule.js";

/**
 * @typedef {"fresh" | "refreshing" | "stale" | "expired" | "signed_out" | "failing"} State
 * fresh: a token before its refresh_after. refreshing: fetching one. stale: past refresh_after, still valid,
 * a retry waits. expired: past exp, a retry waits. signed_out: the BFF answered 401. failing: no usable token
 * and the last attempt failed (400/403: for good, until `refresh()`; else a retry waits).
 *
 * @typedef {object} StateInfo
 * @property {Error | null} error the last failure, while none succeeded since
 * @property {number | null} retryAt when the next attempt starts (browser clock, ms), if one waits
 * @property {number | null} refreshAt when the token falls due (browser clock, ms)
 * @property {number | null} expiresAt when the token expires (browser clock, ms)
 *
 * @typedef {object} TokenInfo
 * @property {string} identity
 * @property {Date} refreshAfter the BFF's refresh_after
 * @property {Date} expiresAt the BFF's expires_at
 * @property {"fetch" | "tab"} from fetched by this provider, or by another tab's and shared
 *
 * @typedef {object} Held what the provider holds, as far as its state goes
 * @property {import("./answer.js").HeldGrant | null} grant
 * @property {(import("./schedule.js").Failure & { error: Error }) | null} failure
 * @property {boolean} refreshing from the decision to refresh until its result (ours or another tab's) is in
 */

/**
 * The provider's state at `now`.
 * @param {Held} held
 * @param {number} now
 * @returns {State}
 */
export function stateOf({ grant, failure, refreshing }, now) {
  if (failure?.kind === "signed_out") return "signed_out";
  if (refreshing) return "refreshing";
  const token = grantState(grant, now);
  if (failure?.kind === "fatal") return token === "fresh" || token === "stale" ? token : "failing";
  if (token === "none") return failure ? "failing" : "refreshing";
  return token;
}

/**
 * What onState is told, only when the state or the error changed since it was last told.
 * @param {((state: State, info: StateInfo) => void) | undefined} onState
 * @returns {(held: Held, now: number) => void}
 */
export function stateReporter(onState) {
  /** @type {State | null} */
  let told = null;
  /** @type {Error | null} */
  let toldError = null;
  return ({ grant, failure, refreshing }, now) => {
    const state = stateOf({ grant, failure, refreshing }, now);
    const error = failure?.error ?? null;
    if (state === told && error === toldError) return;
    told = state;
    toldError = error;
    tell(onState, state, {
      error,
      retryAt: failure?.kind === "retry" ? failure.retryAt : null,
      refreshAt: grant?.refreshAt ?? null,
      expiresAt: grant?.expiresAt ?? null,
    });
  };
}

/**
 * What onToken and the subscribers are told with a token.
 * @param {import("./answer.js").HeldGrant} grant
 * @param {"fetch" | "tab"} from
 * @returns {TokenInfo}
 */
export function tokenInfo(grant, from) {
  return {
    identity: grant.identity,
    refreshAfter: new Date(grant.refreshAtServer),
    expiresAt: new Date(grant.expiresAtServer),
    from,
  };
}

/**
 * Call one of the page's hooks. A throw is the page's bug, not the provider's: it is reported as uncaught, and
 * the provider carries on (a throw from onState in the middle of accepting a token would lose the token).
 * @template {unknown[]} A
 * @param {((...args: A) => void) | undefined} hook
 * @param {A} args
 */
export function tell(hook, ...args) {
  try {
    hook?.(...args);
  } catch (error) {
    queueMicrotask(() => {
      throw error;
    });
  }
}
