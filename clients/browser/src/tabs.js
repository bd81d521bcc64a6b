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
 * @property {() => void} hide let go of the shared lock while the page is hidden in the back/forward cache
 * @property {() => void} show take it again when the page comes back
 * @property {() => void} close
 */

/**
 * @param {string} name the lock's and the channel's name: one per token URL
 * @param {(message: any) => void} onMessage what another tab published
 * @param {{ navigator?: any, locks?: any, BroadcastChannel?: any }} [platform] the browser's, unless given
 * @param {() => object | null} [fresh] this provider's fresh grant, to answer another's ask with
 * @returns {Tabs}
 */
export function connectTabs(name, onMessage, platform = globalThis, fresh = () => null) {
  const locks = platform.navigator?.locks ?? platform.locks;
  const Channel = platform.BroadcastChannel;
  const channel = Channel ? new Channel(name) : null;
  const presence = `${name}:tabs`;
  let closed = false;
  // The shared lock that counts this provider among the tabs': wanted from join() until close(), except while the
  // page is hidden in the back/forward cache (Chrome keeps no page that holds a lock there).
  let wanted = false;
  /** @type {(() => void) | null} lets go of it, while held */
  let leave = null;
  /** @type {Promise<void> | null} settles once it is held (or refused), while held or asked for */
  let holding = null;
  /** @type {{ id: string, left: number, done: () => void, timer: unknown } | null} our ask, awaiting answers */
  let ask = null;
  // How many messages this provider published: whether a turn under the lock published any.
  let published = 0;

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

  // The lock and the channel are separate pipes: a message a tab sent before it let go of the lock can reach
  // the others after the release does (Chromium under load: the release overtook a token still leaving the
  // fetching tab, and the next tab fetched again). A probe through the channel, from a second channel of ours,
  // comes back only after what we sent before it has gone out to every tab, and after what was on its way to
  // us. So the tab that published under the lock lets go once its probe came back, and the next holder starts
  // once its own came back: the token is in by then.
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

  /** Take the shared lock (if not held or asked for already); settles once held, or refused (an opaque origin). */
  const present = () => {
    wanted = true;
    holding ??= new Promise((settled) => {
      const granted = () =>
        new Promise((release) => {
          leave = () => {
            leave = null;
            holding = null;
            release(undefined);
          };
          if (!wanted || closed) leave();
          settled(undefined);
        });
      Promise.resolve()
        .then(() => locks.request(presence, { mode: "shared" }, granted))
        .catch(() => {
          holding = null;
          settled(undefined);
        });
    });
    return holding;
  };

  /** @type {Tabs["join"]} */
  const join = (timers) => {
    if (!channel || typeof locks?.query !== "function") return null;
    return new Promise((resolve) => {
      const done = () => {
        if (ask) timers.clearTimeout(/** @type {any} */ (ask.timer));
        ask = null;
        resolve(undefined);
      };
      present()
        .then(() => (closed ? null : locks.query()))
        .then((/** @type {any} */ snapshot) => {
          const held = (snapshot?.held ?? []).filter((/** @type {any} */ lock) => lock.name === presence).length;
          const others = held - (leave ? 1 : 0);
          if (closed || others <= 0) return done();
          const id = `${Math.random()}`;
          ask = { id, left: others, done, timer: timers.setTimeout(done, ASK_BOUND_MS) };
          channel.postMessage({ type: "ask", id });
        })
        .catch(done);
    });
  };

  /** @type {Tabs["exclusive"]} */
  const exclusive = (task) => {
    if (!locks) return task();
    return locks.request(name, { mode: "exclusive" }, async () => {
      await settle();
      const before = published;
      try {
        return await task();
      } finally {
        if (published !== before) await settle();
      }
    });
  };

  return {
    exclusive,
    publish: (message) => {
      published += 1;
      channel?.postMessage(message);
    },
    join,
    hide: () => {
      wanted = false;
      leave?.();
    },
    show: () => {
      if (!closed && channel && typeof locks?.query === "function") present();
    },
    close: () => {
      closed = true;
      leave?.();
      ask?.done();
      channel?.close();
    },
  };
}
