"""Issue 13: a server the original piku runs is switched to piku.py exactly as docs/INSTALL.md
says, and back again. The original (../shared/upstream/piku.py, run as it is) deploys five apps
of the kinds it builds; request loops through nginx run during the switch and during each app's
first push by piku.py (none may fail); ps, config, logs, data, cron and the worker are checked
on the way; then `downgrade` puts the original back, and it serves, deploys and runs cron, also
after an emperor restart. One server for the whole scenario: the tests run in order."""
import grp
import http.client
import os
import subprocess
import threading
import time

import pytest

from harness import REPO, SYSTEM_PY, USER, Reachable, Server, find_other_python, system_uwsgi_python, wait_for

UPSTREAM = os.path.join(os.path.dirname(REPO), "shared", "upstream", "piku.py")
SERVED = ("mwsgi", "mgun", "muv", "mstatic")  # behind nginx, hammered during the switch


def app_files(server, app, version):
    """The five apps of the scenario, at a version (its number is in every answer)."""
    v = f"{app} v{version}"
    # the served apps take a moment to answer: a request is in flight whenever a worker stops
    wsgi = ("import os, sys, time\nimport markupsafe\n\n\ndef application(environ, start_response):\n"
            "    time.sleep(0.2)\n"
            "    seed = open(os.path.join(os.environ['DATA_ROOT'], 'seed.txt')).read().strip()\n"
            "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
            f"    return [('{v} db=%s seed=%s python=%d.%d.%d\\n' % (os.environ.get('DB_URL'), seed,"
            " *sys.version_info[:3])).encode()]\n")
    web = ("import os, sys\nfrom http.server import BaseHTTPRequestHandler, ThreadingHTTPServer\nimport markupsafe\n\n\n"
           "class H(BaseHTTPRequestHandler):\n    def do_GET(self):\n"
           f"        body = ('{v} python=%d.%d.%d\\n' % sys.version_info[:3]).encode()\n"
           "        self.send_response(200)\n        self.send_header('Content-Length', str(len(body)))\n"
           "        self.end_headers()\n        self.wfile.write(body)\n\n    def log_message(self, *a):\n"
           "        print('request', self.path, flush=True)\n\n\n"
           "ThreadingHTTPServer((os.environ['BIND_ADDRESS'], int(os.environ['PORT'])), H).serve_forever()\n")
    gun = ("import time\n\n\ndef application(environ, start_response):\n    time.sleep(0.2)\n"
           "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
           f"    return [b'{v}\\n']\n")
    worker = ("import os, time\nwhile True:\n"
              "    with open(os.path.join(os.environ['DATA_ROOT'], 'worker.txt'), 'w') as f:\n"
              f"        f.write('{v} %f\\n' % time.time())\n    print('tick', flush=True)\n    time.sleep(0.5)\n")
    cron = ("import os, time\nwith open(os.path.join(os.environ['DATA_ROOT'], 'cron.log'), 'a') as f:\n"
            f"    f.write('{v} %f\\n' % time.time())\n")
    return {
        "mwsgi": {"Procfile": "wsgi: app:application\n", "requirements.txt": "markupsafe\n", "app.py": wsgi,
                  "ENV": server.nginx_env("mwsgi.test")},
        "mgun": {"Procfile": "web: gunicorn -b $BIND_ADDRESS:$PORT --workers 1 app:application\n",
                 "requirements.txt": "gunicorn\n", "app.py": gun, "ENV": server.nginx_env("mgun.test")},
        "muv": {"Procfile": "web: python server.py\n", "server.py": web, "ENV": server.nginx_env("muv.test"),
                "pyproject.toml": '[project]\nname = "muv"\nversion = "0.1.0"\nrequires-python = ">=3.9"\n'
                                  'dependencies = ["markupsafe"]\n'},
        "mstatic": {"Procfile": "static: public\n", "public/index.html": f"{v}\n",
                    "ENV": server.nginx_env("mstatic.test")},
        "mjobs": {"Procfile": "worker: python3 worker.py\ncron1: * * * * * python3 cronjob.py\n",
                  "requirements.txt": "", "worker.py": worker, "cronjob.py": cron},
    }[app]


