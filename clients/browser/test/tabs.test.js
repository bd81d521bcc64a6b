// Several providers sharing one origin's lock and channel (Node's BroadcastChannel, a lock that queues like the
// browser's): the first to fall due fetches, the others take its token or its failure.
import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import { tokenProvider } from "../src/provider.js";
import { ASK_BOUND_MS } from "../src/tabs.js";
import { FakeClock, FakeEndpoint, settle } from "./fakes.js";

/**
 * navigator.locks as far as the provider uses it: exclusive mode, one holder per name and the rest queued in order;
 * shared mode, every request held at once; and query(), the names held.
 */
class QueuedLocks {
  constructor() {
    this.tails = new Map();
    /** @type {Map<number, string>} the shared locks held */
    this.shared = new Map();
    this.nextId = 1;
  }

  request(name, options, task) {
    if (options?.mode === "shared") {
      const id = this.nextId++;
      this.shared.set(id, name);
      return Promise.resolve()
        .then(() => task({ name, mode: "shared" }))
        .finally(() => this.shared.delete(id));
    }
    const before = this.tails.get(name) ?? Promise.resolve();
    const run = before.then(() => task());
    this.tails.set(
      name,
      run.catch(() => {}),
    );
    return run;
  }

  async query() {
    return { held: [...this.shared.values()].map((name) => ({ name, mode: "shared" })), pending: [] };
  }
}

// Every provider a test started, stopped after it (even one that timed out): their channels would keep Node running.
const started = [];
afterEach(() => {
  for (const provider of started.splice(0)) provider.stop();
});

