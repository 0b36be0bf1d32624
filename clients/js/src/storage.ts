/**
 * Where cursors are kept: the Web Storage API's shape, so `localStorage`
 * itself fits. `safeStorage` uses localStorage when it works and memory when
 * it throws (Safari private mode throws on write; with cookies blocked,
 * merely reading `window.localStorage` throws).
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

/**
 * `primary` (default: localStorage) if a write to it works, else memory. The
 * client also switches to memory for good if a later write throws (quota).
 */
export function safeStorage(primary?: () => CursorStorage): CursorStorage {
  try {
    const s = primary ? primary() : localStorage;
    s.setItem(PROBE, "1");
    s.removeItem(PROBE);
    return s;
  } catch {
    return memoryStorage();
  }
}
const PROBE = "pgrelay|probe";

/** Remove every key that starts with `prefix`. */
export function clearPrefix(s: CursorStorage, prefix: string): void {
  const keys: string[] = [];
  for (let i = 0; i < s.length; i++) {
    const k = s.key(i);
    if (k !== null && k.startsWith(prefix)) keys.push(k);
  }
  for (const k of keys) s.removeItem(k);
}
