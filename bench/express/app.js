// The route from Twilio's guide "Issuing Sync Tokens": an Express app whose
// GET /token mints an Access Token with a Sync grant using the official
// `twilio` npm package. TUNED=1 passes the secret as a crypto KeyObject, so
// jsonwebtoken does not parse the string secret into a key on every call.
"use strict";

const crypto = require("crypto");
const express = require("express");
const twilio = require("twilio");

const { AccessToken } = twilio.jwt;
const { SyncGrant } = AccessToken;

const secret = process.env.TUNED === "1"
  ? crypto.createSecretKey(Buffer.from(process.env.TWILIO_API_SECRET, "utf8"))
  : process.env.TWILIO_API_SECRET;

const app = express();

app.get("/token", (req, res) => {
  const identity = req.query.identity;
  const token = new AccessToken(
    process.env.TWILIO_ACCOUNT_SID,
    process.env.TWILIO_API_KEY,
    secret,
    { identity },
  );
  token.addGrant(new SyncGrant({ serviceSid: process.env.TWILIO_SYNC_SERVICE_SID }));
  res.send({ identity, token: token.toJwt() });
});

const server = app.listen(Number(process.env.PORT), "127.0.0.1", () => {
  process.stdout.write(`listening on ${server.address().port}\n`);
});
