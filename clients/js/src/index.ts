/**
 * @pgrelay/client: the core. No dependencies; see README.md.
 */
export {
  createRelay,
  RelayClient,
  UnauthorizedError,
  browserPage,
  matchesType,
  type Relay,
  type RelayOptions,
  type EventHandlers,
  type PageEvents,
  type PageInput,
  type Timers,
  type WebSocketClass,
  type WebSocketLike,
} from "./client.js";
export {
  Machine,
  mergeOptions,
  TIMING,
  tokenSubject,
  type Action,
  type Clock,
  type ConnectionState,
  type Input,
  type OrgState,
  type OrgStatus,
  type Status,
  type SubOptions,
  type Timing,
  type TokenResult,
} from "./machine.js";
export { CLOSE_CODES, DEFAULT_CLOSE_RULE, closeRule, type CloseRule } from "./closecodes.js";
export { memoryStorage, safeStorage, type CursorStorage } from "./storage.js";
export * from "./protocol.js";
