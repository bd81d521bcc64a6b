// One GET /token, with its deadline: the answer read (answer.js), or a network failure when none could be had.
import { readAnswer } from "./answer.js";
import { TokenError } from "./errors.js";
import { FETCH_TIMEOUT_MS } from "./schedule.js";

/**
 * @typedef {object} Request
 * @property {Promise<import("./answer.js").Answer & { network?: boolean }>} answer the answer; `network` when none
 * came at all (so `online` may retry at once)
 * @property {() => void} abort ends it (its answer is then a network failure, or whatever came first)
 */

/**
 * Ask `url` for a token. Aborted by `abort()`, or when no answer (headers and body) came within FETCH_TIMEOUT_MS:
 * a connection that died while the laptop slept can leave a fetch with no answer and no error.
 * @param {object} how
 * @param {typeof fetch} how.fetchToken
 * @param {string} how.url
 * @param {RequestInit | undefined} how.init the app's extra fetch options
 * @param {import("./options.js").Timers} how.timers
 * @param {() => number} how.now
 * @returns {Request}
 */
export function requestToken({ fetchToken, url, init, timers, now }) {
  const controller = new AbortController();
  const deadline = timers.setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  const answer = (async () => {
    try {
      /** @type {Response} */
      let response;
      try {
        // no-store: every refresh must reach the BFF, which decides whether its cached token is still good.
        response = await fetchToken(url, {
          cache: "no-store",
          credentials: "same-origin",
          headers: { Accept: "application/json" },
          signal: controller.signal,
          ...init,
        });
      } catch {
        const error = new TokenError(0, "the token endpoint could not be reached");
        return { kind: /** @type {const} */ ("retry"), error, retryAfter: null, network: true };
      }
      return await readAnswer(response, url, now());
    } finally {
      timers.clearTimeout(deadline);
    }
  })();
  return { answer, abort: () => (timers.clearTimeout(deadline), controller.abort()) };
}
