// What the examples share about their command lines: the parse result, and turning help or a
// bad command line into output and an exit status, failures into one line.

/** Parsed command line: settings to run with, a request for help, or what is wrong with it. */
export type Parsed<T> = { kind: "run"; args: T } | { kind: "help" } | {
  kind: "usage";
  error: string;
};

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
