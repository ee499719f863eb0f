// A web: process on $BIND_ADDRESS:$PORT using one package from node_modules.
const http = require("http");
const ms = require("ms");

const firstOnPath = (process.env.PATH || "").split(":")[0];
http.createServer((req, res) => {
  res.writeHead(200, { "Content-Type": "text/plain" });
  res.end(`node-web v1 ms=${ms(172800000)} node=${process.version} path0=${firstOnPath}\n`);
}).listen(Number(process.env.PORT), process.env.BIND_ADDRESS);
