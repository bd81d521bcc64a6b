// The provider against an injected fetch and clock: when it fetches, what it reports, how it fails.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { tokenProvider } from "../src/provider.js";
import { FETCH_TIMEOUT_MS, MAX_BACKOFF_MS, RETRY_AFTER_JITTER } from "../src/schedule.js";
import { FakeClock, FakeEndpoint, grantBody, httpDate, settle } from "./fakes.js";

const T0 = Date.UTC(2026, 0, 1, 12, 0, 0);

/** A provider on a fake clock and endpoint, recording every state, token and sign-out. */
function start(endpoint, clock, extra = {}) {
  const seen = { states: [], tokens: [], signedOut: 0, errors: [] };
  const provider = tokenProvider({
    fetch: endpoint.fetch,
    now: clock.now,
    timers: clock.timers,
    random: () => 0.5,
    window: null,
    document: null,
    shareAcrossTabs: false,
    onState: (state, info) => {
      seen.states.push(state);
      seen.errors.push(info.error);
    },
    onToken: (token) => seen.tokens.push(token),
    onSignedOut: () => (seen.signedOut += 1),
    ...extra,
  });
  return { provider, seen };
}

describe("tokenProvider", { timeout: 10_000 }, () => {
  it("fetches at once, then again at refresh_after", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" });
    const { provider, seen } = start(endpoint, clock);
    assert.equal(await provider.token(), "one");
    assert.equal(provider.state, "fresh");
    await clock.advance(59_999);
    assert.equal(endpoint.calls, 1);
    await clock.advance(1);
    assert.equal(endpoint.calls, 2);
    assert.deepEqual(seen.tokens, ["one", "two"]);
    assert.deepEqual(seen.states, ["refreshing", "fresh", "refreshing", "fresh"]);
    provider.stop();
  });

  it("runs on the BFF's clock when the browser's is ahead", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock);
    // The BFF's clock is an hour behind: its Date and its times say so.
    const bffNow = () => clock.now() - 3_600_000;
    endpoint.queue.push(() =>
      Response.json(
        {
          identity: "a",
          token: "one",
          refresh_after: new Date(bffNow() + 60_000),
          expires_at: new Date(bffNow() + 120_000),
        },
        { headers: { Date: httpDate(bffNow()) } },
      ),
    );
    const { provider } = start(endpoint, clock);
    await provider.token();
    assert.equal(provider.state, "fresh");
    await clock.advance(30_000);
    assert.equal(endpoint.calls, 1);
    provider.stop();
  });

  it("fetches before handing out a token that expired while timers did not run", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "old" }).ok({ token: "new" });
    const { provider } = start(endpoint, clock);
    await provider.token();
    await settle();
    await clock.jump(3 * 3_600_000);
    assert.equal(provider.state, "expired");
    assert.equal(await provider.token(), "new");
    assert.equal(endpoint.calls, 2);
    provider.stop();
  });

  it("shares one fetch between every caller", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" });
    const { provider } = start(endpoint, clock);
    const tokens = await Promise.all(Array.from({ length: 10 }, () => provider.token()));
    assert.deepEqual(new Set(tokens), new Set(["one"]));
    assert.equal(endpoint.calls, 1);
    provider.stop();
  });

  it("tells onSignedOut once on 401, and does not retry", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).refuse(401, {}, "NO_USER");
    const { provider, seen } = start(endpoint, clock);
    await assert.rejects(provider.token(), { name: "TokenError", status: 401, reason: "NO_USER" });
    await assert.rejects(provider.token(), { status: 401 });
    await clock.advance(3_600_000);
    assert.equal(endpoint.calls, 1);
    assert.equal(seen.signedOut, 1);
    assert.equal(provider.state, "signed_out");
    // Signed in again: refresh() tries once more.
    endpoint.ok({ token: "back" });
    await provider.refresh();
    assert.equal(await provider.token(), "back");
    provider.stop();
  });

  it("surfaces 400 and 403 without retrying", async () => {
    for (const status of [400, 403]) {
      const clock = new FakeClock();
      const endpoint = new FakeEndpoint(clock).refuse(status);
      const { provider, seen } = start(endpoint, clock);
      await assert.rejects(provider.token(), { status });
      await clock.advance(3_600_000);
      assert.equal(endpoint.calls, 1);
      assert.equal(provider.state, "failing");
      assert.equal(provider.error.status, status);
      assert.equal(seen.states.at(-1), "failing");
      assert.equal(seen.errors.at(-1).status, status);
      provider.stop();
    }
  });

  it("retries a 503 after its Retry-After, within the jitter", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).refuse(503, { "Retry-After": "10" }).ok({ token: "one" });
    const { provider } = start(endpoint, clock);
    const token = provider.token();
    await settle();
    assert.equal(provider.state, "failing");
    await clock.advance(9_999);
    assert.equal(endpoint.calls, 1);
    await clock.advance(10_000 * RETRY_AFTER_JITTER);
    assert.equal(endpoint.calls, 2);
    assert.equal(await token, "one");
    provider.stop();
  });

  it("backs off exponentially without Retry-After, capped at five minutes", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock);
    for (let i = 0; i < 12; i++) endpoint.refuse(429);
    const { provider } = start(endpoint, clock, { random: () => 0.999 });
    const gaps = [];
    let last = clock.now();
    let calls = 0;
    while (endpoint.calls < 12) {
      await clock.advance(1000);
      if (endpoint.calls !== calls) {
        gaps.push(clock.now() - last);
        last = clock.now();
        calls = endpoint.calls;
      }
    }
    // 1 s, 2 s, 4 s ... (times 0.999, to the second above) then never more than five minutes.
    assert.deepEqual(gaps.slice(0, 5), [1000, 2000, 4000, 8000, 16_000]);
    assert.ok(gaps.every((gap) => gap <= MAX_BACKOFF_MS));
    // The cap is reached (0.999 of it, to the second).
    assert.ok(gaps.at(-1) >= MAX_BACKOFF_MS - 1000);
    provider.stop();
  });

  it("says the token expired while a retry waits past exp", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ refreshIn: 60_000, expiresIn: 70_000 });
    endpoint.refuse(503, { "Retry-After": "60" });
    const { provider, seen } = start(endpoint, clock, { random: () => 0 });
    await provider.token();
    await clock.advance(60_000);
    assert.equal(provider.state, "stale");
    await clock.advance(10_000);
    assert.equal(provider.state, "expired");
    assert.equal(seen.states.at(-1), "expired");
    assert.equal(endpoint.calls, 2);
    provider.stop();
  });

  it("retries a network error when the browser is back online", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).networkError().ok({ token: "one" });
    const win = new EventTarget();
    const { provider } = start(endpoint, clock, { window: win, random: () => 0.999 });
    await settle();
    assert.equal(provider.state, "failing");
    assert.equal(provider.error.status, 0);
    win.dispatchEvent(new Event("online"));
    assert.equal(await provider.token(), "one");
    assert.equal(endpoint.calls, 2);
    provider.stop();
  });

  it("refreshes when the page becomes visible after its timer was held back", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" });
    const doc = Object.assign(new EventTarget(), { visibilityState: "hidden" });
    const { provider, seen } = start(endpoint, clock, { document: doc });
    await provider.token();
    await settle();
    await clock.jump(90_000);
    doc.dispatchEvent(new Event("visibilitychange"));
    await settle();
    assert.equal(endpoint.calls, 1, "a hidden page waits for its timer");
    doc.visibilityState = "visible";
    doc.dispatchEvent(new Event("visibilitychange"));
    await settle();
    assert.equal(endpoint.calls, 2);
    assert.deepEqual(seen.tokens, ["one", "two"]);
    provider.stop();
  });

  it("rejects waiting callers when stopped", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).refuse(503);
    const { provider } = start(endpoint, clock);
    const token = provider.token();
    provider.stop();
    await assert.rejects(token, { name: "ProviderStoppedError" });
  });
});

