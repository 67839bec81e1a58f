// The echo server of bench/busy_sockets.ts --variant etcp-worker, run in a Worker: its own
// thread, so its sockets and the clients' do not share one op driver. Posts its port once
// listening; any message back stops it.
import { type Event, type HandlerGenerator, lengthPrefixed, send, serve } from "../mod.ts";

const server = await serve(async function* (): HandlerGenerator<Uint8Array> {
  let ev: Event<Uint8Array> = yield;
  while (ev.type === "packet") ev = yield send(ev.data);
}, { hostname: "127.0.0.1", port: 0, framing: lengthPrefixed(4), maxConnections: Infinity });
const scope = self as unknown as {
  postMessage(message: unknown): void;
  onmessage: (() => void) | null;
  close(): void;
};
scope.onmessage = async () => {
  await server.stop("normal", { timeout: 1000 });
  scope.postMessage("stopped");
  scope.close();
};
scope.postMessage(server.addr.port);
