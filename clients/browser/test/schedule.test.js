// The scheduling rules, as pure functions: every case without a browser, a timer or a server.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import {
  MAX_BACKOFF_MS,
  MIN_REFRESH_MS,
  RETRY_AFTER_JITTER,
  backoffDelay,
  classify,
  grantState,
  nextStep,
  parseRetryAfter,
  rebaseFailure,
  retryTime,
} from "../src/schedule.js";

const T0 = Date.UTC(2026, 0, 1, 12, 0, 0);
const grant = (refreshIn, expiresIn, receivedAgo = 60_000) => ({
  token: "t",
  identity: "alice",
  refreshAt: T0 + refreshIn,
  expiresAt: T0 + expiresIn,
  receivedAt: T0 - receivedAgo,
});
const retry = (retryIn, attempts = 1) => ({ kind: "retry", at: T0, retryAt: T0 + retryIn, attempts });

describe("classify", { timeout: 10_000 }, () => {
  it("sorts statuses into ok, signed out, worth a retry, and final", () => {
    assert.equal(classify(200), "ok");
    assert.equal(classify(401), "signed_out");
    for (const status of [0, 408, 429, 500, 502, 503, 504]) assert.equal(classify(status), "retry", String(status));
    for (const status of [400, 403, 404, 414]) assert.equal(classify(status), "fatal", String(status));
  });
});

describe("parseRetryAfter", { timeout: 10_000 }, () => {
  it("reads whole seconds", () => {
    assert.equal(parseRetryAfter("7", T0), 7000);
    assert.equal(parseRetryAfter(" 0 ", T0), 0);
  });
  it("reads an HTTP date, on the server's clock moved to ours", () => {
    const date = new Date(T0 + 30_000).toUTCString();
    assert.equal(parseRetryAfter(date, T0), 30_000);
    // Our clock runs 10 s ahead of the server's: its date is 10 s later on ours.
    assert.equal(parseRetryAfter(date, T0, 10_000), 40_000);
    assert.equal(parseRetryAfter(new Date(T0 - 5000).toUTCString(), T0), 0);
  });
  it("ignores what is missing or unreadable", () => {
    for (const header of [null, undefined, "", "soon", "-3", "1.5"]) assert.equal(parseRetryAfter(header, T0), null);
  });
});

describe("backoffDelay", { timeout: 10_000 }, () => {
  it("draws between nothing and a cap that doubles per failure", () => {
    assert.equal(backoffDelay(1, 0), 0);
    assert.equal(backoffDelay(1, 0.999), 999);
    assert.equal(backoffDelay(2, 0.5), 1000);
    assert.equal(backoffDelay(4, 0.5), 4000);
  });
  it("never waits more than five minutes", () => {
    assert.equal(MAX_BACKOFF_MS, 300_000);
    for (const attempts of [9, 10, 50, 5000]) assert.ok(backoffDelay(attempts, 0.999999) < MAX_BACKOFF_MS);
  });
});

describe("retryTime", { timeout: 10_000 }, () => {
  it("honours Retry-After, stretched by at most the jitter", () => {
    assert.equal(retryTime(T0, 1, 10_000, 0), T0 + 10_000);
    assert.equal(retryTime(T0, 1, 10_000, 0.5), T0 + 10_000 * (1 + RETRY_AFTER_JITTER / 2));
    assert.ok(retryTime(T0, 1, 10_000, 0.999) <= T0 + 10_000 * (1 + RETRY_AFTER_JITTER));
  });
  it("caps a Retry-After longer than the backoff's cap", () => {
    assert.equal(retryTime(T0, 1, 3_600_000, 0), T0 + MAX_BACKOFF_MS);
    // 400 digits: Infinity seconds, still five minutes (and the jitter).
    const huge = retryTime(T0, 1, parseRetryAfter("9".repeat(400), T0), 0.5);
    assert.equal(huge, T0 + MAX_BACKOFF_MS * (1 + RETRY_AFTER_JITTER / 2));
  });
  it("backs off when Retry-After is shorter than the backoff (0, a past date)", () => {
    assert.equal(retryTime(T0, 3, 0, 0.5), T0 + 2000);
    assert.equal(retryTime(T0, 3, 1000, 0.5), T0 + 2000);
  });
  it("backs off without Retry-After", () => {
    assert.equal(retryTime(T0, 3, null, 0.25), T0 + 1000);
  });
});

