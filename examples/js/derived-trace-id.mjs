// Know a run's trace id before it starts: with AMBIENT_TRACE_ID_FROM_RUN_ID=true (or
// Observability(trace_id_from_run_id=True)) the server derives the id from the run's runId, so the
// client computes the same id itself (traceIdFromRunId below works in browsers and Node >= 20).
//
//   node derived-trace-id.mjs http://127.0.0.1:8000 [threadId]
//
// Two runs (a UUID runId, then another runId); per run it prints the id computed before the run, the
// one announced in the stream (CUSTOM "ambient:trace_id"), the response's `traceresponse` header, and
// RUN_FINISHED.result.traceId (with AMBIENT_RESULT_TRACE_ID=true). One JSON line.
import { HttpAgent } from "@ag-ui/client";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

// The rule (ambient_tracing.ids.trace_id_from_run_id): a UUID runId (8-4-4-4-12 hex, any case, not
// the nil UUID) is its 32 hex digits in lower case; any other runId is the first 16 bytes of the
// SHA-256 of its UTF-8 bytes, in lower-case hex.
export async function traceIdFromRunId(runId) {
  if (UUID.test(runId)) {
    const hex = runId.replaceAll("-", "").toLowerCase();
    if (hex !== "0".repeat(32)) return hex;
  }
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(runId));
  return [...new Uint8Array(digest).slice(0, 16)].map((byte) => byte.toString(16).padStart(2, "0")).join("");
}

const [baseUrl, threadId = "thread-js-derived"] = process.argv.slice(2);
if (!baseUrl) {
  console.error("usage: node derived-trace-id.mjs <base url> [threadId]");
  process.exit(2);
}

// The response headers (a browser reads `traceresponse` only when the server's CORS policy lists it
// in Access-Control-Expose-Headers).
let lastTraceResponse = null;
const plainFetch = globalThis.fetch;
globalThis.fetch = async (...args) => {
  const response = await plainFetch(...args);
  lastTraceResponse = response.headers.get("traceresponse");
  return response;
};

const agent = new HttpAgent({ url: `${baseUrl}/agent`, threadId });
let current = null;
agent.subscribe({
  onCustomEvent: ({ event }) => {
    if (event.name === "ambient:trace_id") current.announced = event.value.traceId;
  },
  onEvent: ({ event }) => {
    if (event.type === "RUN_FINISHED") current.resultTraceId = event.result?.traceId ?? null;
  },
});

const report = { runs: [] };
for (const runId of [crypto.randomUUID(), `${threadId}-run-2`]) {
  current = { runId, computed: await traceIdFromRunId(runId) }; // before the run
  agent.addMessage({ id: `${runId}-user`, role: "user", content: "What is the weather in Paris?" });
  await agent.runAgent({ runId });
  current.traceresponse = lastTraceResponse;
  report.runs.push(current);
}
console.log(JSON.stringify(report));
