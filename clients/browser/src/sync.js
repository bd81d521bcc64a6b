// The one line between a provider and the Twilio Sync SDK (or any SDK with updateToken and the token events).

/**
 * @typedef {object} TokenClient What is needed of the SDK's client.
 * @property {(token: string) => Promise<unknown>} updateToken
 * @property {(event: string, listener: (...args: any[]) => void) => unknown} [on]
 * @property {(event: string, listener: (...args: any[]) => void) => unknown} [off]
 * @property {(event: string, listener: (...args: any[]) => void) => unknown} [removeListener]
 */

/**
 * Create `new SyncClient(firstToken, options)` and give it every new token with `updateToken`.
 * The SDK's tokenAboutToExpire and tokenExpired events, when they fire, make the provider look at its clock
 * (and hand over the newest token at once); nothing depends on them firing, which they often do not (they fire
 * once per token, only while connected).
 *
 * `hooks.signal` unbinds: once it is aborted the client gets no more tokens and its events no longer reach the
 * provider (abort it before `client.shutdown()`, or to bind the provider to a new client). Aborted before the
 * first token came, no client is made and the promise rejects with the signal's reason, as `fetch` does.
 * `provider.stop()` ends the binding too.
 * @template {TokenClient} C
 * @param {ReturnType<typeof import("./provider.js").tokenProvider>} provider
 * @param {new (token: string, options?: any) => C} SyncClient the SDK's class, e.g. SyncClient from "twilio-sync"
 * @param {any} [options] the SDK's options
 * @param {{ onUpdateError?: (error: unknown) => void, signal?: AbortSignal }} [hooks] updateToken's rejections
 *   (e.g. a token Twilio refuses), and the signal that unbinds
 * @returns {Promise<C>}
 */
export async function bindSyncClient(provider, SyncClient, options, hooks = {}) {
  const { signal } = hooks;
  signal?.throwIfAborted();
  let current = await provider.token();
  signal?.throwIfAborted();
  const client = new SyncClient(current, options);
  const hand = (/** @type {string} */ token) => {
    if (token === current || signal?.aborted) return;
    current = token;
    // Not awaited: while offline the SDK may hold the promise until it connects again.
    client.updateToken(token).catch((error) => hooks.onUpdateError?.(error));
  };
  const unsubscribe = provider.subscribe(hand);
  const catchUp = () => {
    if (signal?.aborted) return;
    provider.check();
    // A token the provider may already have (another tab's, or one the SDK missed), or the next one.
    provider.token().then(hand, () => {});
  };
  client.on?.("tokenAboutToExpire", catchUp);
  client.on?.("tokenExpired", catchUp);
  signal?.addEventListener(
    "abort",
    () => {
      unsubscribe();
      // The SDK's emitter has off (or Node's removeListener); without either, catchUp ignores the events.
      const off = client.off?.bind(client) ?? client.removeListener?.bind(client);
      off?.("tokenAboutToExpire", catchUp);
      off?.("tokenExpired", catchUp);
    },
    { once: true },
  );
  return client;
}
