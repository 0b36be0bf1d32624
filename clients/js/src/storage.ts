/**
 * Where cursors are kept: the Web Storage API's shape, so `localStorage`
 * itself fits. `safeStorage` uses localStorage when it works and falls back to
 * memory for good the first time it throws (Safari private mode throws on
 * write; some browsers throw on merely reading `window.localStorage`).
 */
export interface CursorStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
  readonly length: number;
  key(index: number): string | null;
}

export function memoryStorage(): CursorStorage {
  const m = new Map<string, string>();
  return {
    getItem: (k) => m.get(k) ?? null,
    setItem: (k, v) => void m.set(k, String(v)),
    removeItem: (k) => void m.delete(k),
    get length() {
      return m.size;
    },
    key: (i) => [...m.keys()][i] ?? null,
  };
}

/** `primary` (default: localStorage) until it throws, then memory. */
export function safeStorage(primary?: () => CursorStorage | undefined): CursorStorage {
  const memory = memoryStorage();
  let store: CursorStorage = memory;
  try {
    store = (primary ? primary() : globalThis.localStorage) ?? memory;
  } catch {
    // reading window.localStorage itself threw
  }
  const guard =
    <A extends unknown[], R>(f: (s: CursorStorage, ...a: A) => R) =>
    (...a: A): R => {
      try {
        return f(store, ...a);
      } catch {
        store = memory;
        return f(store, ...a);
      }
    };
  return {
    getItem: guard((s, k: string) => s.getItem(k)),
    setItem: guard((s, k: string, v: string) => s.setItem(k, v)),
    removeItem: guard((s, k: string) => s.removeItem(k)),
    get length() {
      return guard((s) => s.length)();
    },
    key: guard((s, i: number) => s.key(i)),
  };
}

/** Remove every key that starts with `prefix`. */
export function clearPrefix(s: CursorStorage, prefix: string): void {
  const keys: string[] = [];
  for (let i = 0; i < s.length; i++) {
    const k = s.key(i);
    if (k !== null && k.startsWith(prefix)) keys.push(k);
  }
  for (const k of keys) s.removeItem(k);
}
