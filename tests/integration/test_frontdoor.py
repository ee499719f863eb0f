"""Issue 12, the front door, through the real nginx of the test suite with real TLS: the default
server, body size, include files, gzip, HTTP/2, maintenance mode, basic auth, allow list, socket
permissions, redirects and per-app nginx logs."""
import gzip
import http.client
import json
import os
import pwd
import socket
import ssl
import subprocess
import threading
import time

import pytest

from harness import SYSTEM_PY, USER, need
from test_nginx import plain_get

HOST = "front.piku.test"
WWW = "www." + HOST
MB = 1024 * 1024
APP_PY = '''import os

PAGE = ("<!doctype html><title>front</title>" + "<p>the front door of {v}</p>" * 200).encode()


def application(environ, start_response):
    if environ["PATH_INFO"] == "/upload":
        received, body = 0, environ["wsgi.input"]
        while True:
            chunk = body.read(1 << 20)
            if not chunk:
                break
            received += len(chunk)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"received {received}".encode()]
    start_response("200 OK", [("Content-Type", "text/html")])
    return [PAGE]
'''
# A release command that asks nginx for the app's page while it runs (PIKU_MAINTENANCE_DURING_RELEASE)
PROBE_PY = '''import os, urllib.error, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{os.environ['NGINX_HTTP_PORT']}/", headers={"Host": os.environ["PROBE_HOST"]})
try:
    status = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5).status
except urllib.error.HTTPError as e:
    status = e.code
with open(os.path.join(os.environ["DATA_ROOT"], "during-release.txt"), "w") as f:
    f.write(str(status))
'''


def files(server, version, **settings):
    env = server.nginx_env(f"{HOST}, {WWW}", **settings)
    return {"Procfile": "wsgi: app:application\n", "requirements.txt": "", "ENV": env,
            "app.py": APP_PY.replace("{v}", version), "maint.html": "<h1>planned maintenance</h1>\n"}


@pytest.fixture(scope="module")
def front(server, tmp_path_factory):
    repo = server.deployed(None, "front", tmp_path_factory.mktemp("front"), files(server, "v1"))
    server.wait_http(server.nginx_port, host=HOST, contains="front door of v1")
    return repo


