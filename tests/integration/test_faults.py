"""Issue 10 items 3, 7, 8, 9: faults a real server meets. Another app's broken state, a push
killed in the middle of its dependency sync, a killed uWSGI emperor and a full disk must each
leave every app working and the next operation succeeding."""
import hashlib
import http.client
import http.server
import io
import json
import os
import signal
import subprocess
import threading
import time
import zipfile
from base64 import urlsafe_b64encode

import pytest

from harness import Reachable, find_other_python, request_in_background, system_uwsgi_python

WEB_PY = """import os
from http.server import BaseHTTPRequestHandler, HTTPServer

BODY = open("body.txt").read().strip()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{BODY} pid={os.getpid()}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


HTTPServer((os.environ["BIND_ADDRESS"], int(os.environ["PORT"])), Handler).serve_forever()
"""


def web_app(body, procfile="web: python3 web.py\n", **extra):
    return {"Procfile": procfile, "web.py": WEB_PY, "body.txt": body + "\n", **extra}


# --- processes -------------------------------------------------------------------------------

def processes(uid):
    """{pid: (ppid, state, start time, argv)} of uid's processes."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        out[int(pid)] = (int(fields[1]), fields[0], fields[19], argv)
    return out


def tree_of(uid, root):
    """{pid: (start time, argv)} of root's descendants (root left out) as they are now."""
    procs, found, todo = processes(uid), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, start, argv) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = (start, argv)
                todo.append(pid)
    return found


def still_running(snapshot, timeout):
    """The processes of a tree_of() snapshot that still run (the same pid and start time, not a
    zombie) once `timeout` seconds have passed, or as soon as none does."""
    deadline = time.monotonic() + timeout
    while True:
        left = {}
        for pid, (start, argv) in snapshot.items():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[19] == start and fields[0] not in "ZX":
                left[pid] = " ".join(argv)[:160]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def push_in_background(server, repo, app):
    """Start `git push`; returns (thread, result list the push's CompletedProcess lands in)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(server.push(repo, app)), daemon=True)
    thread.start()
    return thread, result


def hook_pid(server, app, timeout=120):
    """pid of the piku.py git-hook process building app (the pre-receive hook)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, (_, state, _, argv) in processes(server.uid).items():
            if "git-hook" in argv and argv[-1] == app and state not in "ZX":
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no git-hook process for {app}\n" + server.logs())


def error_lines(out):
    return [l for l in out.splitlines() if l.startswith("remote:  !")]


# --- item 3: another app's broken state never fails this app's operations --------------------

@pytest.fixture
def fake_app(server):
    """fake_app(app, files): an app as another piku.py version (or a hand edit) could have left
    it, its bare repo and the given files under PIKU_ROOT (the piku user's); all gone afterwards
    (other tests' pushes would warn about them)."""
    made = []
    yield lambda app, files: made.append(app) or make_fake_app(server, app, files)
    for app in made:
        for top in ("repos", "envs", "state"):
            subprocess.run(["rm", "-rf", "--", server.path(top, app)], check=True)


def make_fake_app(server, app, files):
    r = server.as_user(["git", "init", "-q", "--bare", server.path("repos", app)])
    assert r.returncode == 0, r.stderr
    for rel, text in files.items():
        path = server.path(rel)
        r = server.as_user(["mkdir", "-p", os.path.dirname(path)])
        assert r.returncode == 0, r.stderr
        with open(path, "w") as f:
            f.write(text)
        server.chown(path)


