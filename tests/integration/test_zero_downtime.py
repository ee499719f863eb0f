"""Deploys and config changes never leave nginx with nothing to answer: requests sent in a loop
through the real nginx while a `web:` (gunicorn) or `wsgi:` app is redeployed all succeed (the
original piku failed ~13% of them for a web app)."""
import http.client
import os
import threading
import time

import pytest
from harness import request_in_background


class Hammer:
    """GET / through the test nginx with a Host header (or straight to `port`), as fast as it
    answers, in a thread."""

    def __init__(self, server, host=None, port=None, method="GET"):
        self.server, self.host, self.port = server, host, port or server.nginx_port
        self.method = method  # POST: nginx never retries it on another worker once it was sent
        self.ok, self.failures, self.bodies = 0, [], {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        while not self.stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request(self.method, "/", body=b"x=1" if self.method == "POST" else None,
                             headers={"Host": self.host} if self.host else {})
                resp = conn.getresponse()
                body = resp.read().decode()
                if resp.status == 200:
                    self.ok += 1
                    key = body.split(" port=")[0].strip()
                    self.bodies[key] = self.bodies.get(key, 0) + 1
                else:
                    self.failures.append(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} "
                                         f"{resp.status} {body[:60]}")
                conn.close()
            except OSError as e:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {e!r}")
            time.sleep(0.005)

    def __enter__(self):
        self.thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        time.sleep(1)
        self.stop.set()
        self.thread.join(15)


@pytest.fixture(scope="module")
def gunicorn_site(server, tmp_path_factory):
    env = server.nginx_env("gunicorn.piku.test")
    repo = server.deployed("req-web", "gunisite", tmp_path_factory.mktemp("g"), {"ENV": env})
    server.wait_http(server.nginx_port, host="gunicorn.piku.test", contains="req-web v1")
    return repo


def bump(server, repo, old, new):
    text = open(os.path.join(repo, "app.py")).read().replace(old, new)
    server.commit(repo, new, {"app.py": text})


def slot_ports(server, app):
    import json
    return json.loads(server.read(f"state/{app}/ports.json"))["web"]


def test_web_redeploy_through_nginx_loses_no_request(server, gunicorn_site):
    """Blue/green: the new release's web process starts on its own port beside the live one,
    answers, takes the traffic; the old one stops. nginx reaches it through the router its
    uWSGI master runs: the switch moves the link nginx connects to, and nginx's conf stays the
    same (no reload). Both slots' routers are backups."""
    before = server.app_port("gunisite")
    conf = server.read("nginx/gunisite.conf")
    link = server.path("nginx", "gunisite.web1.live.sock")
    assert f"server unix:{link} max_fails=0;" in conf and " backup max_fails=0;" in conf, conf
    assert f"127.0.0.1:{before}" not in conf
    linked = os.readlink(link)
    bump(server, gunicorn_site, "req-web v1", "req-web v2")
    with Hammer(server, "gunicorn.piku.test") as h:
        r = server.push(gunicorn_site, "gunisite")
    assert r.returncode == 0, r.stdout
    assert "Starting the new release beside the live one: web x1" in r.stdout, r.stdout
    assert "health check passed" in r.stdout, r.stdout
    assert not h.failures, f"{len(h.failures)} of {h.ok + len(h.failures)} failed: {h.failures[:5]}"
    assert h.ok > 50 and h.bodies.get("req-web v2"), h.bodies
    after = server.app_port("gunisite")
    assert after != before and after in sum(slot_ports(server, "gunisite").values(), [])
    status, body = server.http_get(after)
    assert status == 200 and f"req-web v2 port={after}" in body  # no polling: live when the push returns
    assert server.read("nginx/gunisite.conf") == conf
    assert os.readlink(link) != linked and os.readlink(link).startswith("gunisite.web1.")
    server.wait_http(server.nginx_port, host="gunicorn.piku.test", contains="req-web v2")


SLOW_WEB = """import os, time
def application(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(4)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{os.environ['GREETING']} {environ['PATH_INFO']} port={os.environ['PORT']}\\n".encode()]
"""