describe("tokenProvider against odd answers", { timeout: 10_000 }, () => {
  it("backs off when Retry-After says now or a moment already past, instead of asking again at once", async () => {
    for (const retryAfter of ["0", httpDate(Date.UTC(2020, 0, 1)), "x 1"]) {
      const clock = new FakeClock();
      const endpoint = new FakeEndpoint(clock);
      for (let i = 0; i < 5; i++) endpoint.refuse(503, { "Retry-After": retryAfter });
      endpoint.ok({ token: "one" });
      const { provider } = start(endpoint, clock);
      await settle();
      assert.equal(endpoint.calls, 1, retryAfter);
      // random 0.5: half of the backoff's cap, 1 s then 2 s.
      await clock.advance(500);
      assert.equal(endpoint.calls, 2, retryAfter);
      await clock.advance(999);
      assert.equal(endpoint.calls, 2, retryAfter);
      await clock.advance(1);
      assert.equal(endpoint.calls, 3, retryAfter);
      provider.stop();
    }
  });
});

describe("tokenProvider against odd grants", { timeout: 10_000 }, () => {
  it("takes a 200 that is not a grant as a failure worth a retry, with backoff", async () => {
    const { token, ...noToken } = grantBody(T0);
    const { refresh_after, ...noRefreshAfter } = grantBody(T0);
    const bodies = ["{not json", "null", JSON.stringify(noToken), JSON.stringify(noRefreshAfter)];
    for (const body of bodies) {
      const clock = new FakeClock(T0);
      const endpoint = new FakeEndpoint(clock);
      endpoint.queue.push(() => new Response(body, { status: 200, headers: { "Content-Type": "application/json" } }));
      endpoint.ok({ token: "one" });
      const { provider, seen } = start(endpoint, clock);
      await settle();
      assert.equal(endpoint.calls, 1, body);
      assert.equal(provider.state, "failing", body);
      assert.equal(provider.error.status, 200, body);
      await clock.advance(500);
      assert.equal(await provider.token(), "one", body);
      assert.ok(!seen.errors.some((error) => error?.message.includes(String(token))), body);
      provider.stop();
    }
  });

  it("fetches by exp when refresh_after comes after it, instead of leaving the token dead until then", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one", refreshIn: 600_000, expiresIn: 120_000 }).ok();
    const { provider } = start(endpoint, clock);
    await provider.token();
    await clock.advance(120_000);
    assert.equal(endpoint.calls, 2);
    assert.equal(provider.state, "fresh");
    provider.stop();
  });
});

