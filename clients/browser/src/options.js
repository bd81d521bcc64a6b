// The provider's options, read in one place: what the page may give, and what each defaults to.

/**
 * @typedef {object} ProviderOptions
 * @property {string} [url] the BFF's token endpoint (default "/token")
 * @property {(token: string, info: import("./provider.js").TokenInfo) => void} [onToken] each new token, the first
 * included
 * @property {(state: import("./provider.js").State, info: import("./provider.js").StateInfo) => void} [onState] each
 * change of state
 * @property {(error: import("./errors.js").TokenError) => void} [onSignedOut] once when the BFF answers 401 (again
 * only after a token came, or after `refresh()`)
 * @property {typeof fetch} [fetch]
 * @property {RequestInit} [init] extra fetch options (e.g. credentials: "include" for a BFF on another origin;
 * a `signal` of the app's replaces the provider's, which aborts a fetch after FETCH_TIMEOUT_MS and on stop())
 * @property {boolean} [shareAcrossTabs] one fetch for all tabs of the origin (default true)
 * @property {() => number} [now] the clock (default Date.now)
 * @property {() => number} [random] in [0, 1) (default Math.random)
 * @property {Timers} [timers]
 * @property {EventTarget | null} [window] where online, focus and pageshow fire (default globalThis)
 * @property {EventTarget | null} [document] where visibilitychange and resume fire (default globalThis.document)
 * @property {object} [platform] where navigator.locks and BroadcastChannel come from (default globalThis)
 *
 * @typedef {{ setTimeout: typeof setTimeout, clearTimeout: typeof clearTimeout }} Timers
 */

/**
 * The options with every default filled in.
 * @param {ProviderOptions} options
 */
export function resolveOptions(options) {
  return {
    url: options.url ?? "/token",
    fetchToken: options.fetch ?? globalThis.fetch.bind(globalThis),
    init: options.init,
    shareAcrossTabs: options.shareAcrossTabs !== false,
    now: options.now ?? Date.now,
    random: options.random ?? Math.random,
    /** @type {Timers} */
    timers: options.timers ?? globalThis,
    win: options.window === undefined ? globalThis : options.window,
    doc: options.document === undefined ? globalThis.document : options.document,
    platform: options.platform ?? globalThis,
  };
}