def test_web_request_in_flight_through_the_old_router_finishes(server, tmp_path):
    """A long request that went through the old release's router when a switch moved the link
    ends normally: the old router and command stop only once it has (in the background: the
    push returns at once); meanwhile new requests get the new release, and nothing fails."""
    host = "inflight.piku.test"
    env = server.nginx_env(host) + "GREETING=one\n"
    server.deployed("req-web", "inflight", tmp_path, {
        "ENV": env, "app.py": SLOW_WEB, "Procfile": "web: gunicorn -b $BIND_ADDRESS:$PORT --threads 4 app:application\n"})
    server.wait_http(server.nginx_port, host=host, contains="one /")
    with Hammer(server, host) as h:
        thread, outcome = request_in_background(server.nginx_port, "/slow", host, settle=0.5)
        r = server.ssh("config:set", "inflight", "GREETING=two")
        assert r.returncode == 0, r.stdout + r.stderr
        assert server.http_get(server.app_port("inflight"))[1].startswith("two /")
        thread.join(30)
    assert outcome.get("answer", (0, ""))[0] == 200 and outcome["answer"][1].startswith("one /slow"), outcome
    assert not h.failures, f"{len(h.failures)} failed: {h.failures[:5]}; {server.nginx_errors('inflight')}"
    assert h.bodies.get("two /"), h.bodies
    deadline = time.monotonic() + 15
    while len(server.masters("inflight", "web")) != 1:  # the old master goes once its request ended
        assert time.monotonic() < deadline, [server.proc_title(p) for p in server.masters("inflight", "web")]
        time.sleep(0.1)
    with Hammer(server, host) as h, Hammer(server, host, method="POST") as posts:
        # to the ports and back (as from and to an earlier piku.py): each of these reloads nginx
        r = server.ssh("config:set", "inflight", "PIKU_WEB_ROUTER=false")
        assert r.returncode == 0, r.stdout + r.stderr
        conf = server.read("nginx/inflight.conf")
        assert f"server 127.0.0.1:{server.app_port('inflight')} max_fails=0;" in conf and ".sock" not in conf, conf
        assert server.http_get(server.nginx_port, "/", host)[1].startswith("two /")  # the new conf at once
        r = server.ssh("config:set", "inflight", "PIKU_WEB_ROUTER=true", "GREETING=three")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "web1.live.sock" in server.read("nginx/inflight.conf")
        assert server.http_get(server.nginx_port, "/", host)[1].startswith("three /")
    for x in (h, posts):
        assert not x.failures, f"{len(x.failures)} failed: {x.failures[:5]}; {server.nginx_errors('inflight')}"
    r = server.ssh("destroy", "inflight", "--force")
    assert r.returncode == 0, r.stdout
    assert not [n for n in os.listdir(server.path("nginx")) if n.startswith("inflight.")]


def test_config_set_on_web_app_loses_no_request(server, gunicorn_site):
    with Hammer(server, "gunicorn.piku.test") as h:
        r = server.ssh("config:set", "gunisite", "FEATURE=on")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not h.failures, f"{len(h.failures)} of {h.ok + len(h.failures)} failed: {h.failures[:5]}"


def test_broken_web_release_is_refused_before_the_old_one_stops(server, gunicorn_site):
    old, port = server.rev(gunicorn_site), server.app_port("gunisite")
    procfile = "web: echo booting; exit 3\n"
    server.commit(gunicorn_site, "broken web", {"Procfile": procfile})
    with Hammer(server, "gunicorn.piku.test") as h:
        r = server.push(gunicorn_site, "gunisite")
    assert r.returncode != 0, r.stdout
    assert "failed their health check (web.1: its command kept exiting" in r.stdout, r.stdout
    assert "the push is rejected; the live release serves on" in r.stdout, r.stdout
    assert server.remote_rev("gunisite") == old and server.app_port("gunisite") == port
    assert not h.failures and h.bodies.get("req-web v2"), (h.failures[:5], h.bodies)
    server.git(gunicorn_site, "reset", "-q", "--hard", old)


def test_web_that_never_listens_on_port_is_refused_with_the_reason(server, gunicorn_site):
    old = server.rev(gunicorn_site)
    env = open(os.path.join(gunicorn_site, "ENV")).read() + "PIKU_HEALTH_TIMEOUT=3\n"
    server.commit(gunicorn_site, "web on a fixed port", {"Procfile": "web: sleep 60\n", "ENV": env})
    r = server.push(gunicorn_site, "gunisite")
    assert r.returncode != 0, r.stdout
    assert "(web.1: no answer yet" in r.stdout and "after 3s (PIKU_HEALTH_TIMEOUT)" in r.stdout, r.stdout
    assert server.remote_rev("gunisite") == old
    server.git(gunicorn_site, "reset", "-q", "--hard", old)
    server.wait_http(server.nginx_port, host="gunicorn.piku.test", contains="req-web")


