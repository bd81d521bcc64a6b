// The route from Twilio's guide "Issuing Sync Tokens", ported to synctoken: the AccessToken lines are
// one IssueToken call, and the Twilio secret is no longer here. Same route, same response shape; the identity
// is decided here, on the server, by `authenticate`, never taken from the browser's request.
import { pathToFileURL } from "node:url";
import express from "express";
import { browserAnswer, clientFromEnv } from "../../src/client.js";
import { anonymousSessions, sessionSecret } from "./session.js";

/**
 * The Express app. `authenticate(req, res)` returns the signed-in user's id (or a promise of it), or null for
 * no user (401): plug your login in there. The guide's `?identity=` is refused: any browser could ask for
 * anyone's token.
 */
export function createApp(synctoken, authenticate) {
  const app = express();

  app.get("/token", async (req, res) => {
    // A token is one user's credential: no cache, shared or private, may keep it.
    res.set("Cache-Control", "no-store");
    if ("identity" in req.query) {
      return refuse(res, 400, "IDENTITY_NOT_ACCEPTED", "the identity comes from your session, not from the request");
    }
    const device = req.query.device ?? "";
    if (typeof device !== "string") {
      return refuse(res, 400, "INVALID_REQUEST", "device is given more than once");
    }
    const identity = await authenticate(req, res);
    if (!identity) {
      return refuse(res, 401, "NO_USER", "sign in first", "UNAUTHENTICATED");
    }
    try {
      const { token, expiresAt, refreshAfter } = await synctoken.issueToken({
        identity,
        // Empty: the caller's default Sync service from synctoken's policy.
        sync: { serviceSid: process.env.TWILIO_SYNC_SERVICE_SID ?? "", endpointId: device },
      });
      // The Python BFF's shape: the browser's token provider (clients/browser) refreshes at refresh_after.
      const times = { expires_at: rfc3339(expiresAt), refresh_after: rfc3339(refreshAfter) };
      res.send({ identity, token, ...times });
    } catch (error) {
      const answer = browserAnswer(error);
      const { code, reason, message } = answer.refusal;
      // Never the token or the identity: synctoken's message names the rule that failed.
      const line = `token.refused status=${answer.status} code=${code} reason=${reason} message=${JSON.stringify(message)}`;
      if (answer.operatorFault) {
        console.error(`ERROR ${line} (synctoken refuses this app's settings: check TWILIO_SYNC_SERVICE_SID)`);
      } else {
        console.error(`WARNING ${line}`);
      }
      if (answer.retryAfter !== null) {
        res.set("Retry-After", answer.retryAfter);
      }
      res.status(answer.status).send(answer.body);
    }
  });
  return app;
}

// A protobuf Timestamp as the Python BFF writes times: whole seconds (rounded down: refresh_after may only move
// earlier), UTC, Z.
function rfc3339(timestamp) {
  return new Date(Number(timestamp.seconds) * 1000).toISOString().replace(".000Z", "Z");
}

function refuse(res, status, reason, message, code = "INVALID_ARGUMENT") {
  res.status(status).send({ error: { code, reason, message } });
}

// Run as a program (`node app.js`); imported, it only defines createApp.
if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  // DEMO ONLY: every browser gets an anonymous identity in a signed cookie. Replace it with your login, e.g.
  // `const authenticate = (req) => req.session?.userId ?? null;`
  const authenticate = anonymousSessions(sessionSecret());
  const server = createApp(clientFromEnv(), authenticate).listen(Number(process.env.PORT), "127.0.0.1", () => {
    process.stdout.write(`listening on ${server.address().port}\n`);
  });
}
