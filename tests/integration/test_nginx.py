"""Issue 4: apps reached through a real nginx by Host header; configs checked before they go live."""
import http.client
import json
import os
import re
import socket
import ssl

import pytest

from test_zero_downtime import assert_destroy_hands_the_names_to_the_default_server


def https_get(server, host, path="/", cafile=None):
    """GET over TLS to the test nginx with SNI and Host set to host (no DNS involved), once
    nginx serves what nginx/ holds."""
    server.nginx_settled()
    ctx = ssl.create_default_context(cafile=cafile)
    if not cafile:  # self-signed: the tests compare the certificate itself
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", server.nginx_tls_port, context=ctx, timeout=5)
    sock = socket.create_connection(("127.0.0.1", server.nginx_tls_port), timeout=5)
    conn.sock = ctx.wrap_socket(sock, server_hostname=host)
    conn.request("GET", path, headers={"Host": host})
    resp = conn.getresponse()
    cert = conn.sock.getpeercert(binary_form=True)
    return resp.status, resp.read().decode(), cert


def plain_get(server, host, path="/", want=None, timeout=20):
    """(status, headers, body) from the test nginx over HTTP, redirects not followed; retried
    until the status is `want` (nginx reloads a moment after a deploy)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        server.nginx_settled()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.nginx_port, timeout=5)
            conn.request("GET", path, headers={"Host": host})
            resp = conn.getresponse()
            got = resp.status, dict(resp.getheaders()), resp.read().decode()
            if want is None or got[0] == want:
                return got
        except OSError as e:
            got = e
        assert time.monotonic() < deadline, f"{host}{path}: {got}\n{server.logs()}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def wsgi_site(server, tmp_path_factory):
    env = server.nginx_env("wsgi.piku.test", NGINX_STATIC_PATHS="/assets/:static")
    return server.deployed("uv-wsgi", "wsgisite", tmp_path_factory.mktemp("w"),
                           {"ENV": env, "static/hello.txt": "static hello\n", ".git-keep/x": "x"})


@pytest.fixture(scope="module")
def web_site(server, tmp_path_factory):
    env = server.nginx_env("web.piku.test, www.web.piku.test")
    return server.deployed("kinds", "website", tmp_path_factory.mktemp("w"), {"ENV": env})


def test_wsgi_through_unix_socket(server, wsgi_site):
    conf = server.read("nginx/wsgisite.conf")
    assert "uwsgi_pass piku-wsgisite" in conf and re.search(r"wsgisite\.1\.live\.sock max_fails=0;", conf)
    # nginx connects through a link to the live slot's socket
    link = server.read_link("nginx/wsgisite.1.live.sock")
    assert re.fullmatch(r"wsgisite\.1\.[ab]\.sock", link), link
    status, body = server.wait_http(server.nginx_port, host="wsgi.piku.test", contains="uv-wsgi v1")
    assert "app=wsgisite" in body


def test_static_paths_served_by_nginx(server, wsgi_site):
    server.wait_http(server.nginx_port, "/assets/hello.txt", host="wsgi.piku.test", contains="static hello")
    status, _ = server.http_get(server.nginx_port, "/assets/missing.txt", host="wsgi.piku.test")
    assert status == 404


def test_git_paths_blocked(server, wsgi_site):
    server.wait_http(server.nginx_port, host="wsgi.piku.test")
    status, body = server.http_get(server.nginx_port, "/.git/config", host="wsgi.piku.test")
    assert status == 404 and "uv-wsgi" not in body


def test_web_through_proxy_with_forwarded_headers(server, web_site):
    for host in ("web.piku.test", "www.web.piku.test"):  # several names, one server block
        server.wait_http(server.nginx_port, "/headers", host=host)
    status, body = server.http_get(server.nginx_port, "/headers", host="web.piku.test")
    headers = {k.lower(): v for k, v in json.loads(body).items()}
    assert headers["host"] == "web.piku.test"
    assert headers["x-forwarded-for"] == "127.0.0.1" and headers["x-forwarded-proto"] == "http"
    conf = server.read("nginx/website.conf")
    assert "proxy_pass http://piku-website" in conf and "$piku_connection_upgrade" in conf


def test_hosts_are_routed_to_their_own_app(server, wsgi_site, web_site):
    _, a = server.wait_http(server.nginx_port, host="wsgi.piku.test")
    _, b = server.wait_http(server.nginx_port, host="web.piku.test")
    assert "uv-wsgi" in a and '"APP": "website"' in b


def test_https_with_self_signed_certificate(server, web_site):
    import time
    deadline = time.monotonic() + 20
    while True:
        try:
            status, body, cert = https_get(server, "web.piku.test")
            break
        except OSError:
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.3)
    assert status == 200 and '"APP": "website"' in body
    with open(server.path("nginx", "website.crt"), "rb") as f:
        pem = f.read().decode()
    assert ssl.DER_cert_to_PEM_cert(cert).strip() == pem.strip()
    assert oct(os.stat(server.path("nginx", "website.key")).st_mode & 0o777) == "0o600"


def test_https_only_redirects(server, tmp_path):
    env = server.nginx_env("secure.piku.test", NGINX_HTTPS_ONLY="1")
    server.deployed("kinds", "secure", tmp_path, {"ENV": env})
    status, headers, _ = plain_get(server, "secure.piku.test", "/x?y=1", want=301)
    assert headers["Location"] == "https://secure.piku.test/x?y=1"
    conf = server.read("nginx/secure.conf")
    assert "return 301 https://$host$request_uri" in conf
    assert https_get(server, "secure.piku.test")[0] == 200


def test_static_kind(server, tmp_path):
    files = {"Procfile": "static: public\n", "public/index.html": "<h1>static site</h1>\n",
             "public/sub/page.html": "in a sub directory\n", "ENV": server.nginx_env("static.piku.test")}
    repo = server.make_app(None, tmp_path / "staticsite", files)
    os.symlink("/etc", repo / "public" / "etc")  # committed symlinks out of the repo are not served
    os.symlink("sub", repo / "public" / "inside")  # ... links within it are
    server.commit(repo, "links")
    r = server.push(repo, "staticsite")
    assert r.returncode == 0, r.stdout
    server.wait_http(server.nginx_port, host="static.piku.test", contains="static site")
    r = server.http_get(server.nginx_port, "/nope", host="static.piku.test")
    assert r[0] == 404, r
    assert server.http_get(server.nginx_port, "/etc/passwd", host="static.piku.test")[0] in (403, 404)
    assert server.http_get(server.nginx_port, "/inside/page.html", host="static.piku.test") == \
        (200, "in a sub directory\n")


def test_static_beside_an_app_with_catch_all_and_cache(server, tmp_path):
    """static: next to a wsgi app: files from the static directory, everything else from the
    app; cached prefixes are cached and marked public, other pages are not."""
    app_py = ("import os, time\n"
              "def application(environ, start_response):\n"
              "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
              "    return [f\"app {environ['PATH_INFO']} {time.time()}\".encode()]\n")
    files = {"Procfile": "wsgi: app:application\nstatic: public\n", "requirements.txt": "", "app.py": app_py,
             "public/logo.txt": "a static file\n",
             "ENV": server.nginx_env("mixed.piku.test", NGINX_CACHE_PREFIXES="/feed")}
    server.deployed(None, "mixedsite", tmp_path / "mixed", files)
    host = "mixed.piku.test"
    server.wait_http(server.nginx_port, "/logo.txt", host=host, contains="a static file")  # nginx reloaded
    assert plain_get(server, host, "/logo.txt", want=200)[2] == "a static file\n"
    status, headers, body = plain_get(server, host, "/page", want=200)
    assert body.startswith("app /page ") and "public" not in headers.get("Cache-Control", "")
    first = plain_get(server, host, "/feed/x", want=200)
    second = plain_get(server, host, "/feed/x", want=200)
    assert second[2] == first[2] and second[1].get("X-Cache-Status") == "HIT"
    assert second[1].get("Cache-Control") == "public, max-age=3600"
    # a single-page app: unknown paths under the static directory get its index page
    files = {"Procfile": "static: public\n", "public/index.html": "<h1>spa shell</h1>\n",
             "ENV": server.nginx_env("spa.piku.test", NGINX_CATCH_ALL="/index.html")}
    server.deployed(None, "spasite", tmp_path / "spa", files)
    server.wait_http(server.nginx_port, "/", host="spa.piku.test", contains="spa shell")  # nginx reloaded
    assert "spa shell" in plain_get(server, "spa.piku.test", "/some/client/route", want=200)[2]


def test_include_file_applied_and_broken_one_rejected(server, tmp_path):
    files = {"Procfile": "static: public\n", "public/index.html": "v1\n",
             "extra.conf": "add_header X-Piku-Extra yes;\n",
             "ENV": server.nginx_env("inc.piku.test", NGINX_INCLUDE_FILE="extra.conf")}
    repo = server.deployed(None, "incsite", tmp_path, files)
    server.wait_http(server.nginx_port, host="inc.piku.test", contains="v1")
    assert plain_get(server, "inc.piku.test")[1].get("X-Piku-Extra") == "yes"
    before = server.read("nginx/incsite.conf")
    old_rev = server.git(repo, "rev-parse", "HEAD").stdout.strip()
    server.commit(repo, "broken include", {"public/index.html": "v2\n", "extra.conf": "this is not nginx;\n"})
    r = server.push(repo, "incsite")
    assert r.returncode != 0 and "nginx rejected the new config" in r.stdout, r.stdout
    assert server.read("nginx/incsite.conf") == before
    assert old_rev in server.git(repo, "ls-remote", server.remote_url("incsite")).stdout
    status, body = server.http_get(server.nginx_port, host="inc.piku.test")
    assert body == "v1\n"


def test_hostile_server_name_rejected(server, wsgi_site):
    before = server.tree()
    for value in ("evil.test; include /etc/passwd", "a.test\nserver {", "x.test}"):
        r = server.ssh("config:set", "wsgisite", f"NGINX_SERVER_NAME={value}")
        assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert server.tree() == before


def raw_get(server, host, path="/"):
    """One GET through the test nginx, without waiting for it to reload first."""
    conn = http.client.HTTPConnection("127.0.0.1", server.nginx_port, timeout=5)
    conn.request("GET", path, headers={"Host": host})
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


def test_first_deploy_answers_by_name_when_the_push_returns(server, tmp_path):
    """The push of a new name waits until nginx routes it: with the reload watcher paused it
    is still running after its config is written, and it ends, without a warning, once nginx
    has reloaded."""
    import signal
    import threading
    import time
    files = {"Procfile": "static: public\n", "public/index.html": "<h1>first</h1>\n",
             "ENV": server.nginx_env("first.piku.test")}
    repo = server.make_app(None, tmp_path / "first", files)
    watcher, result = server.procs["nginx-watch"].pid, {}
    os.kill(watcher, signal.SIGSTOP)
    try:
        pusher = threading.Thread(target=lambda: result.update(r=server.push(repo, "firstsite")))
        pusher.start()
        deadline = time.monotonic() + 120
        while not os.path.exists(server.path("nginx", "firstsite.conf")):
            assert time.monotonic() < deadline and pusher.is_alive(), result
            time.sleep(0.05)
        time.sleep(2)
        assert pusher.is_alive(), result["r"].stdout  # waiting for nginx, not done
        assert raw_get(server, "first.piku.test")[1] != "<h1>first</h1>\n"  # nginx has not reloaded
    finally:
        os.kill(watcher, signal.SIGCONT)
    pusher.join(60)
    r = result["r"]
    assert r.returncode == 0 and "nginx has not loaded" not in r.stdout, r.stdout
    assert server.wait_http(server.nginx_port, host="first.piku.test")[1] == "<h1>first</h1>\n"


def test_nginx_that_never_reloads_is_reported(server, tmp_path):
    """The push still succeeds (the app is live on its port), with a warning that says why the
    name does not answer; once nginx reloads, it does."""
    import signal
    files = {"Procfile": "static: public\n", "public/index.html": "<h1>late</h1>\n",
             "ENV": server.nginx_env("late.piku.test")}
    repo = server.make_app(None, tmp_path / "late", files)
    watcher = server.procs["nginx-watch"].pid
    os.kill(watcher, signal.SIGSTOP)
    try:
        r = server.push(repo, "latesite")
    finally:
        os.kill(watcher, signal.SIGCONT)
    assert r.returncode == 0, r.stdout
    assert "nginx has not loaded latesite's config after 10s" in r.stdout, r.stdout
    server.wait_http(server.nginx_port, host="late.piku.test", contains="late")


def test_a_name_another_app_serves_is_refused(server, wsgi_site, tmp_path):
    files = {"Procfile": "static: public\n", "public/index.html": "thief\n",
             "ENV": server.nginx_env("www.other.piku.test, WSGI.piku.test")}
    r = server.push(server.make_app(None, tmp_path / "thief", files), "thief")
    assert r.returncode != 0, r.stdout
    assert "NGINX_SERVER_NAME: wsgi.piku.test is already served by app wsgisite" in r.stdout, r.stdout
    assert not os.path.exists(server.path("nginx", "thief.conf"))
    assert "uv-wsgi" in server.wait_http(server.nginx_port, host="wsgi.piku.test")[1]


def test_destroy_removes_the_wsgi_sockets_and_only_those(server, tmp_path):
    server.deployed("uv-wsgi", "sockapp", tmp_path, {"ENV": server.nginx_env("sock.piku.test")})
    server.wait_http(server.nginx_port, host="sock.piku.test", contains="uv-wsgi")
    [sock] = [server.path("nginx", n) for n in os.listdir(server.path("nginx")) if re.fullmatch(r"sockapp\.1\.[ab]\.sock", n)]
    others = sorted(n for n in os.listdir(server.path("nginx")) if n.endswith(".sock") and not n.startswith("sockapp."))
    assert_destroy_hands_the_names_to_the_default_server(server, "sockapp", "sock.piku.test")
    assert not os.path.lexists(sock) and not os.path.exists(server.path("nginx", "sockapp.conf"))
    assert sorted(n for n in os.listdir(server.path("nginx")) if n.endswith(".sock")) == others


def test_config_set_waits_for_nginx_to_route_an_added_name(server, tmp_path):
    import signal
    # (nginx sends unknown names to the first server block: make that another app's)
    server.deployed(None, "aa-first", tmp_path, {"Procfile": "static: public\n", "public/index.html": "first\n",
                                                 "ENV": server.nginx_env("aa-first.piku.test")})
    files = {"Procfile": "static: public\n", "public/index.html": "<h1>named</h1>\n",
             "ENV": server.nginx_env("one.piku.test")}
    server.deployed(None, "namedsite", tmp_path, files)
    server.wait_http(server.nginx_port, host="one.piku.test", contains="named")
    watcher = server.procs["nginx-watch"].pid
    os.kill(watcher, signal.SIGSTOP)
    try:
        r = server.ssh("config:set", "namedsite", "NGINX_SERVER_NAME=one.piku.test,two.piku.test")
    finally:
        os.kill(watcher, signal.SIGCONT)
    assert r.returncode == 0, r.stderr
    assert "nginx has not loaded namedsite's config after 10s" in r.stdout + r.stderr, r.stdout + r.stderr
    server.wait_http(server.nginx_port, host="two.piku.test", contains="named")
    r = server.ssh("config:set", "namedsite", "NGINX_SERVER_NAME=two.piku.test,three.piku.test")
    assert r.returncode == 0 and "nginx has not loaded" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert raw_get(server, "three.piku.test") == (200, "<h1>named</h1>\n")
