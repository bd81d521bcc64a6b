// A synctoken client for Node: the TokenService over gRPC with mutual TLS (connect-node's gRPC transport,
// HTTP/2), set up from the same SYNCTOKEN_* variables as the Python client library.
import { readFileSync } from "node:fs";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { TokenService } from "./gen/synctoken/v1/token_service_pb.js";

export { Code, ConnectError };

// Seconds for a whole call, as in the Python client (SYNCTOKEN_TIMEOUT).
const DEFAULT_TIMEOUT = 5;

function required(env, name) {
  const value = env[name];
  if (!value) {
    throw new Error(`${name} is not set`);
  }
  return value;
}

/** A TokenService client for SYNCTOKEN_TARGET, proving who we are with SYNCTOKEN_CERT_FILE/_KEY_FILE. */
export function clientFromEnv(env = process.env) {
  const target = required(env, "SYNCTOKEN_TARGET");
  const transport = createGrpcTransport({
    baseUrl: `https://${target}`,
    // Read once at start: a rotated certificate needs a restart here (the Python client reloads it).
    nodeOptions: {
      ca: readFileSync(required(env, "SYNCTOKEN_CA_FILE")),
      cert: readFileSync(required(env, "SYNCTOKEN_CERT_FILE")),
      key: readFileSync(required(env, "SYNCTOKEN_KEY_FILE")),
      servername: env.SYNCTOKEN_SERVER_NAME || undefined,
    },
    defaultTimeoutMs: 1000 * Number(env.SYNCTOKEN_TIMEOUT || DEFAULT_TIMEOUT),
  });
  return createClient(TokenService, transport);
}

// synctoken's refusals as HTTP statuses, as the Python BFF maps them.
const HTTP_STATUS = new Map([
  [Code.InvalidArgument, 400],
  [Code.PermissionDenied, 403],
  [Code.ResourceExhausted, 429],
  [Code.Unavailable, 503],
  [Code.DeadlineExceeded, 503],
  [Code.Unauthenticated, 502],
]);

/** The HTTP status for a failed call (502 for anything unexpected: the fault is upstream). */
export function httpStatus(error) {
  return HTTP_STATUS.get(ConnectError.from(error).code) ?? 502;
}