describe("tokenProvider.stop", { timeout: 10_000 }, () => {
  it("with a fetch in flight: its answer reaches nobody, and nothing fails after", async () => {
    for (const answer of ["ok", "503"]) {
      const clock = new FakeClock();
      const endpoint = new FakeEndpoint(clock);
      let release;
      const held = new Promise((resolve) => (release = resolve));
      endpoint.queue.push(async () => {
        await held;
        if (answer !== "ok") return new Response("", { status: 503 });
        return Response.json({ identity: "a", token: "late", ...times(clock) });
      });
      const unhandled = [];
      const onUnhandled = (error) => unhandled.push(error);
      process.on("unhandledRejection", onUnhandled);
      // Sharing across tabs: the channel is open until stop() closes it.
      const { provider, seen } = start(endpoint, clock, {
        shareAcrossTabs: true,
        url: `/token-stop-${answer}`,
        platform: { BroadcastChannel },
      });
      await settle();
      assert.equal(endpoint.calls, 1);
      const states = seen.states.length;
      provider.stop();
      release();
      await settle();
      await clock.advance(3_600_000);
      process.off("unhandledRejection", onUnhandled);
      assert.deepEqual(unhandled, [], answer);
      assert.equal(seen.states.length, states, `${answer}: no state after stop`);
      assert.deepEqual(seen.tokens, [], answer);
      assert.equal(endpoint.calls, 1, answer);
    }
  });
});

function times(clock) {
  return {
    refresh_after: new Date(clock.now() + 60_000).toISOString(),
    expires_at: new Date(clock.now() + 120_000).toISOString(),
  };
}

