// The provider's errors: what the BFF said, never the token.

/** GET /token did not give a token: `status` is the HTTP status, or 0 when no answer came (network error). */
export class TokenError extends Error {
  /**
   * @param {number} status
   * @param {string} message
   * @param {{ code?: string | null, reason?: string | null }} [error] the BFF's error object, if it sent one
   */
  constructor(status, message, error = {}) {
    super(message);
    this.name = "TokenError";
    this.status = status;
    /** The BFF's error code (gRPC's name, e.g. "PERMISSION_DENIED"), or null. */
    this.code = error.code ?? null;
    /** The BFF's reason (e.g. "RATE_LIMITED", "NO_USER"), or null. */
    this.reason = error.reason ?? null;
  }
}

/** The provider was stopped while a caller waited for a token. */
export class ProviderStoppedError extends Error {
  constructor() {
    super("the token provider was stopped");
    this.name = "ProviderStoppedError";
  }
}
