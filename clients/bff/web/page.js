// The demo page's script: fetch /token from the BFF, start the real Twilio Sync SDK with it, and keep it fresh.
// esbuild bundles this file and twilio-sync into ../src/synctoken_bff/static/page.js (`make`), so that the
// page loads nothing but the BFF's own files.
import { SyncClient } from "twilio-sync";

// How long to wait for Twilio before saying plainly that it cannot be reached (the SDK keeps retrying).
const CONNECT_DEADLINE_MS = 15000;

// What the page did, for people (the panel) and for the browser test (window.syncDemo).
const demo = { client: null, createdWith: null, updatedWith: [], lastRefresh: null, refreshTimer: null };
window.syncDemo = demo;

function show(id, text) {
  document.getElementById(id).textContent = text;
}

async function fetchToken() {
  // no-store: every refresh must reach the BFF, which decides whether its cached token is still good.
  const response = await fetch("/token", { cache: "no-store", credentials: "same-origin" });
  const body = await response.json();
  if (!response.ok) {
    throw new Error(`${response.status} ${body.error.code}: ${body.error.message}`);
  }
  return body;
}

function showToken(grant) {
  show("identity", grant.identity);
  const expires = document.getElementById("expires");
  expires.dateTime = grant.expires_at;
  expires.textContent = new Date(grant.expires_at).toLocaleString();
}

// The SDK fires tokenAboutToExpire only while connected to Twilio, so the page also keeps its own timer,
// set to the BFF's refresh_after, which works offline too.
function scheduleRefresh(grant) {
  clearTimeout(demo.refreshTimer);
  const delay = Math.max(0, Date.parse(grant.refresh_after) - Date.now());
  demo.refreshTimer = setTimeout(() => refresh("timer"), delay);
}

async function refresh(why) {
  try {
    const grant = await fetchToken();
    showToken(grant);
    scheduleRefresh(grant);
    demo.updatedWith.push(grant.token);
    demo.lastRefresh = new Date();
    show("refreshed", `${demo.lastRefresh.toLocaleString()} (${why})`);
    // Not awaited before the panel is updated: while offline the SDK may hold the promise until it connects.
    await demo.client.updateToken(grant.token);
  } catch (error) {
    show("refreshed", `refresh failed: ${error.message}`);
    // Try again in a minute rather than never: the old token may still have a while to live.
    demo.refreshTimer = setTimeout(() => refresh("retry"), 60000);
  }
}

// The SDK retries forever and its states ("connecting", "retrying") do not say that nothing will work, so
// after a deadline without a connection, or on any connection error, the page says so in plain words.
function watchConnection(client) {
  const seen = { state: "connecting", error: null, deadlinePassed: false };
  const render = () => {
    if (seen.state === "connected") {
      show("state", "connected");
    } else if (seen.state === "denied") {
      show("state", "denied: Twilio refused the token");
    } else if (seen.error !== null || seen.deadlinePassed) {
      const said = seen.error === null ? "no answer" : `the SDK reports "${seen.error}"`;
      show("state", `cannot connect to Twilio Sync (no route to Twilio?): ${said}; still trying (${seen.state})`);
    } else {
      show("state", seen.state);
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
    seen.error = error.message;
    render();
  });
}

async function start() {
  show("state", "fetching a token");
  let grant;
  try {
    grant = await fetchToken();
  } catch (error) {
    show("state", `no token: ${error.message}`);
    return;
  }
  showToken(grant);
  show("state", "connecting to Twilio Sync");
  demo.client = new SyncClient(grant.token, { logLevel: "silent" });
  demo.createdWith = grant.token;
  watchConnection(demo.client);
  demo.client.on("tokenAboutToExpire", () => refresh("tokenAboutToExpire"));
  scheduleRefresh(grant);
}

start();