def config(server, *args):
    r = server.ssh(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def request(server, host, path="/", method="GET", body=None, headers=None, source="127.0.0.1", port=None):
    """(status, headers, body bytes) of one request through the test nginx over HTTP, from the
    `source` address, once nginx serves what nginx/ holds."""
    server.nginx_settled()
    sock = socket.create_connection(("127.0.0.1", port or server.nginx_port), timeout=30, source_address=(source, 0))
    conn = http.client.HTTPConnection("127.0.0.1", port or server.nginx_port, timeout=30)
    conn.sock = sock
    conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def tls(server, sni, path="/", host=None):
    """(status, headers, body) over HTTPS with this SNI (None: none), certificate not verified."""
    server.nginx_settled()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", server.nginx_tls_port, context=ctx, timeout=10)
    sock = socket.create_connection(("127.0.0.1", server.nginx_tls_port), timeout=10)
    conn.sock = ctx.wrap_socket(sock, server_hostname=sni)
    conn.request("GET", path, headers={"Host": host or sni or "127.0.0.1"})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def upload(server, size):
    """POST `size` bytes to /upload; the status, and the body (nginx may refuse before it read all)."""
    server.nginx_settled()
    conn = http.client.HTTPConnection("127.0.0.1", server.nginx_port, timeout=60)
    conn.putrequest("POST", "/upload", skip_host=True)
    for k, v in (("Host", HOST), ("Content-Length", str(size)), ("Content-Type", "application/octet-stream")):
        conn.putheader(k, v)
    conn.endheaders()
    chunk = b"x" * MB
    try:
        for _ in range(size // MB):
            conn.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # nginx answered (413) and closed while the body was still coming
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


def test_unknown_names_get_the_default_server(server, front):
    status, _, body = request(server, "unknown.piku.test")
    assert status == 404 and b"front door" not in body
    for sni in ("other.example", None):  # a random name, or none (the bare IP): no handshake at all
        with pytest.raises(ssl.SSLError):
            tls(server, sni)
    status, _, body = tls(server, HOST)
    assert status == 200 and b"front door of v1" in body
    default = server.read("nginx/_default.conf")
    assert f"listen 127.0.0.1:{server.nginx_port} default_server;" in default
    assert f"listen 127.0.0.1:{server.nginx_tls_port} ssl http2 default_server;" in default
    assert "ssl_reject_handshake on;" in default


def test_default_server_follows_the_addresses_apps_listen_on(server, front):
    from harness import free_port
    port = free_port()
    config(server, "config:set", "front", f"NGINX_HTTP_PORT={port}")
    try:
        assert f"listen 127.0.0.1:{port} default_server;" in server.read("nginx/_default.conf")
        assert request(server, HOST, port=port)[0] == 200
        assert request(server, "unknown.piku.test", port=port)[0] == 404
    finally:
        config(server, "config:unset", "front", "NGINX_HTTP_PORT")
    assert f":{port} " not in server.read("nginx/_default.conf")
    assert request(server, HOST)[0] == 200


def test_upload_limit_is_a_setting(server, front):
    assert upload(server, 100 * MB)[0] == 413
    config(server, "config:set", "front", "NGINX_CLIENT_MAX_BODY_SIZE=200m")
    try:
        assert upload(server, 100 * MB) == (200, f"received {100 * MB}")
    finally:
        config(server, "config:unset", "front", "NGINX_CLIENT_MAX_BODY_SIZE")
    assert upload(server, 100 * MB)[0] == 413


def test_an_include_file_that_sets_a_piku_directive_wins(server, front):
    extra = "client_max_body_size 200m;\ngzip off;\nadd_header X-Front-Include yes;\n"
    server.commit(front, "include", {"extra.conf": extra, "ENV": server.nginx_env(
        f"{HOST}, {WWW}", NGINX_INCLUDE_FILE="extra.conf")})
    r = server.push(front, "front")
    assert r.returncode == 0 and "duplicate" not in r.stdout, r.stdout
    try:
        conf = server.read("nginx/front.conf")
        assert "client_max_body_size" not in conf and "  gzip on;" not in conf
        assert upload(server, 100 * MB) == (200, f"received {100 * MB}")
        status, headers, _ = request(server, HOST, headers={"Accept-Encoding": "gzip"})
        assert status == 200 and headers.get("x-front-include") == "yes" and "content-encoding" not in headers
    finally:
        server.commit(front, "no include", {"extra.conf": None, "ENV": files(server, "v1")["ENV"]})
        assert server.push(front, "front").returncode == 0
    assert upload(server, 100 * MB)[0] == 413


def test_gzip_on_by_default(server, front):
    status, headers, body = request(server, HOST, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("content-encoding") == "gzip"
    assert b"front door of v1" in gzip.decompress(body) and len(body) < len(gzip.decompress(body))
    assert "content-encoding" not in request(server, HOST)[1]  # only for clients that ask
    config(server, "config:set", "front", "NGINX_GZIP=false")
    try:
        assert "content-encoding" not in request(server, HOST, headers={"Accept-Encoding": "gzip"})[1]
    finally:
        config(server, "config:unset", "front", "NGINX_GZIP")


def test_http2_over_tls(server, front):
    curl = need("curl")
    features = json.loads(server.read("state/_nginx.json"))["features"]
    want = "2" if features["http2"] else "1.1"  # nginx without the module: HTTP/1.1, never broken
    server.nginx_settled()
    r = subprocess.run([curl, "-sk", "--http2", "--resolve", f"{HOST}:{server.nginx_tls_port}:127.0.0.1",
                        "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                        f"https://{HOST}:{server.nginx_tls_port}/"], capture_output=True, text=True, timeout=30)
    assert r.stdout == f"{want} 200", r.stdout + r.stderr
    assert features["http2"], "this nginx was expected to have the HTTP/2 module (Debian's has)"


class Traffic:
    """Requests in a loop while a test changes things: every answer's status."""

    def __init__(self, server):
        self.server, self.seen, self.stop = server, [], threading.Event()
        self.thread = threading.Thread(target=self.loop)

    def loop(self):
        while not self.stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.server.nginx_port, timeout=10)
                conn.request("GET", "/", headers={"Host": HOST})
                resp = conn.getresponse()
                self.seen.append((resp.status, resp.getheader("Retry-After"), resp.read()))
            except OSError as e:
                self.seen.append((None, None, str(e).encode()))
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def acme_file(server, app, name, text):
    d = server.path("acme", app, ".well-known", "acme-challenge")
    r = server.as_user(["mkdir", "-p", d])  # (the piku user writes its own probes there too)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(d, name), "w") as f:
        f.write(text)
    os.chmod(os.path.join(d, name), 0o644)


def test_maintenance_with_live_traffic_and_across_a_deploy(server, front):
    acme_file(server, "front", "tok", "challenge ok")
    with Traffic(server) as traffic:
        out = config(server, "maintenance:on", "front")
        assert "front is in maintenance mode" in out, out
        status, headers, body = request(server, HOST)  # in effect when the command returns
        assert status == 503 and headers["retry-after"] == "120" and b"Down for maintenance" in body
        status, _, body = request(server, HOST, "/.well-known/acme-challenge/tok")
        assert (status, body) == (200, b"challenge ok")
        assert "maintenance: on since" in config(server, "ps", "front")
        assert "front (maintenance)" in config(server, "apps")
        server.commit(front, "v2", {"app.py": APP_PY.replace("{v}", "v2")})
        r = server.push(front, "front")
        assert r.returncode == 0, r.stdout
        assert request(server, HOST)[0] == 503  # the deploy kept the flag
        out = config(server, "maintenance:off", "front")
        assert "front is served again" in out
        status, _, body = request(server, HOST)
        assert status == 200 and b"front door of v2" in body  # the new release, no push needed
    statuses = {s for s, _, _ in traffic.seen}
    assert statuses <= {200, 503}, [x for x in traffic.seen if x[0] not in (200, 503)][:3]
    assert 503 in statuses and 200 in statuses
    assert all(retry == "120" for s, retry, _ in traffic.seen if s == 503)
    assert "maintenance" not in config(server, "ps", "front")


def test_maintenance_page_from_the_repo(server, front):
    before = server.tree()
    r = server.ssh("maintenance:on", "front", "--page", "../../../etc/passwd")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--page" in r.stderr, r.stderr
    r = server.ssh("maintenance:on", "front", "--page", "missing.html")
    assert r.returncode != 0 and "not a file of front's repository" in r.stderr, r.stderr
    assert server.tree() == before
    config(server, "maintenance:on", "front", "--page", "maint.html")
    try:
        status, headers, body = request(server, HOST)
        assert (status, body) == (503, b"<h1>planned maintenance</h1>\n") and headers["retry-after"] == "120"
        assert "page maint.html" in config(server, "ps", "front")
    finally:
        config(server, "maintenance:off", "front")
    assert request(server, HOST)[0] == 200
    assert "not in maintenance mode" in config(server, "maintenance:off", "front")


def test_maintenance_during_the_release_command(server, front):
    server.commit(front, "release under maintenance", {
        "probe.py": PROBE_PY, "Procfile": "wsgi: app:application\nrelease: python3 probe.py\n",
        "ENV": server.nginx_env(f"{HOST}, {WWW}", PIKU_MAINTENANCE_DURING_RELEASE="true", PROBE_HOST=HOST)})
    try:
        r = server.push(front, "front")
        assert r.returncode == 0 and "maintenance mode on while the release command runs" in r.stdout, r.stdout
        assert server.read("data/front/during-release.txt") == "503"
        assert request(server, HOST)[0] == 200 and server.read("state/front/maintenance.json") is None
    finally:
        server.commit(front, "no release", {"probe.py": None, "Procfile": "wsgi: app:application\n",
                                            "ENV": files(server, "v2")["ENV"]})
        assert server.push(front, "front").returncode == 0


def openssl_apr1(password):
    return subprocess.run(["openssl", "passwd", "-apr1", password], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_basic_auth(server, front):
    import base64
    acme_file(server, "front", "tok", "challenge ok")
    auth = lambda pw: {"Authorization": "Basic " + base64.b64encode(f"ann:{pw}".encode()).decode()}  # noqa
    config(server, "config:set", "front", f"NGINX_BASIC_AUTH=ann:{openssl_apr1('s3cret')}")
    try:
        status, headers, _ = request(server, HOST)
        assert status == 401 and headers["www-authenticate"] == 'Basic realm="front"'
        assert request(server, HOST, headers=auth("wrong"))[0] == 401
        assert request(server, HOST, headers=auth("s3cret"))[0] == 200
        assert request(server, HOST, "/.well-known/acme-challenge/tok")[0] == 200
        assert oct(os.stat(server.path("nginx", "front.htpasswd")).st_mode & 0o777) == "0o640"
        # a file of the repository, with a bcrypt hash
        bcrypt = subprocess.run([SYSTEM_PY, "-W", "ignore", "-c", "import crypt; print(crypt.crypt('b0b', "
                                 "crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        server.commit(front, "users", {"users.htpasswd": f"# who may look\nbob:{bcrypt}\n"})
        assert server.push(front, "front").returncode == 0
        config(server, "config:set", "front", "NGINX_BASIC_AUTH=users.htpasswd")
        bob = {"Authorization": "Basic " + base64.b64encode(b"bob:b0b").decode()}
        assert request(server, HOST, headers=bob)[0] == 200 and request(server, HOST, headers=auth("s3cret"))[0] == 401
    finally:
        config(server, "config:unset", "front", "NGINX_BASIC_AUTH")
    assert request(server, HOST)[0] == 200 and server.read("nginx/front.htpasswd") in (None, "")  # no hash left


def test_allow_list(server, front):
    acme_file(server, "front", "tok", "challenge ok")
    config(server, "config:set", "front", "NGINX_ALLOW=127.0.0.1")
    try:
        assert request(server, HOST, source="127.0.0.2")[0] == 403
        assert request(server, HOST, source="127.0.0.1")[0] == 200
        assert request(server, HOST, "/.well-known/acme-challenge/tok", source="127.0.0.2")[0] == 200
    finally:
        config(server, "config:unset", "front", "NGINX_ALLOW")
    assert request(server, HOST, source="127.0.0.2")[0] == 200


@pytest.fixture
def other_user():
    name = USER + "x"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_another_local_user_cannot_reach_the_app_socket(server, front, other_user):
    slot = server.vassal("front", "wsgi").rsplit(".", 2)[1]  # the socket of the live slot
    sock = server.path("nginx", f"front.1.{slot}.sock")
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1])\n"
             "    print('connected')\nexcept OSError as e:\n    print(type(e).__name__)\n")
    r = subprocess.run([SYSTEM_PY, "-c", probe, sock], user=other_user.pw_uid, group=other_user.pw_gid,
                       extra_groups=[], capture_output=True, text=True)
    assert r.stdout.strip() == "PermissionError", r.stdout + r.stderr
    r = server.as_user([SYSTEM_PY, "-c", probe, sock])  # the piku user itself (the emperor's) can
    assert r.stdout.strip() == "connected", r.stdout + r.stderr
    assert request(server, HOST)[0] == 200  # and nginx does


def test_redirect_www_to_apex_keeps_path_and_query(server, front):
    config(server, "config:set", "front", f"NGINX_REDIRECT={WWW}:{HOST}")
    try:
        status, headers, _ = request(server, WWW, "/a/b?x=1&y=two")
        assert status == 301 and headers["location"] == f"http://{HOST}:{server.nginx_port}/a/b?x=1&y=two"
        status, headers, _ = tls(server, WWW, "/c?d=e")
        assert status == 301 and headers["location"] == f"https://{HOST}:{server.nginx_tls_port}/c?d=e"
        assert request(server, HOST, "/a")[0] == 200
    finally:
        config(server, "config:unset", "front", "NGINX_REDIRECT")
    assert request(server, WWW)[0] == 200


def test_logs_app_nginx(server, front):
    paths = [f"/probe-{i}-{time.time_ns()}" for i in range(3)]
    for path in paths:
        request(server, HOST, path)
    deadline = time.monotonic() + 10
    while True:
        out = config(server, "logs", "front", "nginx", "-n", "5")
        access = [l for l in out.splitlines() if l.startswith("nginx.access | ")]
        if all(any(p in l for l in access) for p in paths) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(any(p in l for l in access) for p in paths) and len(access) <= 5, out
    assert "nginx.access" not in config(server, "logs", "front", "-n", "5")  # not among the processes'


def test_web_app_tuning_and_websocket_location(server, tmp_path):
    """A web app with every backend setting on: nginx takes the config, requests pass, and a
    WebSocket upgrade request reaches the app through its own location."""
    settings = {"NGINX_PROXY_READ_TIMEOUT": "120", "NGINX_PROXY_SEND_TIMEOUT": "30",
                "NGINX_PROXY_BUFFERING": "false", "NGINX_WEBSOCKET_TIMEOUT": "3600", "NGINX_HSTS": "600"}
    server.deployed("kinds", "tuned", tmp_path, {"ENV": server.nginx_env("tuned.piku.test", **settings)})
    conf = server.read("nginx/tuned.conf")
    assert "location @piku-websocket {" in conf and "proxy_buffering off;" in conf
    status, _, body = request(server, "tuned.piku.test", "/headers",
                              headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    assert status == 200 and json.loads(body).get("Upgrade") == "websocket"
    status, headers, _ = tls(server, "tuned.piku.test", "/headers")
    assert status == 200 and headers["strict-transport-security"] == "max-age=600"


def test_hostile_front_door_values_are_refused(server, front):
    before = server.tree()
    for kv in ("NGINX_CLIENT_MAX_BODY_SIZE=1m; include /etc/passwd", "NGINX_ALLOW=10.0.0.0/8; allow all",
               "NGINX_BASIC_AUTH=ann:plaintext", "NGINX_BASIC_AUTH=../../etc/shadow",
               f"NGINX_REDIRECT={WWW}:evil.test;return", "NGINX_REDIRECT=www.other.test:front.piku.test",
               "NGINX_PROXY_READ_TIMEOUT=60s;", "NGINX_HSTS=forever", "NGINX_GZIP=please"):
        r = server.ssh("config:set", "front", kv)
        assert r.returncode != 0 and r.stderr.count("\n") == 1, (kv, r.stderr)
        assert kv.split("=")[0] in r.stderr, (kv, r.stderr)
    assert server.tree() == before


def test_what_older_nginx_gets_passes_this_nginx(tmp_path):
    """nginx before 1.19.4 has no ssl_reject_handshake: the default server gets a certificate of
    its own; and configs the original piku wrote (several spaces after `listen`) are checked on
    test ports like piku's. This nginx must accept both, through the same `nginx -t` check."""
    import shutil
    import piku
    paths = piku.paths_for(str(tmp_path / "root"))
    piku.setup_tree(paths)
    crt, key = piku.ensure_default_certificate(paths)
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    original = (f"server {{\n  listen              0.0.0.0:80;\n  listen              [::]:443 ssl http2;\n"
                f"  server_name         old.piku.test;\n  ssl_certificate     {crt};\n  ssl_certificate_key {key};\n"
                "  location / { return 200 'old'; }\n}\n")
    old_nginx = {"version": [1, 18, 0], "http2": True}
    default = piku.render_default_server(piku.plan_default_listens([original], {}), old_nginx, (crt, key))
    assert "ssl_certificate " in default and "ssl_reject_handshake" not in default
    scratch = tmp_path / "check"
    scratch.mkdir()
    ports, confs = {}, []
    for name, text in (("old.conf", original), ("_default.conf", default), ("_piku.conf", piku.render_nginx_map())):
        confs.append(str(scratch / name))
        (scratch / name).write_text(piku.relisten_for_check(text, ports, str(scratch / "logs.log")))
    assert set(ports) == {"0.0.0.0:80", "[::]:443"}
    (scratch / "nginx.conf").write_text(piku.render_nginx_check_conf(str(scratch), confs))
    r = subprocess.run([need("nginx"), "-t", "-q", "-p", str(scratch), "-c", str(scratch / "nginx.conf"),
                        "-e", str(scratch / "error.log")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)
