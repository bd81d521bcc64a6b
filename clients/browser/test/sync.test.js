// bindSyncClient with a stand-in for the SDK's client: the first token to the constructor, the rest to updateToken.
import assert from "node:assert/strict";
import { EventEmitter } from "node:events";
import { describe, it } from "node:test";
import { tokenProvider } from "../src/provider.js";
import { bindSyncClient } from "../src/sync.js";
import { FakeClock, FakeEndpoint, settle } from "./fakes.js";

/** What the SDK's client does with tokens, and its events. */
class RecordingClient extends EventEmitter {
  constructor(token, options) {
    super();
    this.createdWith = token;
    this.options = options;
    this.updates = [];
  }

  async updateToken(token) {
    this.updates.push(token);
  }
}

function provider(endpoint, clock) {
  return tokenProvider({
    fetch: endpoint.fetch,
    now: clock.now,
    timers: clock.timers,
    window: null,
    document: null,
    shareAcrossTabs: false,
  });
}

describe("bindSyncClient", { timeout: 10_000 }, () => {
  it("creates the client with the first token and updates it with each new one", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" }).ok({ token: "three" });
    const tokens = provider(endpoint, clock);
    const client = await bindSyncClient(tokens, RecordingClient, { logLevel: "silent" });
    assert.equal(client.createdWith, "one");
    assert.deepEqual(client.options, { logLevel: "silent" });
    await clock.advance(120_000);
    assert.deepEqual(client.updates, ["two", "three"]);
    tokens.stop();
  });

  it("uses tokenExpired as a hint: a token past exp is replaced at once", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" });
    const tokens = provider(endpoint, clock);
    const client = await bindSyncClient(tokens, RecordingClient);
    await settle();
    await clock.jump(3_600_000);
    client.emit("tokenExpired");
    await settle();
    assert.deepEqual(client.updates, ["two"]);
    assert.equal(endpoint.calls, 2);
    tokens.stop();
  });

  it("ignores tokenAboutToExpire while the token is not due", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" });
    const tokens = provider(endpoint, clock);
    const client = await bindSyncClient(tokens, RecordingClient);
    client.emit("tokenAboutToExpire");
    await settle();
    assert.equal(endpoint.calls, 1);
    assert.deepEqual(client.updates, []);
    tokens.stop();
  });
});

describe("bindSyncClient's signal", { timeout: 10_000 }, () => {
  it("unbinds: no token after the abort, and the SDK's events no longer reach the provider", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" }).ok({ token: "three" });
    const tokens = provider(endpoint, clock);
    const unbind = new AbortController();
    const client = await bindSyncClient(tokens, RecordingClient, undefined, { signal: unbind.signal });
    await clock.advance(60_000);
    assert.deepEqual(client.updates, ["two"]);
    unbind.abort();
    assert.equal(client.listenerCount("tokenExpired"), 0);
    assert.equal(client.listenerCount("tokenAboutToExpire"), 0);
    await clock.advance(60_000);
    assert.deepEqual(client.updates, ["two"]);
    const calls = endpoint.calls;
    await clock.jump(3_600_000);
    client.emit("tokenExpired");
    await settle();
    assert.equal(endpoint.calls, calls);
    tokens.stop();
  });

  it("aborted before the first token: no client, and the signal's reason", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" });
    const tokens = provider(endpoint, clock);
    const unbind = new AbortController();
    const bound = bindSyncClient(tokens, RecordingClient, undefined, { signal: unbind.signal });
    unbind.abort(new Error("page left"));
    await assert.rejects(bound, /page left/);
    const early = new AbortController();
    early.abort();
    await assert.rejects(bindSyncClient(tokens, RecordingClient, undefined, { signal: early.signal }), {
      name: "AbortError",
    });
    tokens.stop();
  });
});
