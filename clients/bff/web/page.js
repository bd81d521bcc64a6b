// The demo page's script: the browser token provider (clients/browser) gets /token from the BFF and keeps it
// fresh, the real Twilio Sync SDK runs on it, and the page shows what people come to check: the token's header
// and claims, the provider's state, when it is refreshed and expires, and why the SDK cannot connect when it cannot.
// esbuild bundles this file, the provider and twilio-sync into ../src/synctoken_bff/static/page.js (`make`), so
// that the page loads nothing but the BFF's own files.
import { SyncClient } from "twilio-sync";
import { bindSyncClient, tokenProvider } from "../../browser/src/index.js";

// How long to wait for Twilio before saying plainly that it cannot be reached (the SDK keeps retrying).
const CONNECT_DEADLINE_MS = 15000;
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
  provider: null,
  client: null,
  createdWith: null,
  updatedWith: [],
  lastRefresh: null,
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

function showToken(token, info) {
  const { header, claims } = decodeJwt(token);
  const sync = claims.grants?.data_sync ?? {};
  demo.current = { expires: info.expiresAt, refreshAfter: info.refreshAfter, claims };
  show("identity", info.identity);
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

// The provider's states, as the page colours them.
const STATE_KINDS = {
  fresh: "ok",
  refreshing: "pending",
  stale: "pending",
  expired: "error",
  signed_out: "error",
  failing: "error",
};

function showTokenState(state, info) {
  const element = document.getElementById("token-state");
  element.textContent = state.replace("_", " ");
  element.className = `state state-${STATE_KINDS[state]}`;
  const parts = [];
  if (info.error !== null) parts.push(`last attempt: ${info.error.message}`);
  if (info.retryAt !== null) parts.push(`next attempt ${formatTime(new Date(info.retryAt))}`);
  show("token-detail", parts.join("; "));
  if (info.error !== null) remember(`token ${state.replace("_", " ")}`, info.error.message);
}

function onToken(token, info) {
  showToken(token, info);
  if (demo.createdWith === null) {
    rememberToken("first token");
    return;
  }
  demo.lastRefresh = new Date();
  const how = info.from === "tab" ? "by another tab" : "fetched";
  show("refreshed", `${formatTime(demo.lastRefresh)} (${how})`);
  rememberToken(`refreshed (${how})`);
}

// The SDK's client, recording each token it is handed after the first (for the browser test).
class DemoSyncClient extends SyncClient {
  constructor(token, options) {
    super(token, options);
    demo.createdWith = token;
  }

  updateToken(token) {
    demo.updatedWith.push(token);
    return super.updateToken(token);
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
  demo.provider = tokenProvider({
    url: "/token",
    onToken,
    onState: showTokenState,
    onSignedOut: (error) => remember("signed out", error.message),
  });
  let client;
  try {
    // The first token goes to the SDK's constructor, each later one to updateToken: nothing else to write.
    client = await bindSyncClient(demo.provider, DemoSyncClient, { logLevel: "silent" }, {
      onUpdateError: (error) => remember("the SDK refused a new token", explainConnectionError(error)),
    });
  } catch (error) {
    showState(`no token: ${error.message}`, "error");
    return;
  }
  demo.client = client;
  setInterval(tick, 1000);
  showState("connecting to Twilio Sync", "pending");
  watchConnection(client);
}

start();
