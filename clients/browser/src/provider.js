// The token provider: keeps a token from the BFF's GET /token in memory and a new one coming before it is due,
// through background tabs, sleep, offline spells and a failing BFF. When to act is decided by schedule.js;
// this module does the fetching, the timers, the browser's events and the bookkeeping.
import { isGrant, readAnswer } from "./answer.js";
import { ProviderStoppedError, TokenError } from "./errors.js";
import { FETCH_TIMEOUT_MS, grantState, nextStep, rebaseFailure, retryTime } from "./schedule.js";
import { connectTabs } from "./tabs.js";

/** setTimeout's largest delay; a longer one fires at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

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
 * @typedef {object} ProviderOptions
 * @property {string} [url] the BFF's token endpoint (default "/token")
 * @property {(token: string, info: TokenInfo) => void} [onToken] each new token, the first included
 * @property {(state: State, info: StateInfo) => void} [onState] each change of state
 * @property {(error: TokenError) => void} [onSignedOut] once when the BFF answers 401 (again only after a token
 * came, or after `refresh()`)
 * @property {typeof fetch} [fetch]
 * @property {RequestInit} [init] extra fetch options (e.g. credentials: "include" for a BFF on another origin;
 * a `signal` of the app's replaces the provider's, which aborts a fetch after FETCH_TIMEOUT_MS and on stop())
 * @property {boolean} [shareAcrossTabs] one fetch for all tabs of the origin (default true)
 * @property {() => number} [now] the clock (default Date.now)
 * @property {() => number} [random] in [0, 1) (default Math.random)
 * @property {{ setTimeout: typeof setTimeout, clearTimeout: typeof clearTimeout }} [timers]
 * @property {EventTarget | null} [window] where online, focus and pageshow fire (default globalThis)
 * @property {EventTarget | null} [document] where visibilitychange and resume fire (default globalThis.document)
 * @property {object} [platform] where navigator.locks and BroadcastChannel come from (default globalThis)
 */

/**
 * A provider of tokens from `url`. It fetches the first at once.
 * @param {ProviderOptions} [options]
 */
