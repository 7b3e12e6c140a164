// The official AG-UI client (@ag-ui/client HttpAgent) against an app behind TracingMiddleware:
// each run's trace id comes in the stream as CUSTOM "ambient:trace_id"; a thumbs up/down is POSTed
// to the middleware's feedback endpoint with that id, so it lands on the run it rates.
//
//   node trace-and-rate.mjs http://127.0.0.1:8000 [threadId] [runs]
//
// Runs go to <base url>/agent, or to AGENT_URL when set (e.g. a CopilotKit runtime in front of the
// app); ratings always go to the app's own <base url>/feedback.
// Prints one JSON line: per run the trace ids seen by onCustomEvent and the event types, then the
// feedback answers. Exits non-zero when the client rejects the stream (its own event verification).
import { HttpAgent } from "@ag-ui/client";

const [baseUrl, threadId = "thread-js", runs = "2"] = process.argv.slice(2);
if (!baseUrl) {
  console.error("usage: node trace-and-rate.mjs <base url> [threadId] [runs]");
  process.exit(2);
}

const agent = new HttpAgent({
  url: process.env.AGENT_URL ?? `${baseUrl}/agent`,
  threadId,
  headers: { "x-current-user-id": "ana" },
});

// The README's snippet: remember the latest trace id, whichever run it came from.
let lastTraceId = null;
let currentRun = null;
agent.subscribe({
  onCustomEvent: ({ event }) => {
    if (event.name === "ambient:trace_id") {
      lastTraceId = event.value.traceId;
      currentRun.traceIds.push(event.value.traceId);
    }
  },
  onEvent: ({ event }) => {
    currentRun.types.push(event.type);
  },
});

const report = { runs: [], feedback: [] };
for (let index = 0; index < Number(runs); index++) {
  currentRun = { runId: `${threadId}-run-${index + 1}`, traceIds: [], types: [] };
  agent.addMessage({ id: `${currentRun.runId}-user`, role: "user", content: "What is the weather in Paris?" });
  const result = await agent.runAgent({ runId: currentRun.runId });
  currentRun.newMessages = result.newMessages.map((message) => message.role);
  currentRun.lastTraceId = lastTraceId;
  report.runs.push(currentRun);
}

// The origin runner's META body. Thumbs up on the first run, naming its trace; thumbs down on the
// latest without a traceId: the server falls back to the thread's last trace. The rater is who the
// request identifies (the same user header as the runs), not payload.userId.
async function rate(metaType, payload) {
  const response = await fetch(`${baseUrl}/feedback`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-current-user-id": "ana" },
    body: JSON.stringify({ type: "META", metaType, threadId, payload: { userId: "ana", ...payload } }),
  });
  return { status: response.status, body: await response.json() };
}
const [first] = report.runs;
report.feedback.push(
  await rate("thumbs_up", { messageId: `${first.runId}-answer`, comment: "spot on", traceId: first.traceIds[0] }),
);
report.feedback.push(await rate("thumbs_down", { messageId: "latest-answer", comment: "wrong city" }));
console.log(JSON.stringify(report));
