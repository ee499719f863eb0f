"""A stdlib web server on $BIND_ADDRESS:$PORT that reports its environment (or, on /headers,
the request headers) as JSON."""
import json
import os
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        # /headers shows what a proxy in front of us sent; anything else shows the environment.
        data = dict(self.headers) if self.path == "/headers" else dict(os.environ)
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        print("request", self.path, flush=True)


HTTPServer((os.environ["BIND_ADDRESS"], int(os.environ["PORT"])), Handler).serve_forever()