describe("grantState", { timeout: 10_000 }, () => {
  it("is fresh before refresh_after, stale after, expired from exp", () => {
    assert.equal(grantState(null, T0), "none");
    assert.equal(grantState(grant(1000, 2000), T0), "fresh");
    assert.equal(grantState(grant(0, 2000), T0), "stale");
    assert.equal(grantState(grant(-2000, 0), T0), "expired");
  });
});

describe("nextStep", { timeout: 10_000 }, () => {
  it("fetches at once without a token", () => {
    assert.deepEqual(nextStep({ now: T0, grant: null, failure: null }), { action: "fetch", delay: 0 });
  });
  it("waits for refresh_after", () => {
    assert.deepEqual(nextStep({ now: T0, grant: grant(90_000, 300_000), failure: null }), {
      action: "wait",
      delay: 90_000,
    });
  });
  it("fetches at once past refresh_after, and past exp (a tab that slept)", () => {
    assert.equal(nextStep({ now: T0, grant: grant(-1, 300_000), failure: null }).action, "fetch");
    assert.equal(nextStep({ now: T0, grant: grant(-7_200_000, -3_600_000), failure: null }).action, "fetch");
  });
  it("is due at exp when refresh_after is later", () => {
    assert.deepEqual(nextStep({ now: T0, grant: grant(600_000, 120_000), failure: null }), {
      action: "wait",
      delay: 120_000,
    });
    assert.equal(nextStep({ now: T0 + 120_000, grant: grant(600_000, 120_000), failure: null }).action, "fetch");
  });
  it("leaves MIN_REFRESH_MS after the last token, whatever refresh_after says", () => {
    const justNow = grant(-1000, 300_000, 1000);
    assert.deepEqual(nextStep({ now: T0, grant: justNow, failure: null }), {
      action: "wait",
      delay: MIN_REFRESH_MS - 1000,
    });
  });
  it("waits for a retry's time, then fetches", () => {
    assert.deepEqual(nextStep({ now: T0, grant: null, failure: retry(4000) }), { action: "wait", delay: 4000 });
    assert.equal(nextStep({ now: T0 + 4000, grant: null, failure: retry(4000) }).action, "fetch");
  });
  it("never waits past exp without waking up, even when a retry is later", () => {
    const step = nextStep({ now: T0, grant: grant(-60_000, 30_000), failure: retry(120_000) });
    assert.deepEqual(step, { action: "wait", delay: 30_000 });
    // At exp, the retry is still the next thing.
    assert.deepEqual(nextStep({ now: T0 + 30_000, grant: grant(-60_000, 30_000), failure: retry(120_000) }), {
      action: "wait",
      delay: 90_000,
    });
  });
  it("fetches when the clock was set back since the token came", () => {
    assert.equal(nextStep({ now: T0 - 3_600_000, grant: grant(60_000, 120_000, 0), failure: null }).action, "fetch");
  });
  it("does nothing by itself after 401 or 400/403", () => {
    for (const kind of ["signed_out", "fatal"]) {
      const failure = { kind, at: T0, retryAt: Infinity, attempts: 1 };
      assert.equal(nextStep({ now: T0, grant: null, failure }).action, "idle");
    }
  });
});

describe("rebaseFailure", { timeout: 10_000 }, () => {
  it("moves a failure's times back with a clock set back, and leaves them otherwise", () => {
    const failure = retry(4000);
    assert.equal(rebaseFailure(failure, T0 + 1), failure);
    assert.equal(rebaseFailure(null, T0), null);
    const rebased = rebaseFailure(failure, T0 - 3_600_000);
    assert.equal(rebased.retryAt - rebased.at, 4000);
    assert.equal(rebased.at, T0 - 3_600_000);
    assert.deepEqual(nextStep({ now: T0 - 3_600_000, grant: null, failure: rebased }), { action: "wait", delay: 4000 });
  });
});
