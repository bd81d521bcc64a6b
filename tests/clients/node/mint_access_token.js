// Mints a Twilio Access Token with the official Node helper library, for
// comparison with synctoken's. Reads its inputs as JSON on stdin (so the
// secret never appears in a process list) and prints the JWT.
"use strict";

const twilio = require("twilio");

const { AccessToken } = twilio.jwt;
const { SyncGrant } = AccessToken;

let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const args = JSON.parse(input);
  const token = new AccessToken(args.accountSid, args.keySid, args.secret, {
    identity: args.identity,
    ttl: args.ttl,
    nbf: args.nbf,
    region: args.region || undefined,
  });
  token.addGrant(new SyncGrant({ serviceSid: args.serviceSid, endpointId: args.endpointId || undefined }));
  process.stdout.write(token.toJwt());
});
