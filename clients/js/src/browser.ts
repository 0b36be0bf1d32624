/** The browser bundle `pgrelay dev` serves: the core, tab sharing and invalidation. */
export * from "./index.js";