class Loops:
    """GET / of every served app through nginx (by name), in a thread each, for as long as the
    scenario runs; every answer that is not the app's own 200 is a failure of the current phase."""

    def __init__(self, server):
        self.server, self.phase, self.stop = server, "start", threading.Event()
        self.ok, self.failures = {}, []
        self.threads = [threading.Thread(target=self.loop, args=(app,), daemon=True) for app in SERVED]

    def loop(self, app):
        while not self.stop.is_set():
            phase = self.phase
            try:
                conn = http.client.HTTPConnection(self.server.nginx_ip, 80, timeout=10)
                conn.request("GET", "/", headers={"Host": f"{app}.test"})
                resp = conn.getresponse()
                body = resp.read().decode("utf-8", "replace")
                conn.close()
                if resp.status == 200 and body.startswith(f"{app} v"):
                    self.ok[(phase, app)] = self.ok.get((phase, app), 0) + 1
                else:
                    self.failures.append((phase, app, resp.status, body[:100]))
            except OSError as e:
                self.failures.append((phase, app, None, repr(e)))
            time.sleep(0.01)

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def during(self, phase):
        self.phase = phase
        return self

    def assert_none_failed(self, phase):
        failed = [f for f in self.failures if f[0] == phase]
        assert not failed, f"{len(failed)} failed requests during {phase}: {failed[:5]}"
        for app in SERVED:
            assert self.ok.get((phase, app)), f"no request to {app} was answered during {phase}"

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(15)


@pytest.fixture(scope="module")
def old():
    """A server set up by the original piku, with nginx as root on port 80 of a loopback address
    of its own (as it must be for the original's configs) and PIKU_ROOT ~/.piku (its ssh
    commands know no other). Its own test user: the session's server runs beside it."""
    assert os.path.exists(UPSTREAM), f"the original piku is missing: {UPSTREAM} (see ../shared/upstream/README.md)"
    srv = Server(piku_source=UPSTREAM, root_nginx=True, root="~/.piku", user=f"{USER}-orig")
    pin = os.path.join(srv.home, ".config", "uv", ".python-version")
    if os.path.exists(pin):
        os.unlink(pin)  # (an earlier run that was killed left it)
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def repos(old, tmp_path_factory):
    base = tmp_path_factory.mktemp("migration")
    return {app: old.make_app(None, base / app, app_files(old, app, 1)) for app in SERVED + ("mjobs",)}


@pytest.fixture(scope="module")
def loops(old):
    lp = Loops(old)
    yield lp
    lp.finish()


def push(server, repos, app, version):
    server.commit(repos[app], f"v{version}", app_files(server, app, version))
    r = server.push(repos[app], app)
    assert r.returncode == 0, r.stdout + server.logs()
    return r.stdout


def answer(server, app, contains, timeout=60):
    return server.wait_http(80, host=f"{app}.test", contains=contains, timeout=timeout)[1]


def as_piku(server, *argv):
    r = server.as_user(list(argv))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_the_original_deploys_five_apps(old, repos):
    for app in SERVED + ("mjobs",):
        r = old.push(repos[app], app)
        assert r.returncode == 0, r.stdout
    as_piku(old, "sh", "-c", f"echo seeded > {old.path('data', 'mwsgi', 'seed.txt')}")
    # the original's forced command runs through a shell: quoted, the `$` reaches piku
    r = old.ssh("config:set", "mwsgi", "'DB_URL=sqlite:///$DATA_ROOT/app.db'")
    assert r.returncode == 0, r.stdout + r.stderr
    body = answer(old, "mwsgi", f"db=sqlite:///{old.path('data', 'mwsgi')}/app.db")  # (expanded)
    assert "mwsgi v1" in body and "seed=seeded" in body
    answer(old, "mgun", "mgun v1")
    answer(old, "muv", "muv v1")
    answer(old, "mstatic", "mstatic v1")
    assert os.path.exists(old.path("nginx", "mwsgi.sock")) and old.vassal("mwsgi", "wsgi").endswith("mwsgi_wsgi.1.ini")
    assert os.path.exists(old.path("envs", "mwsgi", "bin", "activate_this.py"))  # a real virtualenv
    # (the worker creates the file, then writes it: wait for what it says, not for the file)
    wait_for("the original's worker of v1", lambda: "mjobs v1" in (old.read("data/mjobs/worker.txt") or ""), 30)


