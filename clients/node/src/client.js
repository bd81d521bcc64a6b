// A synctoken client for Node: the TokenService over gRPC with mutual TLS (connect-node's gRPC transport,
// HTTP/2), set up from the same SYNCTOKEN_* variables as the Python client library.
import { readFileSync } from "node:fs";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
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

// The details synctoken attaches to a refusal (google.rpc.ErrorInfo, BadRequest, RetryInfo). They are decoded
// here with protobuf's wire reader rather than generated: three small messages do not justify stubs for all
// of googleapis, which buf would have to fetch over a network we do not have.
const ERROR_INFO = "google.rpc.ErrorInfo";
const BAD_REQUEST = "google.rpc.BadRequest";
const RETRY_INFO = "google.rpc.RetryInfo";

// Calls `onField(number, reader)` for each field of `bytes`; `onField` returns false for a field it did not read.
function eachField(bytes, onField) {
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [number, wireType] = reader.tag();
    if (!onField(number, reader, wireType)) {
      reader.skip(wireType, number);
    }
  }
}

// The string or message field `wanted` of `bytes` (the last one, as protobuf merges repeated scalars).
function lengthDelimited(bytes, wanted, read) {
  let value;
  eachField(bytes, (number, reader, wireType) => {
    if (number !== wanted || wireType !== WireType.LengthDelimited) {
      return false;
    }
    value = read(reader);
    return true;
  });
  return value;
}

/** What synctoken said about a failed call: its code's name, the ErrorInfo reason, field violations, RetryInfo. */
export function refusalOf(error) {
  const connectError = ConnectError.from(error);
  const refusal = {
    code: codeName(connectError.code),
    reason: null,
    message: connectError.rawMessage,
    fieldViolations: [],
    retryAfterSeconds: null,
  };
  for (const detail of connectError.details) {
    if (!("type" in detail)) {
      continue;
    }
    if (detail.type === ERROR_INFO) {
      refusal.reason = lengthDelimited(detail.value, 1, (r) => r.string()) || null;
    } else if (detail.type === BAD_REQUEST) {
      eachField(detail.value, (number, reader, wireType) => {
        if (number !== 1 || wireType !== WireType.LengthDelimited) {
          return false;
        }
        const violation = reader.bytes();
        refusal.fieldViolations.push({
          field: lengthDelimited(violation, 1, (r) => r.string()) ?? "",
          description: lengthDelimited(violation, 2, (r) => r.string()) ?? "",
        });
        return true;
      });
    } else if (detail.type === RETRY_INFO) {
      const delay = lengthDelimited(detail.value, 1, (r) => r.bytes());
      if (delay !== undefined) {
        let seconds = 0;
        eachField(delay, (number, reader) => {
          if (number === 1) seconds += Number(reader.int64());
          else if (number === 2) seconds += reader.int32() / 1e9;
          else return false;
          return true;
        });
        refusal.retryAfterSeconds = seconds;
      }
    }
  }
  return refusal;
}

// gRPC's name for a code ("INVALID_ARGUMENT"), as synctoken and the Python BFF write it; Connect says "InvalidArgument".
function codeName(code) {
  return (Code[code] ?? "Unknown").replace(/(?<=[a-z])(?=[A-Z])/g, "_").toUpperCase();
}

// Request fields the app's settings fill in, never the browser: a rule broken there is the operator's to fix.
const OPERATOR_FIELDS = new Set(["sync", "sync.service_sid", "ttl", "region"]);
// The ErrorInfo reason of synctoken's rate limits: the only RESOURCE_EXHAUSTED that waiting can cure.
const RATE_LIMITED = "RATE_LIMITED";

// The Python BFF's answers (clients/bff/src/synctoken_bff/_errors.py), word for word. Only the browser's own
// mistakes (INVALID_ARGUMENT about its input) are explained to it: synctoken's other messages name callers and
// policy that are none of the browser's business.
const ANSWERS = {
  rateLimited: { status: 429, message: "too many requests; try again later" },
  // A RESOURCE_EXHAUSTED without RATE_LIMITED is gRPC refusing the request's size: waiting will not help.
  tooLarge: { status: 502, message: "the token service could not take this request" },
  badSettings: { status: 502, message: "the token service refused this server's settings", operatorFault: true },
  badInput: { status: 400, message: null },
  denied: { status: 403, message: "the token service does not allow this token" },
  unavailable: { status: 503, message: "the token service is unavailable; try again later" },
  // This app's own certificate was refused: the fault is ours, upstream, not the browser's.
  unauthenticated: { status: 502, message: "the token service refused this server's credentials" },
  other: { status: 502, message: "the token service failed" },
};

function answerFor(code, refusal) {
  switch (code) {
    case Code.InvalidArgument:
      return refusal.fieldViolations.some((v) => OPERATOR_FIELDS.has(v.field)) ? ANSWERS.badSettings : ANSWERS.badInput;
    case Code.PermissionDenied:
      return ANSWERS.denied;
    case Code.ResourceExhausted:
      return refusal.reason === RATE_LIMITED ? ANSWERS.rateLimited : ANSWERS.tooLarge;
    case Code.Unavailable:
    case Code.DeadlineExceeded:
      return ANSWERS.unavailable;
    case Code.Unauthenticated:
      return ANSWERS.unauthenticated;
    default:
      return ANSWERS.other;
  }
}

/**
 * How to answer a browser for a failed call, as the Python BFF does: `status`, `body`
 * ({"error": {"code", "reason", "message"}}), `retryAfter` (whole seconds for a Retry-After header, or null),
 * `operatorFault` (the app's own settings were refused: log it as an error), and `refusal` (what synctoken said,
 * for the app's log only).
 */
export function browserAnswer(error) {
  const refusal = refusalOf(error);
  const answer = answerFor(ConnectError.from(error).code, refusal);
  const retryAfter =
    refusal.retryAfterSeconds !== null && (answer.status === 429 || answer.status === 503)
      ? String(Math.max(1, Math.ceil(refusal.retryAfterSeconds)))
      : null;
  return {
    status: answer.status,
    body: { error: { code: refusal.code, reason: refusal.reason, message: answer.message ?? refusal.message } },
    retryAfter,
    operatorFault: answer.operatorFault ?? false,
    refusal,
  };
}
