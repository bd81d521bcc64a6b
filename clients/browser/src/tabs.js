// One refresh at a time across the tabs of an origin: a Web Lock around each fetch, and a BroadcastChannel that
// hands its result to every tab, so that ten tabs whose token falls due together make one request. A tab opened
// later first asks the others for their fresh token. All optional: without a lock API or a channel (an old
// browser, a test in Node) each provider fetches for itself.

/**
 * How long a new provider waits for the other tabs' answers before it fetches for itself. A message between two
 * tabs of one browser takes well under 10 ms; this leaves room for a tab whose main thread is busy, and is short
 * enough to be lost in the GET /token that follows when no answer came. A lone tab does not wait at all.
 */
export const ASK_BOUND_MS = 250;

/**
 * @typedef {object} Tabs
 * @property {<T>(task: () => Promise<T>) => Promise<T>} exclusive run `task` while no other tab runs one
 * @property {(message: object) => void} publish tell the other tabs
 * @property {(timers: { setTimeout: typeof setTimeout, clearTimeout: typeof clearTimeout }) => Promise<void> | null} join
 * count this provider among the tabs' and ask the others for a fresh token: resolves once one came (through
 * onMessage, as a "token" message), every other provider said it has none, or after ASK_BOUND_MS. Null when
 * there are no tabs to ask (no lock API or channel): nothing to wait for.
 * @property {() => void} close
 */

/**
 * @param {string} name the lock's and the channel's name: one per token URL
 * @param {(message: any) => void} onMessage what another tab published
 * @param {{ locks?: any, BroadcastChannel?: any }} [platform] the browser's, unless given
 * @param {() => object | null} [fresh] this provider's fresh grant, to answer another's ask with
 * @returns {Tabs}
 */
export function connectTabs(name, onMessage, platform = globalThis, fresh = () => null) {
  const locks = platform.navigator?.locks ?? platform.locks;
  const Channel = platform.BroadcastChannel;
  const channel = Channel ? new Channel(name) : null;
  let closed = false;
  /** @type {(() => void) | null} lets go of the shared lock that says this provider lives */
  let leave = null;
  /** @type {{ id: string, left: number, done: () => void, timer: unknown } | null} our ask, awaiting answers */
  let ask = null;

  if (channel) {
    channel.onmessage = (/** @type {MessageEvent} */ event) => {
      const data = event.data;
      if (data?.probe !== undefined) return;
      if (data?.type === "ask") {
        const grant = fresh();
        // A token answer is the message a fetch's result is shared with: every tab may take it.
        channel.postMessage(grant ? { type: "token", grant, to: data.id } : { type: "none", to: data.id });
        return;
      }
      if (data?.type !== "none") onMessage(data);
      if (ask && data?.to === ask.id && (data.type === "token" || --ask.left <= 0)) ask.done();
    };
  }

  // A message published by the tab that held the lock before us is sent before it let go, but the lock and
  // the channel are separate pipes, so our turn can come first. A probe through the channel itself, from a
  // second channel of ours, comes back after whatever was already on its way: then the check is complete.
  const settle = () =>
    new Promise((resolve) => {
      if (!Channel) return resolve(undefined);
      const probe = new Channel(name);
      const echo = new Channel(name);
      const id = Math.random();
      echo.onmessage = (/** @type {MessageEvent} */ event) => {
        if (event.data?.probe !== id) return;
        probe.close();
        echo.close();
        resolve(undefined);
      };
      probe.postMessage({ probe: id });
    });

  /** @type {Tabs["join"]} */
  const join = (timers) => {
    if (!channel || typeof locks?.query !== "function") return null;
    const presence = `${name}:tabs`;
    return new Promise((resolve) => {
      const done = () => {
        if (ask) timers.clearTimeout(/** @type {any} */ (ask.timer));
        ask = null;
        resolve(undefined);
      };
      // Held in shared mode until close(): every provider of this name holds it, so the lock manager's list of
      // holders is the list of providers, the tabs of a crashed page dropped with it.
      const held = (/** @type {unknown} */ _lock) =>
        new Promise((release) => {
          if (closed) return release(undefined);
          leave = () => release(undefined);
          locks
            .query()
            .then((/** @type {any} */ snapshot) => {
              const others = (snapshot?.held ?? []).filter((/** @type {any} */ l) => l.name === presence).length - 1;
              if (closed || others <= 0) return done();
              const id = `${Math.random()}`;
              ask = { id, left: others, done, timer: timers.setTimeout(done, ASK_BOUND_MS) };
              channel.postMessage({ type: "ask", id });
            })
            .catch(done);
        });
      // A page where locks are refused (an opaque origin) fetches as if alone.
      Promise.resolve()
        .then(() => locks.request(presence, { mode: "shared" }, held))
        .catch(done);
    });
  };

  return {
    exclusive: (task) =>
      locks ? locks.request(name, { mode: "exclusive" }, async () => (await settle(), task())) : task(),
    publish: (message) => channel?.postMessage(message),
    join,
    close: () => {
      closed = true;
      leave?.();
      ask?.done();
      channel?.close();
    },
  };
}
