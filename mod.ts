/**
 * etcp for Deno: TCP servers and clients in which every connection is its own logical
 * process, an async generator that yields actions (`send`, `reply`, `setTimeout`,
 * `hibernate`, `stop`, `recv`, `startTls`, `setFraming`, `closeWrite`, `setOptions`) and
 * receives events (`packet`, `call`, `cast`, `info`, `timeout`, `disconnect`, `shutdown`,
 * `upgrade`).
 *
 * @example An echo server
 * ```ts
 * import { lengthPrefixed, send, serve, setTimeout } from "./mod.ts";
 *
 * const server = await serve(async function* () {
 *   let ev = yield setTimeout(30_000);
 *   for (;;) {
 *     switch (ev.type) {
 *       case "packet":
 *         ev = yield [send(ev.data), setTimeout(30_000)];
 *         break;
 *       case "timeout":
 *       case "disconnect":
 *       case "shutdown":
 *         return;
 *       default:
 *         ev = yield;
 *     }
 *   }
 * }, { port: 0, framing: lengthPrefixed(4) });
 * await server.stop();
 * ```
 *
 * @module
 */

export {
  closeWrite,
  hibernate,
  recv,
  reply,
  send,
  setFraming,
  setOptions,
  setTimeout,
  startTls,
  stop,
} from "./actions.ts";
export type {
  Action,
  CallEvent,
  CastEvent,
  CloseWriteAction,
  DisconnectEvent,
  Event,
  FrameErrorEvent,
  FrameOf,
  From,
  Handler,
  HandlerGenerator,
  HibernateAction,
  InfoEvent,
  PacketEvent,
  RecvAction,
  RecvTimeoutEvent,
  ReplyAction,
  SendAction,
  SetFramingAction,
  SetOptionsAction,
  SetTimeoutAction,
  ShutdownEvent,
  SocketOptions,
  StartTlsAction,
  StartTlsOptions,
  StopAction,
  TimeoutEvent,
  UpgradeEvent,
  Yielded,
} from "./actions.ts";
export { Connection } from "./connection.ts";
export type {
  CallOptions,
  CodeChange,
  ConnectionState,
  ConnectionStats,
  HandlerStatus,
  Logger,
  Mode,
  SendSyncOptions,
  StopOptions,
  TraceEntry,
  TraceKind,
  TraceOption,
  WhenUpOptions,
} from "./connection.ts";
export {
  BufferFull,
  ConnectionClosed,
  ConnectionDown,
  FrameTooLarge,
  MalformedFrame,
  NameTaken,
  NodeDown,
  ProtocolError,
  RegistryUnavailable,
  TimeoutError,
} from "./errors.ts";
export { decodeFrames, encodeFrames, lengthPrefixed, lines, raw } from "./framing.ts";
export { batch } from "./batch.ts";
export type {
  BytesLike,
  Decoder,
  FrameWriter,
  Framing,
  FramingFor,
  LendOptions,
  LengthPrefixedOptions,
  LinesOptions,
} from "./framing.ts";
export { resp, RespError, RespPush, RespSimpleString } from "./resp.ts";
export type { RespOptions, RespValue } from "./resp.ts";
export { defaultRegistry, MemoryRegistry } from "./registry.ts";
export type { ConnectionRef, ListFilter, Registry, RegistryEntry } from "./registry.ts";
export { KvRegistry } from "./kv_registry.ts";
export type { KvRegistryLinkOptions, KvRegistryOptions } from "./kv_registry.ts";
export { serveWorkers, workerContext } from "./workers.ts";
export type {
  ServeWorkersOptions,
  WorkerContext,
  WorkerGroup,
  WorkerInfo,
  WorkerRegistryOptions,
  WorkerServeOptions,
  WorkerState,
} from "./workers.ts";
export { serve, Server } from "./server.ts";
export type {
  AcceptorInfo,
  ConnectionAlarm,
  CountComparison,
  ServeOptions,
  ServerSettings,
  ServerStats,
  ServerStatus,
  SuspendOptions,
  UpgradeOptions,
  WaitForConnectionsOptions,
} from "./server.ts";
export { connect } from "./client.ts";
export type { ConnectOptions, ReconnectOptions } from "./client.ts";
export { createPool, Pool, PoolUnavailable } from "./pool.ts";
export type {
  CheckoutOptions,
  PoolAddress,
  PoolAddressStats,
  PoolCallOptions,
  PoolConnectionState,
  PoolExit,
  PoolExitDecision,
  PoolOptions,
  PoolStats,
  PoolStopOptions,
  PoolStrategy,
  PoolUnavailableReason,
} from "./pool.ts";
export { Observer, serveObserver } from "./observer.ts";
export type {
  ObservedConnection,
  ObservedConnectionDetail,
  ObserverOptions,
  ObserverOverview,
  ObserverTarget,
} from "./observer.ts";
export { tcp } from "./transport/tcp.ts";
export type { TcpOptions } from "./transport/tcp.ts";
export { memory } from "./transport/memory.ts";
export type { MemoryOptions } from "./transport/memory.ts";
export { tls, TlsConfigError, TlsHandshakeError, upgradeTls } from "./transport/tls.ts";
export type {
  TlsConn,
  TlsHandshakeFailure,
  TlsKeyPair,
  TlsOptions,
  TlsPeerCertificate,
  TlsUpgradeOptions,
} from "./transport/tls.ts";
export { unix, UnixPathTooLong } from "./transport/unix.ts";
export {
  encodeProxyHeader,
  parseProxyHeader,
  ProxyHeaderError,
  readProxyHeader,
  withProxyProtocol,
} from "./transport/proxy.ts";
export type {
  ParsedProxyHeader,
  ProxyHeaderErrorKind,
  ProxyHeaderInit,
  ReadProxyHeaderOptions,
} from "./transport/proxy.ts";
export type {
  Addr,
  Conn,
  ConnectOptions as TransportConnectOptions,
  Listener,
  ListenOptions,
  MemoryAddr,
  ProxyHeader,
  Transport,
} from "./transport/transport.ts";
