// A clock with timers the test moves by hand, and a token endpoint that answers what the test queued: enough to
// drive the provider in Node, with no browser and no server.

export class FakeClock {
  constructor(now = Date.UTC(2026, 0, 1, 12, 0, 0)) {
    this.time = now;
    this.nextId = 1;
    /** @type {Map<number, { at: number, run: () => void }>} */
    this.pending = new Map();
    this.now = () => this.time;
    this.timers = {
      setTimeout: (run, delay) => {
        const id = this.nextId++;
        this.pending.set(id, { at: this.time + delay, run });
        return id;
      },
      clearTimeout: (id) => this.pending.delete(id),
    };
  }

  /** Move the clock by `ms`, running each timer due on the way, then let promises settle. */
  async advance(ms) {
    const end = this.time + ms;
    for (;;) {
      await settle();
      const due = [...this.pending].filter(([, t]) => t.at <= end).sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      this.pending.delete(due[0]);
      this.time = Math.max(this.time, due[1].at);
      due[1].run();
    }
    this.time = end;
    await settle();
  }

  /** Jump the clock without running timers, as a sleeping laptop or a throttled tab does. */
  async jump(ms) {
    this.time += ms;
    await settle();
  }
}

/** Let every queued promise callback run. */
export async function settle() {
  for (let i = 0; i < 20; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** A grant as the BFF sends it, its times relative to `now` (ms). */
export function grantBody(now, { refreshIn = 60_000, expiresIn = 120_000, token = `token-${now}` } = {}) {
  return {
    identity: "alice",
    token,
    expires_at: new Date(now + expiresIn).toISOString(),
    refresh_after: new Date(now + refreshIn).toISOString(),
  };
}

/** fetch for the provider: each call takes the next queued answer (a function of the clock) and is counted. */
export class FakeEndpoint {
  constructor(clock) {
    this.clock = clock;
    this.calls = 0;
    /** @type {Array<() => Response | Promise<Response>>} */
    this.queue = [];
    this.fetch = async () => {
      this.calls += 1;
      const next = this.queue.shift();
      if (!next) throw new Error("no answer queued");
      return next();
    };
  }

  ok(options) {
    this.queue.push(() => json(200, grantBody(this.clock.now(), options), { Date: httpDate(this.clock.now()) }));
    return this;
  }

  refuse(status, headers = {}, reason = "SOME_REASON") {
    const body = { error: { code: "CODE", reason, message: "refused" } };
    this.queue.push(() => json(status, body, headers));
    return this;
  }

  networkError() {
    this.queue.push(() => Promise.reject(new TypeError("Failed to fetch")));
    return this;
  }
}

export function httpDate(ms) {
  return new Date(ms).toUTCString();
}

function json(status, body, headers) {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });
}