def test_switch_as_install_md_says(old, loops):
    """docs/INSTALL.md "Migrating from the original piku", step by step, as root."""
    loops.start().during("the switch")
    time.sleep(1)
    group = grp.getgrgid(old.gid).gr_name
    subprocess.run(["tar", "czf", os.path.join(old.base, "piku-backup.tgz"), "-C", old.home, ".piku",
                    "-C", old.base, "piku.py"], check=True)
    as_piku(old, SYSTEM_PY, "-c", "import click")
    subprocess.run(["install", "-o", old.user, "-g", group, "-m", "0755", os.path.join(REPO, "piku.py"), old.piku_py],
                   check=True)
    out = as_piku(old, SYSTEM_PY, old.piku_py, "setup")
    # setup sees the emperor the original's services started: no units to install beside it
    assert "is up already" in out and "[Service]" not in out, out
    time.sleep(2)
    loops.assert_none_failed("the switch")
    # a key added from now on gets piku.py's own line (its launcher): the way back converts it
    key = os.path.join(old.priv, "id_second")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "second", "-f", key], check=True)
    pub = os.path.join(old.base, "second.pub")
    subprocess.run(["cp", key + ".pub", pub], check=True)
    os.chmod(pub, 0o644)
    as_piku(old, SYSTEM_PY, old.piku_py, "setup:ssh", pub)
    old.second_key = key


def test_before_any_push_piku_py_sees_what_the_original_runs(old):
    ps = {app: ssh_ok(old, "ps", app) for app in SERVED + ("mjobs",)}
    assert "wsgi: 1 configured, 1 running (running)" in ps["mwsgi"], ps
    assert "web: 1 configured, 1 running (running)" in ps["mgun"] and "web: 1 configured, 1 running" in ps["muv"], ps
    assert "worker: 1 configured, 1 running (running)" in ps["mjobs"], ps
    assert "cron1: 1 configured, 1 running (running)" in ps["mjobs"], ps
    assert ps["mstatic"].strip() == "static: public/ served by nginx (no process)", ps  # not `static: 1 configured`
    assert ssh_ok(old, "config:get", "mwsgi", "DB_URL").strip() == "sqlite:///$DATA_ROOT/app.db"  # as it was set
    assert "tick" in ssh_ok(old, "logs", "mjobs", "worker", "-n", "5")


def test_first_push_of_each_app_loses_no_request(old, repos, loops, newer_python_by_default):
    """An unpinned app keeps the Python its live virtualenv has, though uv's default is now
    another one; `$DATA_ROOT` in a config:set value still reaches the app expanded."""
    outputs = {}
    for app in SERVED + ("mjobs",):
        loops.during(f"the first push of {app}")
        outputs[app] = push(old, repos, app, 2)
        if app in SERVED:
            answer(old, app, f"{app} v2")
        time.sleep(1)
        loops.assert_none_failed(f"the first push of {app}")
    system = system_uwsgi_python_full()
    for app in ("mwsgi", "mgun", "muv", "mjobs"):
        assert f"Using Python {system} (from the live release: no version asked for)" in outputs[app], outputs[app]
        assert "built by the original piku" in outputs[app]
    assert f"python={system}" in answer(old, "muv", "muv v2")
    body = answer(old, "mwsgi", "mwsgi v2")
    assert f"db=sqlite:///{old.path('data', 'mwsgi')}/app.db" in body and "seed=seeded" in body
    assert os.path.islink(old.path("apps", "mwsgi")) and old.vassal("mwsgi", "wsgi").endswith(".a.ini")
    wait_for("the worker of v2", lambda: "mjobs v2" in (old.read("data/mjobs/worker.txt") or ""), 30)
    wait_for("a cron run of v2", lambda: "mjobs v2" in (old.read("data/mjobs/cron.log") or ""), 75)
    for app in SERVED + ("mjobs",):
        assert "running (running)" in ssh_ok(old, "ps", app) or app == "mstatic"


def test_every_app_deploys_again(old, repos, loops):
    loops.during("the second pushes")
    for app in SERVED + ("mjobs",):
        push(old, repos, app, 3)
        if app in SERVED:
            answer(old, app, f"{app} v3")
    wait_for("the worker of v3", lambda: "mjobs v3" in (old.read("data/mjobs/worker.txt") or ""), 30)
    loops.assert_none_failed("the second pushes")


# --- the way back ---------------------------------------------------------------------------

def test_downgrade_refuses_what_the_original_cannot_read(old):
    """A `$$` (piku.py's literal `$`) or a file that is not the original piku: nothing changes."""
    original = original_from_backup(old)
    ssh_ok(old, "config:set", "mwsgi", "'PRICE=$$APP costs $5 in $APP'")
    assert 'PRICE="$APP costs $5 in mwsgi"' in ssh_ok(old, "config:live", "mwsgi")
    before, piku_py = old.tree(), open(old.piku_py).read()
    r = old.as_user([SYSTEM_PY, old.piku_py, "downgrade", original])
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "PRICE" in r.stderr and "$$" in r.stderr, r.stderr
    r = old.as_user([SYSTEM_PY, old.piku_py, "downgrade", os.path.join(REPO, "piku.py")])
    assert r.returncode != 0 and "does not run as the original piku.py" in r.stderr, r.stderr
    assert old.tree() == before and open(old.piku_py).read() == piku_py
    ssh_ok(old, "config:unset", "mwsgi", "PRICE")