def test_preboot_can_be_turned_off(server, gunicorn_site):
    """PIKU_PREBOOT=false: the web process is restarted in place on PORT (after a trial run of the
    new release on a private port), and nginx points at PORT alone."""
    r = server.ssh("config:set", "gunisite", "PIKU_PREBOOT=false")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backup" not in server.read("nginx/gunisite.conf")
    bump(server, gunicorn_site, "req-web v2", "req-web v3")
    r = server.push(gunicorn_site, "gunisite")
    assert r.returncode == 0 and "answered on trial port" in r.stdout, r.stdout
    server.wait_http(server.nginx_port, host="gunicorn.piku.test", contains="req-web v3")


def test_wsgi_redeploy_through_nginx_loses_no_request(server, tmp_path):
    env = server.nginx_env("zdwsgi.piku.test")
    repo = server.deployed("uv-wsgi", "zdwsgi", tmp_path, {"ENV": env})
    server.wait_http(server.nginx_port, host="zdwsgi.piku.test", contains="uv-wsgi v1")
    bump(server, repo, "uv-wsgi v1", "uv-wsgi v2")
    with Hammer(server, "zdwsgi.piku.test") as h:
        r = server.push(repo, "zdwsgi")
    assert r.returncode == 0, r.stdout
    assert not h.failures, f"{len(h.failures)} of {h.ok + len(h.failures)} failed: {h.failures[:5]}"
    assert h.ok > 50
    server.wait_http(server.nginx_port, host="zdwsgi.piku.test", contains="uv-wsgi v2")


def test_wsgi_switches_through_the_socket_link_lose_no_get_and_no_post(server, tmp_path):
    """A wsgi switch moves nginx's traffic by re-pointing nginx/<app>.1.live.sock, no reload:
    nginx's conf stays the same, and neither GETs nor POSTs (which nginx never retries on
    another server once sent) fail across pushes and config:set."""
    env = server.nginx_env("zdlink.piku.test")
    repo = server.deployed("uv-wsgi", "zdlink", tmp_path, {"ENV": env})
    server.wait_http(server.nginx_port, host="zdlink.piku.test", contains="uv-wsgi v1")
    conf = server.read("nginx/zdlink.conf")
    links = []
    with Hammer(server, "zdlink.piku.test") as gets, Hammer(server, "zdlink.piku.test", method="POST") as posts:
        for i in range(3):
            server.git(repo, "commit", "-q", "--allow-empty", "-m", f"empty {i}")
            r = server.push(repo, "zdlink")
            assert r.returncode == 0, r.stdout
            links.append(server.read_link("nginx/zdlink.1.live.sock"))
        r = server.ssh("config:set", "zdlink", "GREETING=hi")
        assert r.returncode == 0, r.stdout
        links.append(server.read_link("nginx/zdlink.1.live.sock"))
    for h in (gets, posts):
        assert not h.failures, (f"{h.method}: {len(h.failures)} of {h.ok + len(h.failures)} failed: {h.failures[:5]}"
                                f"; nginx: {server.nginx_errors('zdlink')}")
        assert h.ok > 50
    assert links == ["zdlink.1.b.sock", "zdlink.1.a.sock"] * 2  # each switch moved the link to the other slot
    assert server.read("nginx/zdlink.conf") == conf  # the same conf throughout: nginx reloaded nothing


def test_wsgi_scaled_behind_nginx_gets_a_link_per_instance_and_destroy_removes_them(server, tmp_path):
    env = server.nginx_env("zdscale.piku.test")
    server.deployed("uv-wsgi", "zdscale", tmp_path, {"ENV": env})
    server.wait_http(server.nginx_port, host="zdscale.piku.test", contains="uv-wsgi v1")
    with Hammer(server, "zdscale.piku.test") as h:
        r = server.ssh("ps:scale", "zdscale", "wsgi=2")
        assert r.returncode == 0, r.stdout
        slot = server.read_link("nginx/zdscale.1.live.sock").split(".")[2]
        assert server.read_link("nginx/zdscale.2.live.sock") == f"zdscale.2.{slot}.sock"
        conf = server.read("nginx/zdscale.conf")
        assert "zdscale.1.live.sock max_fails=0;" in conf and "zdscale.2.live.sock max_fails=0;" in conf
        r = server.ssh("ps:scale", "zdscale", "wsgi=1")
        assert r.returncode == 0, r.stdout
    assert not h.failures, f"{len(h.failures)} of {h.ok + len(h.failures)} failed: {h.failures[:5]}"
    assert server.read_link("nginx/zdscale.2.live.sock") is None
    assert "zdscale.2." not in server.read("nginx/zdscale.conf")
    server.wait_http(server.nginx_port, host="zdscale.piku.test", contains="uv-wsgi v1")
    r = server.ssh("destroy", "zdscale", "--force")
    assert r.returncode == 0, r.stdout
    assert not [n for n in os.listdir(server.path("nginx")) if n.startswith("zdscale.")]


