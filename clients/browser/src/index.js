// @synctoken/browser: tokens from a synctoken BFF's GET /token, kept fresh for the Twilio SDKs.
export { tokenProvider } from "./provider.js";
export { bindSyncClient } from "./sync.js";
export { TokenError, ProviderStoppedError } from "./errors.js";
