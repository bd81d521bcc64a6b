// The one line between a provider and the Twilio Sync SDK (or any SDK with updateToken and the token events).

/**
 * @typedef {object} TokenClient What is needed of the SDK's client.
 * @property {(token: string) => Promise<unknown>} updateToken
 * @property {(event: string, listener: (...args: any[]) => void) => unknown} [on]
 */

/**
 * Create `new SyncClient(firstToken, options)` and give it every new token with `updateToken`.
 * The SDK's tokenAboutToExpire and tokenExpired events, when they fire, make the provider look at its clock
 * (and hand over the newest token at once); nothing depends on them firing, which they often do not (they fire
 * once per token, only while connected).
 * @template {TokenClient} C
 * @param {ReturnType<typeof import("./provider.js").tokenProvider>} provider
 * @param {new (token: string, options?: any) => C} SyncClient the SDK's class, e.g. SyncClient from "twilio-sync"
 * @param {any} [options] the SDK's options
 * @param {{ onUpdateError?: (error: unknown) => void }} [hooks] updateToken's rejections (e.g. a token Twilio refuses)
 * @returns {Promise<C>}
 */
export async function bindSyncClient(provider, SyncClient, options, hooks = {}) {
  let current = await provider.token();
  const client = new SyncClient(current, options);
  const hand = (/** @type {string} */ token) => {
    if (token === current) return;
    current = token;
    // Not awaited: while offline the SDK may hold the promise until it connects again.
    client.updateToken(token).catch((error) => hooks.onUpdateError?.(error));
  };
  provider.subscribe(hand);
  const catchUp = () => {
    provider.check();
    // A token the provider may already have (another tab's, or one the SDK missed), or the next one.
    provider.token().then(hand, () => {});
  };
  client.on?.("tokenAboutToExpire", catchUp);
  client.on?.("tokenExpired", catchUp);
  return client;
}