def test_another_apps_broken_state_never_fails_a_push_or_config_set(server, fake_app, tmp_path):
    """A garbage line in another app's LIVE_ENV made every push and config:set of every other
    app fail (`LIVE_ENV line 2: ...`, without saying which app): port bookkeeping read every
    app's LIVE_ENV. Ports are kept in state/<app>/ports.json now; what cannot be read of
    another app is skipped with a warning naming it."""
    garbage = "PORT=5999\nthis line is no setting\n"
    fake_app("faultlegacy", {"envs/faultlegacy/LIVE_ENV": garbage})  # no ports.json (older piku)
    fake_app("faultbroken", {"envs/faultbroken/LIVE_ENV": garbage,
                                     "state/faultbroken/ports.json": '{"port": 6001, "web": '})
    fake_app("faultshape", {"envs/faultshape/LIVE_ENV": garbage,
                                    "state/faultshape/ports.json": '{"port": 6002, "web": {"a": 5, "b": "x"}}'})
    fake_app("faultlist", {"state/faultlist/ports.json": "[6003]"})
    others = {rel: server.read(rel) for rel in ("envs/faultlegacy/LIVE_ENV", "envs/faultbroken/LIVE_ENV",
                                                "state/faultbroken/ports.json", "state/faultshape/ports.json")}
    repo = server.deployed(None, "faultmine", tmp_path, web_app("mine v1"))
    server.commit(repo, "v2", {"body.txt": "mine v2\n"})
    r = server.push(repo, "faultmine")
    assert r.returncode == 0, r.stdout + server.logs()
    assert "Traceback" not in r.stdout, r.stdout
    warnings = "\n".join(error_lines(r.stdout))
    for other in ("faultlegacy", "faultbroken", "faultshape", "faultlist"):
        assert f"app {other}:" in warnings, r.stdout
    assert server.wait_http(server.app_port("faultmine"), contains="mine v2")
    r = server.ssh("config:set", "faultmine", "FAULT=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "app faultlegacy:" in r.stderr and "app faultbroken:" in r.stderr, r.stderr
    assert "FAULT=1" in server.read("envs/faultmine/LIVE_ENV")
    # the port the intact part of a broken record names is still treated as taken
    r = server.ssh("config:set", "faultmine", "PORT=6002")
    assert r.returncode != 0 and "PORT 6002 is already used by app faultshape" in r.stderr, r.stderr
    assert {rel: server.read(rel) for rel in others} == others  # nothing of theirs was touched
    assert server.wait_http(server.app_port("faultmine"), contains="mine v2")


# --- item 7: a push killed in the middle of its dependency sync -------------------------------

def make_wheel(version, pad_kib=48):
    """A pure-Python wheel of `slowpkg` (a module saying its version, plus padding that makes its
    download take many chunks): (file name, bytes, METADATA text)."""
    name = f"slowpkg-{version}-py3-none-any.whl"
    info = f"slowpkg-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: slowpkg\nVersion: {version}\n"
    files = {"slowpkg/__init__.py": f'VERSION = "{version}"\n'.encode(),
             "slowpkg/pad.bin": os.urandom(pad_kib * 1024),
             f"{info}/METADATA": metadata.encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: piku-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = ""
    for path, data in files.items():
        digest = urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return name, buf.getvalue(), metadata


class SlowIndex:
    """A package index (PEP 503 pages, PEP 658 metadata) on 127.0.0.1 serving slowpkg 1.0 and
    2.0. With `slow` set, the 2.0 wheel trickles out over `seconds`: `started` is set when that
    download begins, `ended` when it ends, `cut` says whether the client went away first."""

    def __init__(self, seconds=16.0, chunks=32):
        self.wheels = {}
        for version in ("1.0", "2.0"):
            name, data, metadata = make_wheel(version)
            self.wheels[name] = (version, data, metadata)
        self.seconds, self.chunks, self.slow = seconds, chunks, False
        self.started, self.ended, self.cut = threading.Event(), threading.Event(), None
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                index.answer(self)

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/simple/"

    def page(self):
        links = []
        for name, (_, data, metadata) in sorted(self.wheels.items()):
            meta = hashlib.sha256(metadata.encode()).hexdigest()
            links.append(f'<a href="/files/{name}#sha256={hashlib.sha256(data).hexdigest()}" '
                         f'data-core-metadata="sha256={meta}" data-dist-info-metadata="sha256={meta}">{name}</a>')
        return "<!DOCTYPE html><html><body>\n" + "<br>\n".join(links) + "\n</body></html>\n"

    def answer(self, h):
        path = h.path.split("?")[0]
        name = path.rsplit("/", 1)[-1]
        if path in ("/simple/slowpkg/", "/simple/slowpkg"):
            body, kind = self.page().encode(), "text/html"
        elif path.startswith("/files/") and name.endswith(".metadata") and name[:-9] in self.wheels:
            body, kind = self.wheels[name[:-9]][2].encode(), "text/plain"
        elif path.startswith("/files/") and name in self.wheels:
            body, kind = self.wheels[name][1], "application/octet-stream"
        else:
            h.send_error(404)
            return
        h.send_response(200)
        h.send_header("Content-Type", kind)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Cache-Control", "no-store")
        h.end_headers()
        if self.slow and self.wheels.get(name, ("",))[0] == "2.0":
            self.trickle(h, body)
        else:
            h.wfile.write(body)

    def trickle(self, h, body):
        size = len(body) // self.chunks + 1
        self.started.set()
        try:
            for i in range(0, len(body), size):
                h.wfile.write(body[i:i + size])
                h.wfile.flush()
                time.sleep(self.seconds / self.chunks)
            self.cut = False
        except OSError:
            self.cut = True
        finally:
            self.ended.set()

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


SLOW_APP = """import slowpkg


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"slowpkg {slowpkg.VERSION}\\n".encode()]
"""


def requirements(index, version):
    return f"--index-url {index.url}\nslowpkg=={version}\n"


def venv_files(server, app):
    """{path: (size, mtime)} of every file in the app's virtualenvs (venvs/<app>)."""
    out = {}
    for d, _, files in os.walk(server.path("venvs", app)):
        for n in files:
            st = os.lstat(os.path.join(d, n))
            out[os.path.join(d, n)] = (st.st_size, st.st_mtime_ns)
    return out


def test_push_killed_during_its_dependency_sync_leaves_nothing_running(server, tmp_path):
    """`kill -9` of the push hook while uv installs: uv went on (and 38 s later removed packages
    from the venv the next push had deployed), and the next push skipped the sync as
    "unchanged". Now every build tool dies with the hook (PR_SET_PDEATHSIG), a virtualenv
    counts only once its completion marker is written, and the next push builds it anew."""
    with SlowIndex() as index:
        files = {"Procfile": "wsgi: app:application\n", "app.py": SLOW_APP,
                 "requirements.txt": requirements(index, "1.0")}
        repo = server.deployed(None, "faultsync", tmp_path, files)
        port = server.app_port("faultsync")
        server.wait_http(port, contains="slowpkg 1.0")
        index.slow = True
        server.commit(repo, "slowpkg 2.0", {"requirements.txt": requirements(index, "2.0")})
        thread, result = push_in_background(server, repo, "faultsync")
        assert index.started.wait(300), "the push never downloaded slowpkg 2.0\n" + server.logs()
        hook = hook_pid(server, "faultsync")
        children = tree_of(server.uid, hook)
        assert any(os.path.basename(a[1][0]) == "uv" for a in children.values()), children
        os.kill(hook, signal.SIGKILL)
        killed_at = time.monotonic()
        thread.join(120)
        assert result, "the push did not end: a process of the killed hook holds its output open"
        assert result[0].returncode != 0, result[0].stdout
        # the download the killed uv had started was cut off by uv going away, not finished later
        assert index.ended.wait(index.seconds + 30) and index.cut is True, "uv went on downloading"
        left = still_running(children, 10)
        assert not left, f"still running after the hook was killed: {left}"
        half = [n for n in os.listdir(server.path("venvs", "faultsync"))
                if not os.path.exists(server.path("venvs", "faultsync", n, ".piku-venv.json"))]
        assert half, "the killed sync left no half-built virtualenv: the test proves nothing"
        assert server.wait_http(port, contains="slowpkg 1.0")  # the live release serves on

        index.slow = False
        r = server.push(repo, "faultsync")
        assert r.returncode == 0, r.stdout + server.logs()
        assert "Dependencies unchanged" not in r.stdout, r.stdout
        assert "Building a virtualenv" in r.stdout, r.stdout
        server.wait_http(port, contains="slowpkg 2.0")
        venvs = os.listdir(server.path("venvs", "faultsync"))
        assert all(os.path.exists(server.path("venvs", "faultsync", n, ".piku-venv.json")) for n in venvs), venvs
        before = venv_files(server, "faultsync")
        records = json.loads(server.read("state/faultsync/releases.json"))
        assert [r["status"] for r in records][:3] == ["live", "failed", "previous"], records
        assert records[1]["reason"] == "interrupted", records[1]

        # The killed uv would have had its whole download by `seconds` after it started, and
        # written the virtualenv right after: wait until then (and a margin) before the restart.
        # Waiting longer proves nothing more: no process of the killed push is left (above).
        time.sleep(max(0.0, killed_at + index.seconds + 5 - time.monotonic()))
        r = server.ssh("restart", "faultsync")
        assert r.returncode == 0, r.stdout + r.stderr
        status, body = server.http_get(port)
        assert status == 200 and "slowpkg 2.0" in body, (status, body)
        assert venv_files(server, "faultsync") == before


HOLD = """import os, time
d = os.environ["DATA_ROOT"]
with open(os.path.join(d, "started"), "w") as f:
    f.write(str(os.getpid()))
while os.path.exists(os.path.join(d, "hold")):  # a long migration, a slow boot: as long as the test says
    time.sleep(0.1)
"""
PHASES = {  # what a push runs with /bin/sh -c, which forks the command
    "release": web_app("phase v1", procfile="web: python3 web.py\nrelease: python3 hold.py\n", **{"hold.py": HOLD}),
    "trial": web_app("phase v1", procfile="web: python3 hold.py && python3 web.py\n", **{"hold.py": HOLD}),
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_push_killed_during_a_command_it_runs_leaves_nothing_running(server, tmp_path, phase):
    """The release command, or a web app's trial run on a private port (restarted in place,
    no nginx): `/bin/sh -c` forks the command, so with the hook killed the shell died with it but
    the command went on (a migration beside the next push's, a web process on the trial port)
    and held the push's output open."""
    app = f"fault{phase}"
    repo = server.deployed(None, app, tmp_path, PHASES[phase])
    data = server.path("data", app)
    os.unlink(os.path.join(data, "started"))
    with open(os.path.join(data, "hold"), "w"):
        pass
    server.commit(repo, "v2", {"body.txt": "phase v2\n"})
    thread, result = push_in_background(server, repo, app)
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(data, "started")) and time.monotonic() < deadline:
        time.sleep(0.05)
    hook = hook_pid(server, app)
    children = tree_of(server.uid, hook)
    assert any(argv[-1:] == ["hold.py"] for _, argv in children.values()), children
    os.kill(hook, signal.SIGKILL)
    thread.join(120)
    assert result, "the push did not end: a process of the killed hook holds its output open"
    assert result[0].returncode != 0, result[0].stdout
    left = still_running(children, 30)
    assert not left, f"still running after the hook was killed: {left}"
    os.unlink(os.path.join(data, "hold"))
    r = server.push(repo, app)
    assert r.returncode == 0, r.stdout + server.logs()
    server.wait_http(server.app_port(app), contains="phase v2")


# --- item 8: kill -9 of the uWSGI emperor -----------------------------------------------------

def request_loop(server, port, host=None, count=30):
    """`count` requests, one connection each: their (status, body) answers."""
    answers = []
    for _ in range(count):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers={"Host": host} if host else {})
            resp = conn.getresponse()
            answers.append((resp.status, resp.read().decode("utf-8", "replace").strip()))
            conn.close()
        except OSError as e:
            answers.append((None, repr(e)))
    return answers


@pytest.fixture(scope="module")
def other_python(server):
    bindir, minor = find_other_python(system_uwsgi_python())
    with Reachable(bindir):
        yield bindir, minor


def test_killed_emperor_leaves_no_worker_behind(server, other_python, tmp_path):
    """After `kill -9` of the emperor, pyuwsgi's inner masters outlived their vassals and stayed
    on the app's port (reuse-port let the new ones bind beside them): after a push, 17 of 30
    requests got the old body. Inner uWSGIs and web commands die with their vassal now."""
    bindir, minor = other_python
    apps = {  # app: (fixture, files, old body, new body, behind nginx)
        "faultpy": ("uv-wsgi", {"ENV": server.nginx_env("faultpy.piku.test") + f"PYTHON_VERSION={minor}\n"
                                f"PATH={bindir}:/usr/local/bin:/usr/bin:/bin\n"}, "uv-wsgi v1", "uv-wsgi v2"),
        "faultnat": ("uv-wsgi", {}, "uv-wsgi v1", "uv-wsgi v2"),
        "faultweb": (None, {**web_app("faultweb v1"), "ENV": server.nginx_env("faultweb.piku.test")},
                     "faultweb v1", "faultweb v2"),
        "faultbare": (None, web_app("faultbare v1"), "faultbare v1", "faultbare v2"),
    }
    repos = {}

    def entry(app):  # (port, host): a wsgi app behind nginx listens on its unix sockets alone
        behind = "NGINX_SERVER_NAME" in apps[app][1].get("ENV", "")
        return (server.nginx_port, f"{app}.piku.test") if behind else (server.app_port(app), None)
    for app, (fixture, files, old, _) in apps.items():
        repos[app] = server.deployed(fixture, app, tmp_path / app, files)
        server.wait_http(entry(app)[0], host=entry(app)[1], contains=old)
    assert "--uwsgi" in server.vassal_text("faultpy", "wsgi")  # the pyuwsgi mode
    assert "plugin = python3" in server.vassal_text("faultnat", "wsgi")
    emperor = server.procs["emperor"].pid
    workers = tree_of(server.uid, emperor)
    inner = [pid for pid, (_, argv) in workers.items() if "/bin/uwsgi --ini " + server.path("state", "faultpy")
             in " ".join(argv)]
    assert inner, workers  # the test kills what it is about: pyuwsgi's inner uWSGI

    server.kill_emperor()
    left = still_running(workers, 60)
    assert not left, f"outlived the killed emperor: {left}"

    server.start_emperor()
    for app, (fixture, files, old, new) in apps.items():
        server.wait_http(entry(app)[0], host=entry(app)[1], contains=old, timeout=60)
        if fixture:
            text = open(repos[app] / "app.py").read().replace(old, new)
            server.commit(repos[app], new, {"app.py": text})
        else:
            server.commit(repos[app], new, {"body.txt": new + "\n"})
        r = server.push(repos[app], app)
        assert r.returncode == 0, r.stdout + server.logs()
    for app, (_, files, _, new) in apps.items():
        targets = [(server.app_port(app), None)] if app != "faultpy" else []
        if "NGINX_SERVER_NAME" in files.get("ENV", ""):
            server.nginx_settled()
            targets.append((server.nginx_port, f"{app}.piku.test"))
        for port, host in targets:
            answers = request_loop(server, port, host)
            wrong = [a for a in answers if a[0] != 200 or new not in a[1]]
            assert not wrong, f"{app} on {port}: {len(wrong)} of {len(answers)} not {new!r}: {wrong[:5]}"


# --- item 9: a full disk during the checkout --------------------------------------------------

def fill(folder):
    """Write zeros into folder/fill until the filesystem is full."""
    with open(os.path.join(folder, "fill"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_checkout_on_a_full_disk_leaves_nothing_and_the_next_push_works(server, tmp_path):
    """A failed checkout left its staging directory behind, and every later push failed with
    `unable to write file Procfile`, each adding another directory."""
    repo = server.deployed(None, "faultdisk", tmp_path, web_app("disk v1"))
    port = server.app_port("faultdisk")
    server.wait_http(port, contains="disk v1")
    server.commit(repo, "v2", {"body.txt": "disk v2\n", "more.txt": "x" * 65536})
    releases = server.path("releases", "faultdisk")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=256k,mode=0755,uid={server.uid},gid={server.gid}",
                    "piku-test-full", releases], check=True)
    try:
        fill(releases)
        for attempt in (1, 2):
            r = server.push(repo, "faultdisk")
            assert r.returncode != 0, r.stdout
            assert "Traceback" not in r.stdout, r.stdout
            errors = error_lines(r.stdout)
            assert len(errors) == 1 and "could not check the revision out" in errors[0], r.stdout
            assert "no space left in " in errors[0] and "free some disk space" in errors[0], r.stdout
            assert os.listdir(releases) == ["fill"], f"push {attempt} left {os.listdir(releases)}"
        status, body = server.http_get(port)  # the live release's process works on
        assert status == 200 and "disk v1" in body, (status, body)
    finally:
        subprocess.run(["umount", releases], check=True)
    records = json.loads(server.read("state/faultdisk/releases.json"))
    assert [r["status"] for r in records[:3]] == ["failed", "failed", "live"], records
    r = server.push(repo, "faultdisk")
    assert r.returncode == 0, r.stdout + server.logs()
    server.wait_http(port, contains="disk v2")
    records = json.loads(server.read("state/faultdisk/releases.json"))
    kept = {os.path.basename(r["dir"]) for r in records if r["status"] in ("live", "previous", "old")}
    assert set(os.listdir(releases)) == kept, (os.listdir(releases), records)


def test_staging_directories_an_older_piku_left_are_pruned_at_the_next_push(server, tmp_path):
    """A server upgraded from a piku.py whose failed checkouts stayed in releases/<app>: those
    directories (newer than the live release, in no release history) go at the next push."""
    import datetime
    repo = server.deployed(None, "faultold", tmp_path, web_app("old v1"))
    os.unlink(server.path("state", "faultold", "releases.json"))  # as before release histories
    live = os.path.basename(os.path.realpath(server.path("apps", "faultold")))
    later = datetime.datetime.strptime(live[:15], "%Y%m%d-%H%M%S") + datetime.timedelta(minutes=1)
    leftover = server.path("releases", "faultold", later.strftime("%Y%m%d-%H%M%S") + "-" + "ab" * 5)
    r = server.as_user(["sh", "-c", 'mkdir "$1" && echo "web: true" > "$1/Procfile"', "sh", leftover])
    assert r.returncode == 0, r.stderr
    server.commit(repo, "v2", {"body.txt": "old v2\n"})
    r = server.push(repo, "faultold")
    assert r.returncode == 0, r.stdout + server.logs()
    assert "removed 1 directory a failed push left in" in r.stdout, r.stdout
    assert not os.path.exists(leftover)
    assert os.path.isdir(server.path("releases", "faultold", live))  # the release that was live stays
    server.wait_http(server.app_port("faultold"), contains="old v2")


# --- README's "No way in": what another local user can and cannot do --------------------------

PROBE = """import json, os, socket, sys
out = {}
for path in sys.argv[2:]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").close()
        out[path] = "read"
    except OSError as e:
        out[path] = type(e).__name__
for name, addr in (("unix", sys.argv[1]), ("tcp", ("127.0.0.1", int(os.environ["PORT"])))):
    s = socket.socket(socket.AF_UNIX if name == "unix" else socket.AF_INET)
    try:
        s.connect(addr)
        out[name] = "connected"
    except OSError as e:
        out[name] = type(e).__name__
try:
    open(os.environ["VASSAL"], "w").close()
    out["write"] = "written"
except OSError as e:
    out["write"] = type(e).__name__
print(json.dumps(out))
"""


def test_what_another_local_user_can_and_cannot_do(server, tmp_path):
    """Each claim README.md makes about another local user (here: nobody), checked."""
    from harness import SYSTEM_PY
    env = server.nginx_env("faultlocal.piku.test") + "REPO_SECRET=in the repo\n"
    server.deployed("uv-wsgi", "faultlocal", tmp_path, {"ENV": env})
    assert server.ssh("config:set", "faultlocal", "SECRET=set with config:set").returncode == 0
    slot = server.vassal("faultlocal", "wsgi").rsplit(".", 2)[1]
    release = os.path.realpath(server.path("apps", "faultlocal"))
    secret = [server.path("envs", "faultlocal", n) for n in ("ENV", "LIVE_ENV")] + \
        [server.path("state", "faultlocal", "env", n) for n in os.listdir(server.path("state", "faultlocal", "env"))] + \
        [os.path.join(release, "ENV"), server.path("nginx", "faultlocal.key"),
         server.path("data", "faultlocal"), server.path("logs", "faultlocal"),
         server.path("state", "faultlocal", f"slot-{slot}")]
    code = [os.path.join(release, "app.py"), server.path("apps", "faultlocal", "pyproject.toml")]
    env = {"PORT": str(server.app_port("faultlocal")), "VASSAL": server.path("uwsgi-enabled", "faultlocal_x.ini")}
    r = subprocess.run([SYSTEM_PY, "-c", PROBE, server.path("nginx", f"faultlocal.1.{slot}.sock"), *secret, *code],
                       user=65534, group=65534, extra_groups=[], cwd="/", env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert {p: got[p] for p in secret} == {p: "PermissionError" for p in secret}
    assert {p: got[p] for p in code} == {p: "read" for p in code}  # the code, as nginx reads static files
    assert got["unix"] == "PermissionError" and got["write"] == "PermissionError", got
    # a wsgi app behind nginx listens on its unix sockets alone: not even the loopback port is open
    # (a web process's port, or a wsgi app's without a host name, is: README says so)
    assert got["tcp"] == "ConnectionRefusedError", got


SLOW_WSGI = """import time

VERSION = "v1"


def application(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(int(environ.get("QUERY_STRING") or 15))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"slowstop {VERSION}\\n".encode()]
"""


def may_take_sockets_of_own_processes():
    """Can a process take a copy of a socket from another of its user's processes that is not
    its child (pidfd_getfd)? Not under Yama's ptrace_scope 1 or more (Ubuntu's default)."""
    scope = open("/proc/sys/kernel/yama/ptrace_scope").read().strip() if os.path.exists(
        "/proc/sys/kernel/yama/ptrace_scope") else "0"
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return scope == "0" and (major, minor) >= (5, 6)


def test_a_request_on_the_old_release_through_a_switch_on_a_shared_port(server, tmp_path):
    """A wsgi app served on its PORT alone (no nginx): a request still running on the old release
    when the push switches keeps the old worker, and its socket on PORT, alive. The kernel would
    go on handing that socket a share of the new connections, which nobody accepts. piku shuts
    the socket: the push returns at once, every request after it gets the new release, and the
    running request finishes. Where the kernel does not let piku take the socket, the old
    worker is killed after 10 s, and the push says so."""
    repo = server.deployed("uv-wsgi", "slowstop", tmp_path, {"app.py": SLOW_WSGI})
    port = server.app_port("slowstop")
    server.wait_http(port, contains="slowstop v1")
    thread, outcome = request_in_background(port, "/slow")
    server.commit(repo, "v2", {"app.py": SLOW_WSGI.replace('"v1"', '"v2"')})
    t0 = time.monotonic()
    r = server.push(repo, "slowstop")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout
    bodies = {server.http_get(port, timeout=3)[1] for _ in range(20)}
    assert bodies == {"slowstop v2\n"}, (bodies, r.stdout, server.listeners(port))
    thread.join(30)
    if may_take_sockets_of_own_processes():
        assert f"its socket on PORT {port} was closed" in r.stdout, r.stdout
        assert took < 10, (took, r.stdout)
        assert outcome == {"answer": (200, "slowstop v1\n")}, outcome  # (it ran to its end)
    else:
        assert f"the old release still listened on PORT {port}" in r.stdout and "killed slowstop:wsgi.1" in r.stdout, r.stdout
        assert took >= 10, took
        assert "error" in outcome, outcome
    server.ssh("destroy", "slowstop", "--force")


def test_a_request_that_never_ends_on_the_old_release_is_cut_and_leaves_no_process(server, tmp_path):
    """The old workers' graceful stop has an end: a request still running after 25 s is cut by
    uWSGI's own master (worker-reload-mercy), before the emperor gives up on that master at
    30 s; the emperor kills only the master, which would leave the worker running, orphaned."""
    repo = server.deployed("uv-wsgi", "endless", tmp_path, {"app.py": SLOW_WSGI})
    port = server.app_port("endless")
    server.wait_http(port, contains="slowstop v1")
    thread, outcome = request_in_background(port, "/slow?600")
    old = [p for p in server.user_pids() if server.proc_title(p).startswith("endless:wsgi.1 uWSGI worker")]
    assert len(old) == 1, old
    server.commit(repo, "v2", {"app.py": SLOW_WSGI.replace('"v1"', '"v2"')})
    r = server.push(repo, "endless")
    assert r.returncode == 0, r.stdout
    assert {server.http_get(port, timeout=3)[1] for _ in range(10)} == {"slowstop v2\n"}
    thread.join(40)
    assert "error" in outcome, outcome  # (cut at 25 s, not at 600)
    deadline = time.monotonic() + 10  # (its master reaps it, then exits)
    while os.path.exists(f"/proc/{old[0]}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{old[0]}"), open(f"/proc/{old[0]}/status").read()
    server.ssh("destroy", "endless", "--force")