export function tokenProvider(options = {}) {
  const url = options.url ?? "/token";
  const fetchToken = options.fetch ?? globalThis.fetch.bind(globalThis);
  const now = options.now ?? Date.now;
  const random = options.random ?? Math.random;
  const timers = options.timers ?? globalThis;
  const win = options.window === undefined ? globalThis : options.window;
  const doc = options.document === undefined ? globalThis.document : options.document;

  /** @type {import("./answer.js").HeldGrant | null} */
  let grant = null;
  /** @type {(import("./schedule.js").Failure & { error: TokenError }) | null} */
  let failure = null;
  /** @type {Promise<void> | null} */
  let inflight = null;
  // From the decision to refresh until its result (ours or another tab's) is in: "refreshing".
  let refreshing = false;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  /** @type {{ abort: () => void } | null} ends the fetch in flight and its deadline */
  let aborter = null;
  let stopped = false;
  // Until the other tabs answered whether one holds a fresh token: no fetch of our own meanwhile.
  let asking = false;
  let signedOutTold = false;
  /** @type {State | null} */
  let state = null;
  /** @type {Error | null} */
  let reportedError = null;
  /** @type {Set<(token: string, info: TokenInfo) => void>} */
  const listeners = new Set();
  /** @type {{ resolve: (token: string) => void, reject: (error: Error) => void }[]} */
  let waiters = [];
  if (options.onToken) listeners.add(options.onToken);

  const tabs =
    options.shareAcrossTabs === false
      ? connectTabs(url, () => {}, {})
      : connectTabs(`synctoken:${url}`, onTabMessage, options.platform ?? globalThis, freshGrant);

  /** @returns {State} */
  function currentState() {
    if (failure?.kind === "signed_out") return "signed_out";
    if (refreshing) return "refreshing";
    const held = grantState(grant, now());
    if (failure?.kind === "fatal") return held === "fresh" || held === "stale" ? held : "failing";
    if (held === "none") return failure ? "failing" : "refreshing";
    return held;
  }

  function report() {
    const next = currentState();
    const error = failure?.error ?? null;
    if (next === state && error === reportedError) return;
    state = next;
    reportedError = error;
    tell(options.onState, next, {
      error,
      retryAt: failure?.kind === "retry" ? failure.retryAt : null,
      refreshAt: grant?.refreshAt ?? null,
      expiresAt: grant?.expiresAt ?? null,
    });
  }

  /**
   * Call one of the app's hooks. A throw is the app's bug, not the provider's: it is reported as uncaught, and
   * the provider carries on (a throw from onState in the middle of accepting a token would lose the token).
   * @template {unknown[]} A
   * @param {((...args: A) => void) | undefined} hook
   * @param {A} args
   */
  function tell(hook, ...args) {
    try {
      hook?.(...args);
    } catch (error) {
      queueMicrotask(() => {
        throw error;
      });
    }
  }

  /** Act now or set the timer for the next moment something changes. */
  function schedule() {
    if (stopped) return;
    if (asking) return report();
    timers.clearTimeout(timer);
    failure = rebaseFailure(failure, now());
    const step = nextStep({ now: now(), grant, failure });
    if (inflight || step.action === "fetch") {
      // Straight to "refreshing", not through "stale" first.
      if (!inflight) refreshOnce(false);
      report();
      return;
    }
    report();
    if (step.action === "wait") {
      timer = timers.setTimeout(schedule, Math.min(MAX_TIMER_MS, step.delay));
    } else if (grant !== null && now() < grant.expiresAt) {
      // Refused for good, but the token still works until exp: wake then, to say it no longer does.
      timer = timers.setTimeout(schedule, Math.min(MAX_TIMER_MS, grant.expiresAt - now()));
    }
  }

  /**
   * One fetch at a time: callers during a fetch share it. With `force`, fetch even if the token is not due.
   * @param {boolean} force
   */
  function refreshOnce(force) {
    if (inflight) return inflight;
    const grantBefore = grant;
    const failureBefore = failure;
    refreshing = true;
    inflight = tabs
      .exclusive(async () => {
        // Another tab may have fetched, or failed, while we waited for our turn: its result is ours.
        const changed = grant !== grantBefore || failure !== failureBefore;
        if (stopped || (changed && nextStep({ now: now(), grant, failure }).action !== "fetch")) return;
        if (!changed && !force && nextStep({ now: now(), grant, failure }).action !== "fetch") return;
        await fetchOnce();
      })
      .catch((/** @type {unknown} */ error) => {
        // Only a bug gets here (fetchOnce handles every answer): fail softly, with backoff.
        if (!stopped) fail("retry", new TokenError(0, `token refresh failed: ${String(error)}`), null);
      })
      .finally(() => {
        inflight = null;
        refreshing = false;
        schedule();
      });
    report();
    return inflight;
  }

  async function fetchOnce() {
    // Aborted by stop(), or when no answer (headers and body) came within FETCH_TIMEOUT_MS.
    const controller = new AbortController();
    const deadline = timers.setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
    aborter = { abort: () => (timers.clearTimeout(deadline), controller.abort()) };
    try {
      await fetchAndRead(controller.signal);
    } finally {
      timers.clearTimeout(deadline);
      aborter = null;
    }
  }

  /** @param {AbortSignal} signal */
  async function fetchAndRead(signal) {
    /** @type {Response} */
    let response;
    try {
      // no-store: every refresh must reach the BFF, which decides whether its cached token is still good.
      response = await fetchToken(url, {
        cache: "no-store",
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        signal,
        ...options.init,
      });
    } catch {
      if (stopped) return;
      return fail("retry", new TokenError(0, "the token endpoint could not be reached"), null, true);
    }
    const answer = await readAnswer(response, url, now());
    // Stopped while the answer came: it is nobody's (and the channel to the other tabs is closed).
    if (stopped) return;
    if ("grant" in answer) {
      accept(answer.grant, "fetch");
      tabs.publish({ type: "token", grant: answer.grant });
      return;
    }
    fail(answer.kind, answer.error, answer.retryAfter);
  }

  /**
   * @param {import("./answer.js").HeldGrant} fresh
   * @param {"fetch" | "tab"} from
   */
  function accept(fresh, from) {
    grant = fresh;
    failure = null;
    refreshing = false;
    report();
    signedOutTold = false;
    const info = {
      identity: fresh.identity,
      refreshAfter: new Date(fresh.refreshAtServer),
      expiresAt: new Date(fresh.expiresAtServer),
      from,
    };
    const ready = waiters;
    waiters = [];
    for (const waiter of ready) waiter.resolve(fresh.token);
    // Each listener gets the token even if one before it throws.
    for (const listener of listeners) tell(listener, fresh.token, info);
  }

  /**
   * @param {"signed_out" | "retry" | "fatal"} kind
   * @param {TokenError} error
   * @param {number | null} retryAfter
   * @param {boolean} [network] no answer at all: `online` retries at once
   */
  function fail(kind, error, retryAfter, network = false) {
    const at = now();
    const attempts = (failure?.kind === "retry" ? failure.attempts : 0) + 1;
    const retryAt = kind === "retry" ? retryTime(at, attempts, retryAfter, random()) : Infinity;
    failure = { kind, at, retryAt, attempts, error, network };
    refreshing = false;
    report();
    const { status, message, code, reason } = error;
    tabs.publish({ type: "failure", failure: { kind, at, retryAt, attempts, network, status, message, code, reason } });
    settleFailure();
  }

  /** What follows a failure, ours or another tab's: signed out, or waiters told for good, or a retry waiting. */
  function settleFailure() {
    if (failure === null || failure.kind === "retry") return;
    if (failure.kind === "signed_out") grant = null;
    const held = grantState(grant, now());
    if (held === "fresh" || held === "stale") return;
    const ready = waiters;
    waiters = [];
    for (const waiter of ready) waiter.reject(failure.error);
    if (failure.kind === "signed_out" && !signedOutTold) {
      signedOutTold = true;
      tell(options.onSignedOut, failure.error);
    }
  }

  /**
   * What this provider answers a tab that asks for a fresh token: its grant, as it was shared when fetched.
   * Its times need no change: refreshAt and expiresAt are on the browser's clock, which every tab of the browser
   * reads alike, and receivedAt stays the moment it was fetched, so MIN_REFRESH_MS still counts from the fetch.
   */
  function freshGrant() {
    return !stopped && grantState(grant, now()) === "fresh" ? grant : null;
  }

  /** @param {any} message what another tab published */
  function onTabMessage(message) {
    if (stopped) return;
    if (message?.type === "token" && isGrant(message.grant)) {
      if (grant === null || message.grant.expiresAt > grant.expiresAt) {
        // Its receivedAt is the other tab's reading of the clock. Ours may not have reached it yet (Playwright
        // moves each page's clock in turn): that is no clock set back since the token came, which nextStep
        // would answer with a fetch of our own. The token is no newer than our now.
        accept({ ...message.grant, receivedAt: Math.min(message.grant.receivedAt, now()) }, "tab");
        schedule();
      }
    } else if (message?.type === "failure" && message.failure) {
      // Another tab's failure matters only to a tab that needs a token as much: not one with a fresh token.
      if (grantState(grant, now()) === "fresh" && message.failure.kind !== "signed_out") return;
      const f = message.failure;
      failure = { ...f, error: new TokenError(f.status, f.message, f) };
      settleFailure();
      schedule();
    }
  }

  // The browser's signs that timers may have been late (a hidden or frozen tab, a sleeping laptop) or that a
  // retry may now work: look at the clock again.
  const wake = () => schedule();
  const onVisibility = () => {
    if (doc && /** @type {Document} */ (doc).visibilityState !== "hidden") wake();
  };
  const onOnline = () => {
    if (failure?.kind === "retry" && failure.network) failure = { ...failure, retryAt: now() };
    wake();
  };
  const onPageShow = (/** @type {Event} */ event) => {
    if (!(/** @type {PageTransitionEvent} */ (event).persisted)) return;
    tabs.show();
    wake();
  };
  // Chrome keeps no page that holds a Web Lock in the back/forward cache: the lock that counts this provider
  // among the tabs' is let go as the page is hidden, and taken again if it comes back.
  const onPageHide = () => tabs.hide();
  win?.addEventListener?.("online", onOnline);
  win?.addEventListener?.("focus", wake);
  win?.addEventListener?.("pageshow", onPageShow);
  win?.addEventListener?.("pagehide", onPageHide);
  doc?.addEventListener?.("visibilitychange", onVisibility);
  doc?.addEventListener?.("resume", wake);

  // A tab opened later takes the others' fresh token rather than fetching its own; a lone tab fetches at once.
  const joined = tabs.join(timers);
  if (joined) {
    asking = true;
    report();
    joined.then(() => {
      asking = false;
      schedule();
    });
  } else {
    schedule();
  }

  return {
    /**
     * The current token, fetched first when there is none or it expired (e.g. after sleep). Rejects with a
     * TokenError when signed out or refused for good (400/403), and when the provider is stopped.
     * @returns {Promise<string>}
     */
    token() {
      if (stopped) return Promise.reject(new ProviderStoppedError());
      const held = grantState(grant, now());
      if (held === "fresh" || held === "stale") {
        if (held === "stale") schedule();
        return Promise.resolve(/** @type {import("./schedule.js").Grant} */ (grant).token);
      }
      if (failure && failure.kind !== "retry") return Promise.reject(failure.error);
      const waiting = new Promise((resolve, reject) => waiters.push({ resolve, reject }));
      schedule();
      return /** @type {Promise<string>} */ (waiting);
    },
    /** Fetch a new token now, even after 401 or 403 (e.g. once the user signed in again). */
    refresh() {
      if (stopped) return Promise.reject(new ProviderStoppedError());
      if (failure && failure.kind !== "retry") failure = null;
      // A new attempt at signing in: a 401 again is news to the app.
      signedOutTold = false;
      timers.clearTimeout(timer);
      return refreshOnce(true);
    },
    /** Check the clock now: a hint (e.g. the SDK's tokenAboutToExpire) that a refresh may be due. */
    check: wake,
    /**
     * Call `listener(token, info)` with each new token; returns the function that stops it.
     * @param {(token: string, info: TokenInfo) => void} listener
     */
    subscribe(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    /** @returns {State} */
    get state() {
      return currentState();
    },
    /** @returns {Error | null} the last failure, while none succeeded since */
    get error() {
      return failure?.error ?? null;
    },
    /** Stop timers and listeners; pending token() calls reject. */
    stop() {
      if (stopped) return;
      stopped = true;
      timers.clearTimeout(timer);
      aborter?.abort();
      win?.removeEventListener?.("online", onOnline);
      win?.removeEventListener?.("focus", wake);
      win?.removeEventListener?.("pageshow", onPageShow);
      win?.removeEventListener?.("pagehide", onPageHide);
      doc?.removeEventListener?.("visibilitychange", onVisibility);
      doc?.removeEventListener?.("resume", wake);
      tabs.close();
      listeners.clear();
      const ready = waiters;
      waiters = [];
      for (const waiter of ready) waiter.reject(new ProviderStoppedError());
    },
  };
}
