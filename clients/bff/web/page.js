// The demo page's script: fetch /token from the BFF, start the real Twilio Sync SDK with it, keep it fresh, and
// show what people come to check: the token's header and claims, when it is refreshed and expires, and why the
// SDK cannot connect when it cannot.
// esbuild bundles this file and twilio-sync into ../src/synctoken_bff/static/page.js (`make`), so that the
// page loads nothing but the BFF's own files.
import { SyncClient } from "twilio-sync";

// How long to wait for Twilio before saying plainly that it cannot be reached (the SDK keeps retrying).
const CONNECT_DEADLINE_MS = 15000;
// The least time between two refreshes by the page's own timer.
const MIN_REFRESH_MS = 5000;
// `synctoken dev`'s made-up credentials (service/synctoken_server/dev/devenv.py) when no TWILIO_* variables are set:
// a token they sign is a valid JWT, and Twilio refuses it.
const DEV_ACCOUNT_SID = `AC${"0".repeat(32)}`;
const DEV_API_KEY_SID = `SK${"0".repeat(32)}`;
// Twilio's errors about a token, in words (https://www.twilio.com/docs/api/errors/201xx).
const TOKEN_ERRORS = {
  20101: "the token is not valid",
  20102: "the token's header is not valid",
  20103: "Twilio does not know the account or API key that signed it",
  20104: "the token has expired",
  20105: "the token is not valid yet (is this computer's clock right?)",
  20106: "the token's grants are not valid",
  20107: "its signature does not match the API key's secret",
};
// Times are shown in the browser's zone, named, so that nobody has to guess whether 14:00 is UTC.
const TIME_ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone;
const TIME_FORMAT = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "long" });

// What the page did, for people (the panel) and for the browser test (window.syncDemo).
const demo = {
  client: null,
  createdWith: null,
  updatedWith: [],
  lastRefresh: null,
  refreshTimer: null,
  current: null,
  devSigned: false,
  explainConnectionError: null,
};
window.syncDemo = demo;

function show(id, text) {
  document.getElementById(id).textContent = text;
}

function showState(text, kind) {
  const state = document.getElementById("state");
  state.textContent = text;
  state.className = `state state-${kind}`;
}

function formatTime(date) {
  return `${TIME_FORMAT.format(date)} (${TIME_ZONE})`;
}

function showTime(id, date) {
  const element = document.getElementById(id);
  element.dateTime = date.toISOString().replace(".000Z", "Z");
  element.textContent = formatTime(date);
}

// "1 h 02 min 05 s": whole seconds, the larger units only when there are any.
function duration(ms) {
  const total = Math.round(Math.abs(ms) / 1000);
  const [h, m, s] = [Math.floor(total / 3600), Math.floor(total / 60) % 60, total % 60];
  const pad = (n) => String(n).padStart(2, "0");
  if (h > 0) return `${h} h ${pad(m)} min ${pad(s)} s`;
  if (m > 0) return `${m} min ${pad(s)} s`;
  return `${s} s`;
}

function countdown(moment) {
  const ms = moment.getTime() - Date.now();
  return ms >= 0 ? `(in ${duration(ms)})` : `(${duration(ms)} ago)`;
}

// A JWT's header and claims. The signature, the third part, is never decoded, kept or shown.
function decodeJwt(token) {
  const [header, claims] = token.split(".", 2).map((part) => {
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))));
  });
  return { header, claims };
}

async function fetchToken() {
  // no-store: every refresh must reach the BFF, which decides whether its cached token is still good.
  const response = await fetch("/token", { cache: "no-store", credentials: "same-origin" });
  const body = await response.json();
  if (!response.ok) {
    throw new Error(`${response.status} ${body.error.code}: ${body.error.message}`);
  }
  // refresh_after is the BFF's time. A browser clock running ahead of it would make every new token look
  // due at once and refresh in a loop, so the timer runs on the BFF's clock (its Date header) instead.
  const bffNow = Date.parse(response.headers.get("Date") ?? "");
  body.clockSkew = Number.isNaN(bffNow) ? 0 : Date.now() - bffNow;
  return body;
}

function showToken(grant) {
  const { header, claims } = decodeJwt(grant.token);
  const sync = claims.grants?.data_sync ?? {};
  demo.current = { expires: new Date(grant.expires_at), refreshAfter: new Date(grant.refresh_after), claims };
  show("identity", grant.identity);
  show("service", sync.service_sid ?? "none");
  show("endpoint", sync.endpoint_id ?? "none (no ?device= given)");
  showTime("not-before", new Date(claims.nbf * 1000));
  showTime("expires", demo.current.expires);
  showTime("refresh-at", demo.current.refreshAfter);
  show("jwt-header", JSON.stringify(header, null, 2));
  show("jwt-claims", JSON.stringify(claims, null, 2));
  demo.devSigned = claims.sub === DEV_ACCOUNT_SID || claims.iss === DEV_API_KEY_SID;
  const note = document.getElementById("dev-note");
  note.hidden = !demo.devSigned;
  note.textContent = demo.devSigned
    ? `Dev-signed token: synctoken signed it with the dev server's made-up credentials (account ${claims.sub}, ` +
      `API key ${claims.iss}). It is a valid JWT, but Twilio will refuse it. Start synctoken dev with real ` +
      "TWILIO_ACCOUNT_SID, TWILIO_API_KEY and TWILIO_API_SECRET for a token Twilio accepts."
    : "";
  tick();
}

