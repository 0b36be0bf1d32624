/**
 * @pgrelay/client: the core. No dependencies; see README.md.
 * Tab sharing (`/tabs`), invalidation (`/invalidate`) and the React, TanStack
 * Query and SWR bindings are entry points of their own, outside the size budget.
 */
export {
  createRelay,
  RelayClient,
  UnauthorizedError,
  browserPage,
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
  TIMING,
  type Action,
  type Clock,
  type ConnectionState,
  type Input,
  type MachineConfig,
  type OrgState,
  type OrgStatus,
  type Status,
  type SubOptions,
  type Timing,
  type TokenResult,
} from "./machine.js";
export { CLOSE_CODES, type CloseRule } from "./closecodes.js";
export { memoryStorage, safeStorage, type CursorStorage } from "./storage.js";
export type * from "./protocol.js";
