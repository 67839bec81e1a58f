// What the examples share about their command lines: parsing the flags, the parse result, and
// turning help or a bad command line into output and an exit status, failures into one line;
// also the integer flags' parser and the silent logger the clients share.

import { parseArgs, type ParseArgsOptionsConfig } from "node:util";

/** Parsed command line: settings to run with, a request for help, or what is wrong with it. */
export type Parsed<T> = { kind: "run"; args: T } | { kind: "help" } | {
  kind: "usage";
  error: string;
};

/** The values of the flags `options` describes, as `parseArgs` gives them. */
export type FlagValues<O extends ParseArgsOptionsConfig> = ReturnType<
  typeof parseArgs<{ args: string[]; options: O }>
>["values"];

/**
 * `argv` parsed against `options` and `-h`/`--help`; never throws. The flags' values, or, for
 * `--help` or a command line `parseArgs` refuses (unknown flag, missing value, …), the
 * {@linkcode Parsed} that says so.
 */
export function parseFlags<O extends ParseArgsOptionsConfig>(
  argv: string[],
  options: O,
): { kind: "flags"; values: FlagValues<O> } | Exclude<Parsed<never>, { kind: "run" }> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: { ...options, help: { type: "boolean", short: "h", default: false } },
    }));
  } catch (err) {
    // parseArgs's own errors: the first line says it.
    return { kind: "usage", error: String((err as Error).message).split("\n", 1)[0] };
  }
  if ((values as { help?: boolean }).help) return { kind: "help" };
  return { kind: "flags", values: values as FlagValues<O> };
}

/**
 * The settings to run with, or the exit status after printing the usage: 0 for `--help` (to
 * stdout), 2 for a bad command line (to stderr, after what is wrong).
 */
export function argsOrStatus<T>(name: string, parsed: Parsed<T>, usage: string): T | number {
  if (parsed.kind === "help") {
    console.log(usage);
    return 0;
  }
  if (parsed.kind === "usage") {
    console.error(`${name}: ${parsed.error}\n\n${usage}`);
    return 2;
  }
  return parsed.args;
}

/** An error as one line: `Name: message` (no name for a plain `Error`). */
export function oneLine(err: unknown): string {
  const text = err instanceof Error
    ? (err.name === "Error" ? "" : `${err.name}: `) + err.message
    : String(err);
  return text.replace(/\s*\n\s*/g, " ");
}

/** `text` as a decimal integer in `[min, max]`, or undefined (no signs, exponents or blanks). */
export function integer(
  text: string,
  min: number,
  max = Number.MAX_SAFE_INTEGER,
): number | undefined {
  if (!/^\d{1,15}$/.test(text)) return undefined;
  const n = Number(text);
  return n >= min && n <= max ? n : undefined;
}

/** A logger that logs nothing (error, warn and debug all ignored). */
export const QUIET = { error() {}, warn() {}, debug() {} };