function tick() {
  if (demo.current !== null) {
    show("expires-in", countdown(demo.current.expires));
    show("refresh-in", countdown(demo.current.refreshAfter));
  }
}

function remember(why, text) {
  const item = document.createElement("li");
  item.textContent = `${formatTime(new Date())} ${why}: ${text}`;
  document.getElementById("history").append(item);
}

function rememberToken(why) {
  const { claims, expires } = demo.current;
  remember(why, `token ${claims.jti}, expires ${formatTime(expires)}`);
}

// The SDK fires tokenAboutToExpire only while connected to Twilio, so the page also keeps its own timer,
// set to the BFF's refresh_after, which works offline too.
function scheduleRefresh(grant) {
  clearTimeout(demo.refreshTimer);
  // Never sooner than MIN_REFRESH_MS: whatever the clocks say, the page must not hammer the BFF.
  const delay = Math.max(MIN_REFRESH_MS, Date.parse(grant.refresh_after) + grant.clockSkew - Date.now());
  demo.refreshTimer = setTimeout(() => refresh("timer"), delay);
}

async function refresh(why) {
  try {
    const grant = await fetchToken();
    showToken(grant);
    scheduleRefresh(grant);
    demo.updatedWith.push(grant.token);
    demo.lastRefresh = new Date();
    show("refreshed", `${formatTime(demo.lastRefresh)} (${why})`);
    rememberToken(`refreshed (${why})`);
    // Not awaited before the panel is updated: while offline the SDK may hold the promise until it connects.
    await demo.client.updateToken(grant.token);
  } catch (error) {
    show("refreshed", `refresh failed: ${error.message}`);
    remember(`refresh failed (${why})`, error.message);
    // Try again in a minute rather than never: the old token may still have a while to live.
    demo.refreshTimer = setTimeout(() => refresh("retry"), 60000);
  }
}

/** The SDK's connectionError in words a person understands, instead of e.g. "Socket error: undefined". */
function explainConnectionError(error) {
  const message = String(error?.message ?? "");
  const status = error?.httpStatusCode ?? null;
  if (message.startsWith("Socket error")) {
    // The browser's WebSocket error event carries no reason at all, hence the SDK's "undefined".
    return (
      "the browser could not open its WebSocket to Twilio (wss://tsock.us1.twilio.com); browsers do not say why: " +
      "no network route to Twilio from here, a firewall or proxy in the way, or Twilio down"
    );
  }
  if (TOKEN_ERRORS[error?.errorCode] !== undefined) {
    return `Twilio refused the token (error ${error.errorCode}): ${TOKEN_ERRORS[error.errorCode]}`;
  }
  if (status === 401 || status === 403) {
    return `Twilio refused the token (HTTP ${status})`;
  }
  if (status === 429) {
    return "Twilio is limiting how often this browser connects; the SDK waits and tries again";
  }
  if (status !== null && status >= 500) {
    return `Twilio had a server error (HTTP ${status}); the SDK tries again`;
  }
  const said = message.replace(/^Connection error: /, "").split("\n", 1)[0].trim();
  return said && said !== "undefined" ? `the SDK says: ${said}` : "the SDK gave no reason";
}

demo.explainConnectionError = explainConnectionError;

// The SDK retries forever and its states ("connecting", "retrying") do not say that nothing will work, so
// after a deadline without a connection, or on any connection error, the page says so in plain words.
function watchConnection(client) {
  const seen = { state: "connecting", error: null, deadlinePassed: false };
  const render = () => {
    const dev = demo.devSigned ? " Even if it connected, Twilio would refuse this dev-signed token." : "";
    if (seen.state === "connected") {
      showState("connected", "ok");
    } else if (seen.state === "denied") {
      const why = seen.error === null ? "" : `: ${explainConnectionError(seen.error)}`;
      showState(`denied: Twilio refused the token${why}`, "error");
    } else if (seen.error !== null || seen.deadlinePassed) {
      const why =
        seen.error === null
          ? `no answer from Twilio within ${CONNECT_DEADLINE_MS / 1000} s`
          : explainConnectionError(seen.error);
      showState(`cannot connect to Twilio Sync: ${why}. The SDK keeps trying (${seen.state}).${dev}`, "error");
    } else {
      showState(seen.state, seen.state === "disconnected" || seen.state === "error" ? "error" : "pending");
    }
  };
  setTimeout(() => {
    seen.deadlinePassed = true;
    render();
  }, CONNECT_DEADLINE_MS);
  client.on("connectionStateChanged", (state) => {
    seen.state = state;
    if (state === "connected") {
      seen.error = null;
      seen.deadlinePassed = false;
    }
    render();
  });
  client.on("connectionError", (error) => {
    seen.error = error;
    render();
  });
}

async function start() {
  showState("fetching a token", "pending");
  let grant;
  try {
    grant = await fetchToken();
  } catch (error) {
    showState(`no token: ${error.message}`, "error");
    remember("no token", error.message);
    return;
  }
  showToken(grant);
  rememberToken("first token");
  setInterval(tick, 1000);
  showState("connecting to Twilio Sync", "pending");
  demo.client = new SyncClient(grant.token, { logLevel: "silent" });
  demo.createdWith = grant.token;
  watchConnection(demo.client);
  demo.client.on("tokenAboutToExpire", () => refresh("tokenAboutToExpire"));
  scheduleRefresh(grant);
}

start();