def test_downgrade_puts_the_original_back(old, loops, newer_python_by_default):
    """As docs/INSTALL.md says: the original piku.py from the backup, `downgrade` with it."""
    os.unlink(newer_python_by_default)  # (the original would pick it for a pyproject app)
    loops.during("the downgrade")
    out = as_piku(old, SYSTEM_PY, old.piku_py, "downgrade", original_from_backup(old))
    time.sleep(2)
    loops.assert_none_failed("the downgrade")
    loops.finish()
    assert open(old.piku_py).read() == open(UPSTREAM).read()
    for app in SERVED + ("mjobs",):
        assert f"{app}: into the original piku's formats" in out
        assert os.path.isdir(os.path.join(old.path("apps", app), ".git")) and not os.path.islink(old.path("apps", app))
        assert os.path.exists(old.path("repos", app, "hooks", "post-receive"))
        assert not os.path.exists(old.path("repos", app, "hooks", "pre-receive"))
    assert os.path.exists(old.path("envs", "mwsgi", "bin", "activate_this.py"))
    assert not os.path.islink(old.path("envs", "mwsgi", "bin"))
    assert "exec-worker" not in "".join(open(os.path.join(old.path("uwsgi-enabled"), n)).read()
                                        for n in os.listdir(old.path("uwsgi-enabled")))
    assert '"' not in old.read("envs/mwsgi/ENV")  # (no JSON quoting: the original would keep it)
    assert "wsgi:1" in ssh_ok(old, "ps", "mwsgi")  # the original's ps
    for app in SERVED:
        answer(old, app, f"{app} v3")


def test_the_original_deploys_and_runs_cron(old, repos):
    """Pushed with the key piku.py added (its line converted by downgrade)."""
    old.key = old.second_key
    since = time.time()
    for app in SERVED + ("mjobs",):
        push(old, repos, app, 4)
        if app in SERVED:
            answer(old, app, f"{app} v4")
    assert f"db=sqlite:///{old.path('data', 'mwsgi')}/app.db" in answer(old, "mwsgi", "mwsgi v4")
    wait_for("the original's worker of v4", lambda: "mjobs v4" in (old.read("data/mjobs/worker.txt") or ""), 30)
    wait_for("a cron run under the original", lambda: cron_runs_since(old, since), 75)


def test_after_an_emperor_restart_the_original_still_serves(old):
    old.restart_emperor()
    since = time.time()
    for app in SERVED:
        answer(old, app, f"{app} v4")
    wait_for("the worker after the restart", lambda: worker_wrote_since(old, since), 30)
    wait_for("a cron run after the restart", lambda: cron_runs_since(old, since), 75)


# --- helpers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def newer_python_by_default(old):
    """uv's default Python for the piku user is now another one (a global pin, as after `uv
    python pin --global` for another app): an unpinned app must keep its own."""
    bindir, minor = find_other_python(system_uwsgi_python())
    pin = os.path.join(old.home, ".config", "uv", ".python-version")
    with Reachable(bindir):
        as_piku(old, "sh", "-c", f'echo "{bindir}/python{minor}" > "{pin}"')
        try:
            yield pin
        finally:
            if os.path.exists(pin):
                os.unlink(pin)


def system_uwsgi_python_full():
    return subprocess.run([f"/usr/bin/python{system_uwsgi_python()}", "-c",
                           "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def original_from_backup(old):
    """The original piku.py, taken out of the backup made before the switch."""
    d = os.path.join(old.base, "original")
    if not os.path.exists(os.path.join(d, "piku.py")):
        os.makedirs(d)
        subprocess.run(["tar", "xzf", os.path.join(old.base, "piku-backup.tgz"), "-C", d, "piku.py"], check=True)
        os.chmod(d, 0o755)
    return os.path.join(d, "piku.py")


def ssh_ok(server, *args):
    r = server.ssh(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def cron_runs_since(server, since):
    return any(float(line.split()[-1]) > since for line in (server.read("data/mjobs/cron.log") or "").splitlines())


def worker_wrote_since(server, since):
    text = server.read("data/mjobs/worker.txt") or ""
    return bool(text.strip()) and float(text.split()[-1]) > since
