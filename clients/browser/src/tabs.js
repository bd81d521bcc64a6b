// One refresh at a time across the tabs of an origin: a Web Lock around each fetch, and a BroadcastChannel that
// hands its result to every tab, so that ten tabs whose token falls due together make one request. Both are
// optional: without them (an old browser, a test in Node) each provider fetches for itself.

/**
 * @typedef {object} Tabs
 * @property {<T>(task: () => Promise<T>) => Promise<T>} exclusive run `task` while no other tab runs one
 * @property {(message: object) => void} publish tell the other tabs
 * @property {() => void} close
 */

/**
 * @param {string} name the lock's and the channel's name: one per token URL
 * @param {(message: any) => void} onMessage what another tab published
 * @param {{ locks?: any, BroadcastChannel?: any }} [platform] the browser's, unless given
 * @returns {Tabs}
 */
export function connectTabs(name, onMessage, platform = globalThis) {
  const locks = platform.navigator?.locks ?? platform.locks;
  const Channel = platform.BroadcastChannel;
  const channel = Channel ? new Channel(name) : null;
  if (channel) {
    channel.onmessage = (/** @type {MessageEvent} */ event) => {
      if (event.data?.probe === undefined) onMessage(event.data);
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

  return {
    exclusive: (task) =>
      locks ? locks.request(name, { mode: "exclusive" }, async () => (await settle(), task())) : task(),
    publish: (message) => channel?.postMessage(message),
    close: () => channel?.close(),
  };
}
