// CopilotKit's runtime in front of an app traced by ambient-tracing: the runtime proxies AG-UI runs
// to the upstream app (an HttpAgent), and the app's CUSTOM "ambient:trace_id" event reaches the
// runtime's clients unchanged. No LLM adapter or API key: the upstream app is the agent.
//
//   COPILOTKIT_TELEMETRY_DISABLED=true node runtime.mjs http://127.0.0.1:8000/agent [port]
//
// Prints one JSON line {"url": ...} once listening; runs go to POST <url>/agent/weather/run.
import http from "node:http";

import { HttpAgent } from "@ag-ui/client"; // the runtime's own copy
import { CopilotRuntime } from "@copilotkit/runtime/v2";
import { createCopilotNodeListener } from "@copilotkit/runtime/v2/node";

const [upstream, port = "0"] = process.argv.slice(2);
if (!upstream) {
  console.error("usage: node runtime.mjs <upstream AG-UI url> [port]");
  process.exit(2);
}

const basePath = "/api/copilotkit";
const runtime = new CopilotRuntime({ agents: { weather: new HttpAgent({ url: upstream }) } });
const server = http.createServer(createCopilotNodeListener({ runtime, basePath, cors: true }));
server.listen(Number(port), "127.0.0.1", () => {
  console.log(JSON.stringify({ url: `http://127.0.0.1:${server.address().port}${basePath}` }));
});
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => server.close(() => process.exit(0)));