describe("tokenProvider with an app whose hooks throw", { timeout: 10_000 }, () => {
  it("keeps refreshing and signing out, and reports each throw as uncaught", async () => {
    const thrown = [];
    const original = globalThis.queueMicrotask;
    // The provider rethrows an app's error from a microtask (uncaught, as the browser reports it): caught here.
    globalThis.queueMicrotask = (task) =>
      original(() => {
        try {
          task();
        } catch (error) {
          thrown.push(error.message);
        }
      });
    try {
      const clock = new FakeClock();
      const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" }).refuse(401);
      const fail = (what) => () => {
        throw new Error(what);
      };
      const { provider, seen } = start(endpoint, clock, {
        onState: fail("onState"),
        onSignedOut: fail("onSignedOut"),
      });
      assert.equal(await provider.token(), "one");
      await clock.advance(60_000);
      assert.equal(await provider.token(), "two");
      await clock.advance(60_000);
      assert.equal(provider.state, "signed_out");
      await assert.rejects(provider.token(), { status: 401 });
      await clock.advance(3_600_000);
      assert.equal(endpoint.calls, 3);
      assert.deepEqual(seen.tokens, ["one", "two"]);
      assert.ok(thrown.includes("onState") && thrown.includes("onSignedOut"), String(thrown));
      provider.stop();
    } finally {
      globalThis.queueMicrotask = original;
    }
  });
});

describe("tokenProvider against a fetch that never answers", { timeout: 10_000 }, () => {
  it("gives up on it after FETCH_TIMEOUT_MS, as on a network error, and tries again", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock);
    const signals = [];
    // A connection that died in a sleep: no answer and no error, until the provider aborts it.
    endpoint.queue.push(() => new Promise(() => {}));
    endpoint.fetch = (url, init) => {
      endpoint.calls += 1;
      signals.push(init.signal);
      const next = endpoint.queue.shift();
      if (!next) throw new Error("no answer queued");
      return new Promise((resolve, reject) => {
        init.signal?.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")));
        Promise.resolve(next()).then(resolve, reject);
      });
    };
    endpoint.ok({ token: "one" });
    const { provider } = start(endpoint, clock, { fetch: (...args) => endpoint.fetch(...args) });
    await settle();
    await clock.advance(FETCH_TIMEOUT_MS - 1);
    assert.equal(endpoint.calls, 1);
    assert.equal(provider.state, "refreshing");
    await clock.advance(1);
    assert.equal(provider.error?.status, 0);
    await clock.advance(1000);
    assert.equal(endpoint.calls, 2);
    assert.equal(await provider.token(), "one");
    provider.stop();
  });

  it("aborts the fetch in flight when stopped", async () => {
    const clock = new FakeClock();
    let signal = null;
    const { provider } = start({ fetch: (url, init) => ((signal = init.signal), new Promise(() => {})) }, clock);
    await settle();
    assert.equal(signal?.aborted, false);
    provider.stop();
    assert.equal(signal.aborted, true);
    // A fetch that ignores its signal still leaves no timer behind.
    assert.equal(clock.pending.size, 0);
  });
});

describe("tokenProvider when the clock jumps backwards", { timeout: 10_000 }, () => {
  it("fetches a token again at the next look at the clock, as its times on this clock no longer hold", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" });
    const { provider } = start(endpoint, clock);
    await provider.token();
    // Set back an hour: the token would look fresh for an hour more than it lives.
    await clock.jump(-3_600_000);
    provider.check();
    await settle();
    assert.equal(endpoint.calls, 2);
    assert.equal(await provider.token(), "two");
    assert.equal(provider.state, "fresh");
    provider.stop();
  });

  it("does not stretch a retry's wait by the jump", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).refuse(503, { "Retry-After": "10" }).ok({ token: "one" });
    const { provider } = start(endpoint, clock, { random: () => 0 });
    await settle();
    await clock.jump(-3_600_000);
    provider.check();
    await clock.advance(9_999);
    assert.equal(endpoint.calls, 1, "Retry-After still holds");
    await clock.advance(1);
    assert.equal(endpoint.calls, 2);
    assert.equal(await provider.token(), "one");
    provider.stop();
  });
});
