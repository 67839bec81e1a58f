// The check of `setOptions` (actions.ts), shared with the driver, which checks what a handler
// yields even when it was not made by `setOptions`.

/** What is wrong with socket `options`, if anything: an unknown option or a non-boolean value. */
export function socketOptionsProblem(options: unknown): string | undefined {
  if (typeof options !== "object" || options === null) {
    return "options must be an object such as { noDelay: true }";
  }
  for (const [key, value] of Object.entries(options)) {
    if (key !== "noDelay" && key !== "keepAlive") {
      return `unknown option ${JSON.stringify(key)}: Deno can change noDelay and keepAlive only`;
    }
    if (value !== undefined && typeof value !== "boolean") {
      return `${key} must be a boolean, not ${typeof value}`;
    }
  }
  return undefined;
}
