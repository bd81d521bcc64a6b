// The token provider: keeps a token from the BFF's GET /token in memory and a new one coming before it is due,
// through background tabs, sleep, offline spells and a failing BFF. When to act is decided by schedule.js;
// this module keeps the token and the timers, and acts on its fetches' answers (request.js), the other tabs'
// messages (tabs.js) and the browser's signs of waking (wake.js).
import { isGrant } from "./answer.js";
import { ProviderStoppedError, TokenError } from "./errors.js";
import { resolveOptions } from "./options.js";
import { stateOf, stateReporter, tell, tokenInfo } from "./report.js";
import { requestToken } from "./request.js";
import { grantState, nextStep, rebaseFailure, retryTime } from "./schedule.js";
import { connectTabs } from "./tabs.js";
import { listenForWake } from "./wake.js";

/** setTimeout's largest delay; a longer one fires at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * @typedef {import("./report.js").State} State
 * @typedef {import("./report.js").StateInfo} StateInfo
 * @typedef {import("./report.js").TokenInfo} TokenInfo
 */

/**
 * A provider of tokens from `url`. It fetches the first at once.
 * @param {import("./options.js").ProviderOptions} [options] (options.js says what each is)
 */
export function tokenProvider(options = {}) {
  const { url, fetchToken, init, shareAcrossTabs, now, random, timers, win, doc, platform } = resolveOptions(options);

  /** @type {import("./answer.js").HeldGrant | null} */
  let grant = null;
  /** @type {(import("./schedule.js").Failure & { error: TokenError, network?: boolean }) | null} */
  let failure = null;
  /** @type {Promise<void> | null} */
  let inflight = null;
  // From the decision to refresh until its result (ours or another tab's) is in: "refreshing".
  let refreshing = false;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  /** @type {{ abort: () => void } | null} ends the fetch in flight */
  let aborter = null;
  let stopped = false;
  // Until the other tabs answered whether one holds a fresh token: no fetch of our own meanwhile.
  let asking = false;
  let signedOutTold = false;
  const reportState = stateReporter(options.onState);
  /** @type {Set<(token: string, info: TokenInfo) => void>} */
  const listeners = new Set();
  /** @type {{ resolve: (token: string) => void, reject: (error: Error) => void }[]} */
  let waiters = [];
  if (options.onToken) listeners.add(options.onToken);

  const tabs = shareAcrossTabs
    ? connectTabs(`synctoken:${url}`, onTabMessage, platform, freshGrant)
    : connectTabs(url, () => {}, {});

  /** Tell onState, if the state changed. */
  function report() {
    reportState({ grant, failure, refreshing }, now());
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
    const request = requestToken({ fetchToken, url, init, timers, now });
    aborter = request;
    /** @type {Awaited<typeof request.answer>} */
    let answer;
    try {
      answer = await request.answer;
    } finally {
      aborter = null;
    }
    // Stopped while the answer came: it is nobody's (and the channel to the other tabs is closed).
    if (stopped) return;
    if ("grant" in answer) {
      accept(answer.grant, "fetch");
      tabs.publish({ type: "token", grant: answer.grant });
      return;
    }
    fail(answer.kind, answer.error, answer.retryAfter, answer.network);
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
    const info = tokenInfo(fresh, from);
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
        // would answer with a fetch of our own. The token is no newer than our now. (Should the one clock of a
        // browser be set back, the tab that fetched still holds its receivedAt: it fetches, and we take that.)
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

  const wake = () => schedule();
  const stopListening = listenForWake(win, doc, {
    wake,
    online: () => {
      if (failure?.kind === "retry" && failure.network) failure = { ...failure, retryAt: now() };
      wake();
    },
    // Chrome keeps no page that holds a Web Lock in the back/forward cache: the lock that counts this provider
    // among the tabs' is let go as the page is hidden, and taken again if it comes back.
    show: () => tabs.show(),
    hide: () => tabs.hide(),
  });

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
      return stateOf({ grant, failure, refreshing }, now());
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
      stopListening();
      tabs.close();
      listeners.clear();
      const ready = waiters;
      waiters = [];
      for (const waiter of ready) waiter.reject(new ProviderStoppedError());
    },
  };
}
