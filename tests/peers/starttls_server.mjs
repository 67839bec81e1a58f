// A STARTTLS line server for the tests, in Node: a third-party peer for the library's client:
// `node starttls_server.mjs CERT KEY` prints its port. Before "STARTTLS" each line L is answered
// "plain:L"; "STARTTLS" is answered "GO" and the socket switches to TLS (ALPN "etcp/1"); after
// that each line L is answered "tls:L alpn:P". With "STARTTLS-EXTRA", "GO" comes with one more
// line in the same write: bytes past the switch point.
import fs from "node:fs";
import net from "node:net";
import tls from "node:tls";

const [certFile, keyFile] = process.argv.slice(2);
const cert = fs.readFileSync(certFile);
const key = fs.readFileSync(keyFile);

function lines(onLine) {
  let held = "";
  return (chunk) => {
    held += chunk.toString("utf8");
    for (let nl; (nl = held.indexOf("\n")) >= 0;) {
      const line = held.slice(0, nl);
      held = held.slice(nl + 1);
      if (onLine(line) === false) return;
    }
  };
}

const server = net.createServer((socket) => {
  socket.on("error", () => {});
  const plain = lines((line) => {
    if (line === "STARTTLS-EXTRA") {
      socket.write("GO\nEXTRA\n");
      return;
    }
    if (line !== "STARTTLS") {
      socket.write(`plain:${line}\n`);
      return;
    }
    socket.removeListener("data", plain);
    socket.pause();
    socket.write("GO\n");
    const secure = new tls.TLSSocket(socket, {
      isServer: true,
      cert,
      key,
      ALPNProtocols: ["etcp/1"],
    });
    secure.on("error", () => socket.destroy());
    secure.on("data", lines((l) => void secure.write(`tls:${l} alpn:${secure.alpnProtocol}\n`)));
    return false;
  });
  socket.on("data", plain);
});
server.listen(0, "127.0.0.1", () => console.log(server.address().port));
process.stdin.on("end", () => process.exit(0)); // the test closes stdin to stop it
process.stdin.resume();
