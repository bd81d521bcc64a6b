// The browser's signs that timers may have been late (a hidden or frozen tab, a sleeping laptop) or that a retry
// may now work: each makes the provider look at its clock again.

/**
 * @typedef {object} WakeHandlers
 * @property {() => void} wake look at the clock again
 * @property {() => void} online the network is back: a retry after a network error may start at once
 * @property {() => void} show the page came back from the back/forward cache
 * @property {() => void} hide the page is being hidden, perhaps into the back/forward cache
 */

/**
 * Listen for focus, online, pageshow and pagehide on `win`, and visibilitychange and resume on `doc`.
 * @param {EventTarget | null} win
 * @param {EventTarget | null} doc
 * @param {WakeHandlers} on
 * @returns {() => void} stops listening
 */
export function listenForWake(win, doc, on) {
  const wake = () => on.wake();
  const onVisibility = () => {
    if (doc && /** @type {Document} */ (doc).visibilityState !== "hidden") wake();
  };
  const onOnline = () => on.online();
  const onPageShow = (/** @type {Event} */ event) => {
    if (!(/** @type {PageTransitionEvent} */ (event).persisted)) return;
    on.show();
    wake();
  };
  const onPageHide = () => on.hide();
  /** @type {[EventTarget | null, string, (event: Event) => void][]} */
  const listeners = [
    [win, "online", onOnline],
    [win, "focus", wake],
    [win, "pageshow", onPageShow],
    [win, "pagehide", onPageHide],
    [doc, "visibilitychange", onVisibility],
    [doc, "resume", wake],
  ];
  for (const [target, type, listener] of listeners) target?.addEventListener?.(type, listener);
  return () => {
    for (const [target, type, listener] of listeners) target?.removeEventListener?.(type, listener);
  };
}
