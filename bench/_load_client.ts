// bench/load.c compiled with `cc -O2` into a temporary directory, plain or with OpenSSL
// (`-DETCP_TLS`), for bench/run.ts, bench/interleaved.ts and bench/workers.ts. The directory
// goes at exit (also on Deno.exit: the signal handlers of _children.ts), or with
// removeLoadClients().

import { killAll } from "./_children.ts";

const BENCH = new URL(".", import.meta.url).pathname;
let tempDir: string | undefined;

/** The built client's path, or why it could not be built. */
export async function compileLoadClient(tls: boolean): Promise<{ bin: string } | { why: string }> {
  try {
    tempDir ??= await Deno.makeTempDir({ prefix: "etcp-bench-" });
    const bin = `${tempDir}/etcp-load${tls ? "-tls" : ""}`;
    const args = tls
      ? ["-O2", "-DETCP_TLS", "-o", bin, `${BENCH}load.c`, "-lssl", "-lcrypto"]
      : ["-O2", "-o", bin, `${BENCH}load.c`];
    const out = await new Deno.Command("cc", {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (out.success) return { bin };
    return {
      why: `cc ${tls ? "with OpenSSL " : ""}failed (exit code ${out.code}):\n${
        new TextDecoder().decode(out.stderr).trim()
      }`,
    };
  } catch (e) {
    return { why: e instanceof Deno.errors.NotFound ? "no cc found" : `cc: ${e}` };
  }
}

/** Remove the built clients. */
export function removeLoadClients(): void {
  if (!tempDir) return;
  try {
    Deno.removeSync(tempDir, { recursive: true });
  } catch { /* already gone */ }
  tempDir = undefined;
}
globalThis.addEventListener("unload", removeLoadClients);

/**
 * Run a load benchmark's `main` to its end: an error is one line on stderr and exit code 1, as
 * is a `main` that returns false; the servers it started are killed and the clients it built
 * removed either way.
 */
export async function runLoadBenchmark(main: () => Promise<boolean | void>): Promise<void> {
  try {
    if (await main() === false) Deno.exitCode = 1;
  } catch (e) {
    console.error(e instanceof Error ? e.message : e);
    Deno.exitCode = 1;
  } finally {
    killAll();
    removeLoadClients();
  }
}