def test_web_switches_lose_no_post(server, tmp_path):
    """A web switch reloads nginx: for 100 ms its old workers still send new requests to the old
    port beside the new workers. The old command stops only once they have stopped taking
    requests and its port's queue is empty, so no POST (which nginx never sends to another
    server once it was sent) is reset by the stop."""
    env = server.nginx_env("wpost.piku.test")
    repo = server.deployed("req-web", "wpost", tmp_path, {"ENV": env})
    server.wait_http(server.nginx_port, host="wpost.piku.test", contains="req-web v1")
    with Hammer(server, "wpost.piku.test") as gets, Hammer(server, "wpost.piku.test", method="POST") as posts, \
            Hammer(server, "wpost.piku.test", method="POST") as more_posts:
        for i in range(5):
            server.git(repo, "commit", "-q", "--allow-empty", "-m", f"empty {i}")
            r = server.push(repo, "wpost")
            assert r.returncode == 0, r.stdout
        r = server.ssh("config:set", "wpost", "GREETING=hi")
        assert r.returncode == 0, r.stdout
    for h in (gets, posts, more_posts):
        assert not h.failures, (f"{h.method}: {len(h.failures)} of {h.ok + len(h.failures)} failed: {h.failures[:5]}"
                                f"; nginx: {server.nginx_errors('wpost')}")
        assert h.ok > 50
    assert_destroy_hands_the_names_to_the_default_server(server, "wpost", "wpost.piku.test")


def test_web_operations_back_to_back_start_at_once_and_lose_nothing(server, tmp_path):
    """uWSGI waits a second after it has stopped a daemon before the master exits, but the old
    command (and its port) is gone at once: an operation right after the last one starts its
    workers in the slot the last master still leaves, without waiting for it (each web master
    has a FIFO of its own generation). Nothing fails meanwhile, and old FIFOs do not pile up."""
    host = "b2b.piku.test"
    server.deployed("req-web", "b2b", tmp_path, {"ENV": server.nginx_env(host)})
    server.wait_http(server.nginx_port, host=host, contains="req-web v1")
    with Hammer(server, host) as gets, Hammer(server, host, method="POST") as posts:
        for i in range(4):
            r = server.ssh("config:set", "b2b", f"ROUND={i}") if i % 2 else server.ssh("restart", "b2b")
            assert r.returncode == 0, r.stdout + r.stderr
            out = r.stdout + r.stderr
            assert "still shutting down" not in out and "still in use" not in out, out
    for h in (gets, posts):
        assert not h.failures, f"{h.method}: {len(h.failures)} failed: {h.failures[:5]}; {server.nginx_errors('b2b')}"
        assert h.ok > 20
    for slot in ("a", "b"):
        fifos = [n for n in os.listdir(server.path("state", "b2b", f"slot-{slot}")) if n.endswith(".fifo")]
        assert len(fifos) <= 2, fifos  # (the live or last master's, and one still stopping)
    deadline = time.monotonic() + 15
    while len(server.masters("b2b", "web")) != 1:
        assert time.monotonic() < deadline, [server.proc_title(p) for p in server.masters("b2b", "web")]
        time.sleep(0.1)
    r = server.ssh("config:get", "b2b", "ROUND")
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stdout + r.stderr


def assert_destroy_hands_the_names_to_the_default_server(server, app, host):
    """destroy takes the app's names from nginx before its workers stop: a request during it gets
    the app or the default server's 404, never a 502 from a stopped worker; right after, a 404.
    (When no other app listens on nginx's port, the default server leaves it too: refused.)"""
    with Hammer(server, host) as during:
        r = server.ssh("destroy", app, "--force")
    assert r.returncode == 0, r.stdout
    assert all(" 404 " in f or "ConnectionRefusedError" in f for f in during.failures), during.failures[:5]
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.nginx_port, timeout=10)
        conn.request("GET", "/", headers={"Host": host})
        assert conn.getresponse().status == 404
        conn.close()
    except ConnectionRefusedError:
        assert not [n for n in os.listdir(server.path("nginx")) if n.endswith(".conf") and not n.startswith("_")]