/** `count` tabs on one fake browser, each recording what it gets (see openTab). */
function tabs(count, endpoint, clock, name) {
  const platform = browserOf();
  const opened = Array.from({ length: count }, () => openTab(platform, endpoint, clock, name));
  const providers = opened.map((tab) => tab.provider);
  return { providers, seen: opened.map((tab) => tab.record), stop: () => providers.forEach((p) => p.stop()) };
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

/**
 * A BroadcastChannel per tab whose messages leave the tab in order but `delay` turns of the event loop late, as in
 * Chromium, where a channel's message hops through the renderer's IO thread and a lock's release does not: the
 * release can reach the other tabs before the message does.
 */
function slowChannels() {
  /** @type {Set<any>} */
  const open = new Set();
  return (/** @type {{ delay: number }} */ tab) => {
    let outbox = Promise.resolve();
    return class {
      constructor(name) {
        this.name = name;
        this.onmessage = null;
        open.add(this);
      }
      postMessage(data) {
        const turns = tab.delay;
        outbox = outbox
          .then(() => ticks(turns))
          .then(() => {
            for (const other of open) {
              if (other === this || other.name !== this.name) continue;
              const copy = structuredClone(data);
              setImmediate(() => open.has(other) && other.onmessage?.({ data: copy }));
            }
          });
      }
      close() {
        open.delete(this);
      }
    };
  };
}

async function ticks(count) {
  for (let i = 0; i < count; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** One more tab on `platform`, recording the tokens it gets, where each came from, and its sign-outs. */
function openTab(platform, endpoint, clock, name) {
  const record = { tokens: [], from: [], signedOut: 0 };
  const provider = tokenProvider({
    url: name,
    fetch: endpoint.fetch,
    now: clock.now,
    timers: clock.timers,
    random: () => 0.5,
    window: null,
    document: null,
    platform,
    onToken: (token, info) => (record.tokens.push(token), record.from.push(info.from)),
    onSignedOut: () => (record.signedOut += 1),
  });
  started.push(provider);
  return { provider, record };
}

function browserOf(locks = new QueuedLocks()) {
  return { navigator: { locks }, BroadcastChannel };
}

describe("the tab that fetched", { timeout: 10_000 }, () => {
  it("lets go of the lock only once its token is on its way to the others, whose turn then makes no request", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" }).ok({ token: "three" });
    const locks = new QueuedLocks();
    const channelOf = slowChannels();
    const slow = { delay: 0 };
    const first = openTab({ navigator: { locks }, BroadcastChannel: channelOf(slow) }, endpoint, clock, "/fetched-a");
    assert.equal(await first.provider.token(), "one");
    const second = openTab({ navigator: { locks }, BroadcastChannel: channelOf({ delay: 0 }) }, endpoint, clock, "/fetched-a");
    assert.equal(await second.provider.token(), "one");
    await settle();
    // Both past refresh_after, the first in line for the lock; its messages now leave 50 turns late.
    await clock.jump(61_000);
    slow.delay = 50;
    first.provider.check();
    second.provider.check();
    await ticks(400);
    assert.equal(endpoint.calls, 2);
    assert.deepEqual(second.record.tokens, ["one", "two"]);
    assert.deepEqual(second.record.from, ["tab", "tab"]);
  });
});

describe("a tab opened later", { timeout: 10_000 }, () => {
  it("takes a fresh token from the tabs open before it, making no request", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" });
    const platform = browserOf();
    const first = openTab(platform, endpoint, clock, "/later-a");
    assert.equal(await first.provider.token(), "one");
    await clock.advance(30_000);
    const second = openTab(platform, endpoint, clock, "/later-a");
    const third = openTab(platform, endpoint, clock, "/later-a");
    assert.deepEqual(await Promise.all([second.provider.token(), third.provider.token()]), ["one", "one"]);
    assert.equal(endpoint.calls, 1);
    assert.deepEqual([second.record.from, third.record.from], [["tab"], ["tab"]]);
    assert.equal(second.provider.state, "fresh");
    // Its times are the first tab's: due at the same refresh_after, not 60 s after it was opened.
    endpoint.ok({ token: "two" });
    await clock.advance(30_000);
    assert.equal(endpoint.calls, 2);
    assert.deepEqual([first.record.tokens.at(-1), second.record.tokens.at(-1)], ["two", "two"]);
  });

  it("fetches when the others' token is past refresh_after: one request", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" });
    const platform = browserOf();
    const first = openTab(platform, endpoint, clock, "/later-b");
    await first.provider.token();
    await settle();
    // Timers held back (a background tab): the first still holds a stale token.
    await clock.jump(61_000);
    assert.equal(first.provider.state, "stale");
    const second = openTab(platform, endpoint, clock, "/later-b");
    assert.equal(await second.provider.token(), "two");
    await settle();
    assert.equal(endpoint.calls, 2);
    assert.deepEqual(second.record.from, ["fetch"]);
    assert.equal(first.record.tokens.at(-1), "two");
  });

  it("fetches at once when it is alone, the others stopped, without waiting on the clock", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" });
    const locks = new QueuedLocks();
    const platform = browserOf(locks);
    const first = openTab(platform, endpoint, clock, "/later-c");
    await settle();
    assert.equal(endpoint.calls, 1);
    assert.equal(clock.now(), new FakeClock().now());
    first.provider.stop();
    await settle();
    assert.deepEqual((await locks.query()).held, []);
    const second = openTab(platform, endpoint, clock, "/later-c");
    await settle();
    assert.equal(endpoint.calls, 2);
    assert.deepEqual(second.record.tokens, ["two"]);
  });

  it("fetches after ASK_BOUND_MS when a tab that holds the lock does not answer", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" });
    const locks = new QueuedLocks();
    // A provider whose page is frozen: it counts among the tabs but says nothing.
    let release;
    locks.request("synctoken:/later-d:tabs", { mode: "shared" }, () => new Promise((r) => (release = r)));
    const tab = openTab(browserOf(locks), endpoint, clock, "/later-d");
    await clock.advance(ASK_BOUND_MS - 1);
    assert.equal(endpoint.calls, 0);
    assert.equal(tab.provider.state, "refreshing");
    await clock.advance(1);
    assert.equal(endpoint.calls, 1);
    assert.equal(await tab.provider.token(), "one");
    release();
  });

  it("opened while the first fetches its first token, shares that fetch", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock);
    const platform = browserOf();
    // The first's answer is slow: asked meanwhile, it has no token to give, so the second waits its turn.
    let answer;
    endpoint.queue.push(() => new Promise((resolve) => (answer = resolve)));
    const first = openTab(platform, endpoint, clock, "/later-e");
    await settle();
    const second = openTab(platform, endpoint, clock, "/later-e");
    await settle();
    assert.equal(endpoint.calls, 1);
    assert.equal(second.provider.state, "refreshing");
    answer(Response.json({ identity: "a", token: "one", ...times(clock) }));
    assert.deepEqual(await Promise.all([first.provider.token(), second.provider.token()]), ["one", "one"]);
    // The second asked while the first had none, then waited its turn under the lock: still one request.
    assert.equal(endpoint.calls, 1);
    assert.deepEqual(second.record.from, ["tab"]);
  });

  it("whose clock reads earlier than the fetching tab's did, takes its tokens without fetching again", async () => {
    // Playwright gives each page a clock of its own and moves them one after the other: a tab can hear of a token
    // fetched at a time its own clock has not reached yet. That is not a clock set back since the token came.
    const ahead = new FakeClock();
    const behind = new FakeClock(ahead.now() - 10_000);
    const endpoint = new FakeEndpoint(ahead).ok({ token: "one" }).ok({ token: "two" });
    const platform = browserOf();
    const first = openTab(platform, endpoint, ahead, "/later-h");
    assert.equal(await first.provider.token(), "one");
    const second = openTab(platform, endpoint, behind, "/later-h");
    assert.equal(await second.provider.token(), "one");
    assert.equal(endpoint.calls, 1);
    await ahead.advance(61_000);
    await settle();
    assert.equal(first.record.tokens.at(-1), "two");
    assert.equal(endpoint.calls, 2);
    await behind.advance(61_000);
    assert.equal(endpoint.calls, 2);
    assert.deepEqual(second.record.tokens, ["one", "two"]);
    assert.deepEqual(second.record.from, ["tab", "tab"]);
    assert.equal(second.provider.state, "fresh");
  });

  it("with shareAcrossTabs false asks nobody and holds no lock", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" });
    const locks = new QueuedLocks();
    const platform = browserOf(locks);
    const first = openTab(platform, endpoint, clock, "/later-f");
    await first.provider.token();
    const alone = tokenProvider({
      url: "/later-f",
      fetch: endpoint.fetch,
      now: clock.now,
      timers: clock.timers,
      window: null,
      document: null,
      platform,
      shareAcrossTabs: false,
    });
    started.push(alone);
    assert.equal(await alone.token(), "two");
    assert.equal(endpoint.calls, 2);
    assert.equal((await locks.query()).held.length, 1);
  });
});

