/** The browser bundle `pgrelay dev` serves: the core, tab sharing and invalidation. */
export * from "./index.js";
export { createSharedRelay, type SharedRelay, type SharedStatus } from "./tabs.js";
export { createInvalidator, router, type Invalidator, type QueryKey } from "./invalidate.js";
