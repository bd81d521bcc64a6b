// Several providers sharing one origin's lock and channel (Node's BroadcastChannel, a lock that queues like the
// browser's): the first to fall due fetches, the others take its token or its failure.
import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import { tokenProvider } from "../src/provider.js";
import { FakeClock, FakeEndpoint, settle } from "./fakes.js";

/** navigator.locks.request's exclusive mode: one holder per name, the rest queued in order. */
class QueuedLocks {
  constructor() {
    this.tails = new Map();
  }

  request(name, _options, task) {
    const before = this.tails.get(name) ?? Promise.resolve();
    const run = before.then(() => task());
    this.tails.set(
      name,
      run.catch(() => {}),
    );
    return run;
  }
}

// Every provider a test started, stopped after it (even one that timed out): their channels would keep Node running.
const started = [];
afterEach(() => {
  for (const provider of started.splice(0)) provider.stop();
});

function tabs(count, endpoint, clock, name) {
  const platform = { navigator: { locks: new QueuedLocks() }, BroadcastChannel };
  const seen = Array.from({ length: count }, () => ({ tokens: [], signedOut: 0 }));
  const providers = seen.map((record) =>
    tokenProvider({
      url: name,
      fetch: endpoint.fetch,
      now: clock.now,
      timers: clock.timers,
      random: () => 0.5,
      window: null,
      document: null,
      platform,
      onToken: (token) => record.tokens.push(token),
      onSignedOut: () => (record.signedOut += 1),
    }),
  );
  started.push(...providers);
  return { providers, seen, stop: () => providers.forEach((p) => p.stop()) };
}

describe("tabs", { timeout: 10_000 }, () => {
  it("opened together, make one request and share its token", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" });
    const { providers, stop } = tabs(10, endpoint, clock, "/token-a");
    const tokens = await Promise.all(providers.map((p) => p.token()));
    assert.deepEqual(new Set(tokens), new Set(["one"]));
    assert.equal(endpoint.calls, 1);
    stop();
  });

  it("whose token falls due together make one request", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" });
    const { providers, seen, stop } = tabs(10, endpoint, clock, "/token-b");
    await Promise.all(providers.map((p) => p.token()));
    await clock.advance(60_000);
    await settle();
    assert.equal(endpoint.calls, 2);
    assert.ok(seen.every((record) => record.tokens.at(-1) === "two"));
    stop();
  });

  it("share a 503's Retry-After instead of each asking again", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" });
    endpoint.refuse(503, { "Retry-After": "30" }).ok({ token: "two" });
    const { providers, seen, stop } = tabs(10, endpoint, clock, "/token-c");
    await Promise.all(providers.map((p) => p.token()));
    await clock.advance(60_000);
    assert.equal(endpoint.calls, 2);
    assert.ok(providers.every((p) => p.state === "stale"));
    await clock.advance(30_000 * 1.2);
    await settle();
    assert.equal(endpoint.calls, 3);
    assert.ok(seen.every((record) => record.tokens.at(-1) === "two"));
    stop();
  });

  it("are all signed out by one 401, each telling its page once", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).refuse(401);
    const { providers, seen, stop } = tabs(3, endpoint, clock, "/token-d");
    await Promise.all(providers.map((p) => p.token()));
    await clock.advance(3_600_000);
    await settle();
    assert.equal(endpoint.calls, 2);
    assert.deepEqual(
      seen.map((record) => record.signedOut),
      [1, 1, 1],
    );
    assert.ok(providers.every((p) => p.state === "signed_out"));
    stop();
  });
});
