"""An HTTP receiver on 127.0.0.1 for webhook tests (unit and integration): a stdlib server in a
thread of the test process that keeps what each POST brought."""
import http.server
import json
import threading


class Receiver:
    """`got` is a list of (path, Content-Type, JSON body) per POST; answers `status` (with
    `headers`), or (with `hang`, a threading.Event) only once hang is set."""

    def __init__(self, status=204, hang=None, headers=None):
        got = self.got = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                got.append((self.path, self.headers.get("Content-Type"),
                            json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                if hang:
                    hang.wait(60)
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/hook?token=s3cret"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
