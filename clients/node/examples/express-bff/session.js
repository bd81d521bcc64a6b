// The demo authenticator: a random anonymous identity per browser, kept in a cookie signed with HMAC-SHA256,
// as the Python BFF's (clients/bff/src/synctoken_bff/_session.py). DEMO ONLY: a real app returns its signed-in
// user instead (see `authenticate` in app.js).
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";

export const COOKIE_NAME = "synctoken_bff_identity";
// A year: the identity is anonymous and worthless once the browser drops it.
const MAX_AGE_MS = 365 * 24 * 3600 * 1000;
const MIN_SECRET_BYTES = 32;

/** The signing key from SESSION_SECRET_FILE, or a random one for this process only (with a warning). */
export function sessionSecret(env = process.env) {
  const path = env.SESSION_SECRET_FILE;
  if (!path) {
    // Fine for a demo; behind a balancer every process would sign differently, and a restart logs everyone out.
    console.error("SESSION_SECRET_FILE is not set: signing session cookies with a random key for this process only");
    return randomBytes(32);
  }
  const secret = Buffer.from(readFileSync(path, "utf8").trim());
  if (secret.length < MIN_SECRET_BYTES) {
    throw new Error(`SESSION_SECRET_FILE: ${path} holds ${secret.length} bytes; at least ${MIN_SECRET_BYTES} are needed`);
  }
  return secret;
}

/** `authenticate(req, res)` giving each browser an identity like "anon-3f2a...", remembered in its cookie. */
export function anonymousSessions(secret) {
  const sign = (identity) => createHmac("sha256", secret).update(identity).digest();

  function identityIn(req) {
    const value = cookie(req.headers.cookie ?? "", COOKIE_NAME);
    const dot = value.lastIndexOf(".");
    if (dot <= 0) {
      return null;
    }
    const identity = value.slice(0, dot);
    const given = Buffer.from(value.slice(dot + 1), "base64url");
    const expected = sign(identity);
    // timingSafeEqual: a byte-by-byte compare would time how much of a forged signature is right.
    return given.length === expected.length && timingSafeEqual(given, expected) ? identity : null;
  }

  return function authenticate(req, res) {
    const known = identityIn(req);
    if (known !== null) {
      return known;
    }
    // A cookie whose signature does not hold is ignored: the browser gets a new identity, never the one it claims.
    const identity = `anon-${randomBytes(16).toString("hex")}`;
    res.cookie(COOKIE_NAME, `${identity}.${sign(identity).toString("base64url")}`, {
      maxAge: MAX_AGE_MS,
      httpOnly: true,
      sameSite: "lax",
      secure: req.secure,
      // Already signed and URL-safe: Express must not percent-encode the value.
      encode: String,
    });
    return identity;
  };
}

function cookie(header, name) {
  for (const part of header.split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === name) {
      return part.slice(eq + 1).trim();
    }
  }
  return "";
}
