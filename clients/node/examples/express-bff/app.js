// The route from Twilio's guide "Issuing Sync Tokens", ported to synctoken: the AccessToken lines are
// one IssueToken call, and the Twilio secret is no longer here. Same route, same response shape.
import express from "express";
import { Code, ConnectError, clientFromEnv, httpStatus } from "../../src/client.js";

const synctoken = clientFromEnv();

const app = express();

app.get("/token", async (req, res) => {
  const identity = req.query.identity;
  try {
    const { token } = await synctoken.issueToken({
      identity,
      // Empty: the caller's default Sync service from synctoken's policy.
      sync: { serviceSid: process.env.TWILIO_SYNC_SERVICE_SID ?? "", endpointId: req.query.device ?? "" },
    });
    res.send({ identity, token });
  } catch (error) {
    const { code, rawMessage } = ConnectError.from(error);
    // Never the token or the request: synctoken's message names the rule that failed.
    console.error(`token.refused code=${Code[code]} message=${JSON.stringify(rawMessage)}`);
    res.status(httpStatus(error)).send({ error: { code: Code[code], message: rawMessage } });
  }
});

const server = app.listen(Number(process.env.PORT), "127.0.0.1", () => {
  process.stdout.write(`listening on ${server.address().port}\n`);
});
