// A connection that lives on another node of a KvRegistry, as lookup() returns it: the same
// call, cast, info, send and stop as a local Connection, carried over the node links.

import type { CallOptions, StopOptions } from "./connection.ts";
import type { ConnectionRef } from "./registry.ts";
import { Kind } from "./_link_codec.ts";
import type { NodeLinks } from "./_node_link.ts";
import { timeoutOption } from "./_options.ts";

/** A handle on a connection of another node. */
export class RemoteConnection implements ConnectionRef {
  /** The connection's id. */
  readonly id: string;
  /** Its registered name when it was looked up, if any. */
  readonly name: string | undefined;
  /** The node it lives on. */
  readonly node: string;
  readonly #links: NodeLinks;

  constructor(links: NodeLinks, id: string, name: string | undefined, node: string) {
    this.#links = links;
    this.id = id;
    this.name = name;
    this.node = node;
  }

  /**
   * A `call` event on the remote connection; rejects with its handler's error, `TimeoutError`
   * after `timeout` ms, `ConnectionClosed`, or `NodeDown` if its node cannot be reached.
   */
  call<R = unknown>(message: unknown, options: CallOptions = {}): Promise<R> {
    const timeout = timeoutOption("call", options, 5000);
    if (timeout instanceof Error) return Promise.reject(timeout);
    return this.#links.request(this.node, Kind.Call, this.id, message, timeout) as Promise<R>;
  }

  /** A `cast` event on the remote connection (dropped if it or its node is gone). */
  cast(message: unknown): void {
    this.#links.post(this.node, Kind.Cast, this.id, message);
  }

  /** An `info` event on the remote connection (dropped if it or its node is gone). */
  info(message: unknown): void {
    this.#links.post(this.node, Kind.Info, this.id, message);
  }

  /** Write `data` to the remote connection's socket (dropped if it or its node is gone). */
  send(data: unknown): void {
    this.#links.post(this.node, Kind.Send, this.id, data);
  }

  /** Stop the remote connection; resolves once it has closed, rejects with `NodeDown`. */
  stop(reason: unknown = "normal", options: StopOptions = {}): Promise<void> {
    const timeout = timeoutOption("stop", options, undefined);
    if (timeout instanceof Error) return Promise.reject(timeout);
    return this.#links.request(this.node, Kind.Stop, this.id, reason, timeout ?? NaN).then(
      () => {},
    );
  }
}