describe("a page hidden in the back/forward cache", { timeout: 10_000 }, () => {
  it("lets go of its lock on pagehide and takes it again on pageshow", async () => {
    const clock = new FakeClock();
    const endpoint = new FakeEndpoint(clock).ok({ token: "one" }).ok({ token: "two" });
    const locks = new QueuedLocks();
    const platform = browserOf(locks);
    const win = new EventTarget();
    const hidden = tokenProvider({
      url: "/later-g",
      fetch: endpoint.fetch,
      now: clock.now,
      timers: clock.timers,
      window: win,
      document: null,
      platform,
    });
    started.push(hidden);
    await hidden.token();
    assert.equal((await locks.query()).held.length, 1);
    win.dispatchEvent(new Event("pagehide"));
    await settle();
    assert.deepEqual((await locks.query()).held, []);
    // Not counted while hidden (it could not answer): a tab opened meanwhile fetches at once.
    const other = openTab(platform, endpoint, clock, "/later-g");
    assert.equal(await other.provider.token(), "two");
    assert.equal(endpoint.calls, 2);
    const back = new Event("pageshow");
    Object.defineProperty(back, "persisted", { value: true });
    win.dispatchEvent(back);
    await settle();
    assert.equal((await locks.query()).held.length, 2);
    hidden.stop();
    await settle();
    assert.equal((await locks.query()).held.length, 1);
  });
});

function times(clock) {
  return {
    refresh_after: new Date(clock.now() + 60_000).toISOString(),
    expires_at: new Date(clock.now() + 120_000).toISOString(),
  };
}
