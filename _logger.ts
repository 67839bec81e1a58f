// The logger the library reports through: the user's, guarded, or console.

import type { Logger } from "./connection.ts";
import { describeReason } from "./errors.ts";

/**
 * `logger` (console if none), guarded: a logger that throws (its sink closed, say) must not break
 * what it reports on, such as a connection's end; what it could not log goes to console.error.
 */
export function loggerOf(logger: Logger | undefined): Logger {
  if (logger === undefined || logger === console) return console;
  const guarded = (level: keyof Logger) => (...data: unknown[]) => {
    try {
      logger[level](...data);
    } catch (err) {
      try {
        console.error(`etcp: the logger's ${level}() threw (${describeReason(err)}) on:`, ...data);
      } catch { /* nowhere left to say it */ }
    }
  };
  return { error: guarded("error"), warn: guarded("warn"), debug: guarded("debug") };
}
