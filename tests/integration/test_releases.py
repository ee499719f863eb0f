"""Issue 11: releases that prove themselves. Every release has its own virtualenv; serving
workers are blue/green (the new ones start beside the live ones and must answer a real HTTP
request before any traffic moves); `releases` and `rollback`; every operation that changes
workers is one transaction."""
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time

import pytest

from harness import REPO, Reachable, find_other_python, system_uwsgi_python, wait_for
from test_zero_downtime import Hammer

APP_PY = '''import os
import markupsafe


def application(environ, start_response):
    {body}
'''
OK_BODY = ("start_response('200 OK', [('Content-Type', 'text/plain')])\n"
           "    return [f'{tag} markupsafe={{markupsafe.__version__}}'.encode()]")


def wsgi_app(tag, body=None):
    """A wsgi app whose body says its tag and the markupsafe version it imported."""
    return APP_PY.format(body=body or OK_BODY.format(tag=tag))


PYPROJECT = ('[project]\nname = "rel"\nversion = "0.1.0"\nrequires-python = ">=3.9"\n'
             'dependencies = [{deps}]\n')


def files(tag="v1", deps='"markupsafe"', env="", **extra):
    out = {"Procfile": "wsgi: app:application\n", "app.py": wsgi_app(tag),
           "pyproject.toml": PYPROJECT.format(deps=deps), "ENV": env}
    out.update(extra)
    return out


def push_ok(server, repo, app):
    r = server.push(repo, app)
    assert r.returncode == 0, r.stdout + server.logs()
    return r.stdout


def push_refused(server, repo, app, *expected):
    r = server.push(repo, app)
    assert r.returncode != 0, r.stdout
    for text in expected:
        assert text in r.stdout, r.stdout
    return r.stdout


def no_failures(h):
    assert not h.failures, f"{len(h.failures)} of {h.ok + len(h.failures)} failed: {h.failures[:5]}\n" + h.server.logs()
    assert h.ok > 10


def releases(server, app):
    r = server.ssh("releases", app)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


# -- a broken release never takes traffic ------------------------------------------------------

@pytest.mark.parametrize("nginx", [False, True])
def test_a_release_that_answers_500_or_is_asgi_is_refused_and_v1_serves_throughout(server, tmp_path, nginx):
    app = f"broken{'ngx' if nginx else 'port'}"
    host = f"{app}.piku.test"
    env = "PIKU_HEALTH_TIMEOUT=4\n" + (server.nginx_env(host) if nginx else "")
    repo = server.deployed(None, app, tmp_path, files(env=env))
    port = server.app_port(app)
    target = dict(host=host) if nginx else dict(port=port)
    server.wait_http(server.nginx_port if nginx else port, host=host if nginx else None, contains="v1")
    old = server.rev(repo)
    raising = wsgi_app("v2", "raise RuntimeError('v2 is broken')")
    asgi = "async def application(scope, receive, send):\n    pass\n"
    for body, hint in ((raising, "GET / answered 500"), (asgi, "ASGI")):
        server.commit(repo, "broken", {"app.py": body})
        with Hammer(server, **target) as h:
            out = push_refused(server, repo, app, "failed their health check", hint,
                               "the push is rejected; the live release serves on")
        no_failures(h)
        assert set(h.bodies) == {"v1 markupsafe=" + h_version(h)}, h.bodies
        assert server.remote_rev(app) == old
        assert "failed:" in "\n".join(releases(server, app))
        server.git(repo, "reset", "-q", "--hard", old)
    status, body = server.http_get(server.nginx_port, host=host) if nginx else server.http_get(port)
    assert status == 200 and body.startswith("v1"), body


def h_version(h):
    return next(iter(h.bodies)).split("markupsafe=")[1]


def test_an_app_without_a_root_page_or_only_redirecting_deploys_and_the_check_can_be_tightened(server, tmp_path):
    not_found = wsgi_app("x", "start_response('404 Not Found', [])\n    return [b'nothing here']")
    repo = server.deployed(None, "noroot", tmp_path, files(**{"app.py": not_found}))
    redirect = wsgi_app("x", "start_response('301 Moved', [('Location', '/elsewhere')])\n    return [b'']")
    server.commit(repo, "redirect", {"app.py": redirect})
    push_ok(server, repo, "noroot")
    assert server.http_get(server.app_port("noroot"))[0] == 301
    server.commit(repo, "strict", {"ENV": "PIKU_HEALTHCHECK_STATUS=200\nPIKU_HEALTH_TIMEOUT=3\n"})
    push_refused(server, repo, "noroot", "GET / answered 301")
    health = wsgi_app("x", "ok = environ['PATH_INFO'] == '/health'\n"
                           "    start_response('200 OK' if ok else '404 Not Found', [])\n    return [b'fine']")
    server.commit(repo, "health path", {"app.py": health, "ENV": "PIKU_HEALTHCHECK_STATUS=200\n"
                                        "PIKU_HEALTHCHECK_PATH=/health\n"})
    out = push_ok(server, repo, "noroot")
    assert "health check passed" in out and "GET /health" in out, out
    r = server.ssh("config:set", "noroot", "PIKU_HEALTHCHECK_STATUS=abc")
    assert r.returncode != 0 and "PIKU_HEALTHCHECK_STATUS" in r.stderr


# -- immutable virtualenvs ----------------------------------------------------------------------

def test_a_v1_worker_started_during_a_failing_build_imports_v1s_packages(server, tmp_path):
    """Every request makes uWSGI start a new v1 worker (max-requests 1) while v2, with another
    markupsafe, builds and then fails its release command: each of them imports v1's markupsafe."""
    repo = server.deployed(None, "respawn", tmp_path, files(env="UWSGI_MAX_REQUESTS=1\n"))
    port = server.app_port("respawn")
    v1 = server.wait_http(port, contains="v1")[1].split("markupsafe=")[1].split()[0]
    assert v1 != "2.1.5"
    server.commit(repo, "v2", {"pyproject.toml": PYPROJECT.format(deps='"markupsafe==2.1.5"'),
                               "Procfile": "wsgi: app:application\nrelease: sleep 2; exit 1\n",
                               "app.py": wsgi_app("v2")})
    with Hammer(server, port=port) as h:
        out = push_refused(server, repo, "respawn", "release command failed")
    assert "+ markupsafe==2.1.5" in out
    no_failures(h)
    assert set(h.bodies) == {f"v1 markupsafe={v1}"}, h.bodies


def test_an_unchanged_dependency_set_shares_the_virtualenv_and_a_release_reports_its_disk(server, tmp_path):
    repo = server.deployed(None, "share", tmp_path, files())
    first = os.path.realpath(server.path("envs", "share", ".live"))
    server.commit(repo, "code only", {"app.py": wsgi_app("v2")})
    push_ok(server, repo, "share")
    assert os.path.realpath(server.path("envs", "share", ".live")) == first
    server.commit(repo, "a dependency", {"pyproject.toml": PYPROJECT.format(deps='"markupsafe", "six"')})
    push_ok(server, repo, "share")
    assert os.path.realpath(server.path("envs", "share", ".live")) != first
    lines = releases(server, "share")
    assert re.search(r"M code \+ [0-9.]+M venv +live$", lines[0]), lines
    assert "(venv shared)" in lines[1] and "previous" in lines[1], lines
    assert server.ssh("config:set", "share", "X=1").returncode == 0
    assert releases(server, "share") == lines  # the same release goes on: the one before stays previous


# -- releases and rollback ----------------------------------------------------------------------

def test_rollback_after_a_dependency_change_and_a_push_after_it(server, tmp_path):
    repo = server.deployed(None, "rollme", tmp_path, files(deps='"markupsafe==2.1.5"',
                                                           env=server.nginx_env("rollme.piku.test")))
    host = "rollme.piku.test"
    server.wait_http(server.nginx_port, host=host, contains="v1 markupsafe=2.1.5")
    server.commit(repo, "v2", {"pyproject.toml": PYPROJECT.format(deps='"markupsafe==3.0.2"'), "app.py": wsgi_app("v2")})
    push_ok(server, repo, "rollme")
    server.wait_http(server.nginx_port, host=host, contains="v2 markupsafe=3.0.2")
    lines = releases(server, "rollme")
    v1_id, v2_id = lines[1].split()[0], lines[0].split()[0]
    with Hammer(server, host=host) as h:
        t0 = time.monotonic()
        r = server.ssh("rollback", "rollme")
        took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Rolled back rollme to {v1_id}" in r.stdout and "migrations are not undone" in r.stderr, r.stdout + r.stderr
    no_failures(h)
    status, body = server.http_get(server.nginx_port, host=host)
    assert status == 200 and body.startswith("v1 markupsafe=2.1.5"), body  # when rollback returns
    lines = releases(server, "rollme")
    assert lines[1].startswith(v1_id) and f"live (rollback from {v2_id})" in lines[1], lines
    assert lines[0].startswith(v2_id) and lines[0].endswith("previous"), lines
    assert os.path.realpath(server.path("apps", "rollme")) == server.path("releases", "rollme", v1_id)
    assert took < 30
    # the server's branch still names the newest pushed commit; a push builds on it as usual
    assert server.remote_rev("rollme") == server.rev(repo)
    server.commit(repo, "v3", {"app.py": wsgi_app("v3")})
    push_ok(server, repo, "rollme")
    server.wait_http(server.nginx_port, host=host, contains="v3 markupsafe=3.0.2")
    # rollback goes to the release that served before (v1, from the rollback), not to v2, which
    # is below v3 in the list; a second rollback undoes the first
    for want in ("v1 markupsafe=2.1.5", "v3 markupsafe=3.0.2"):
        r = server.ssh("rollback", "rollme")
        assert r.returncode == 0, r.stdout + r.stderr
        assert server.http_get(server.nginx_port, host=host)[1].startswith(want), r.stdout
    r = server.ssh("rollback", "rollme", "no-such-release")
    assert r.returncode != 0 and "no release no-such-release of rollme" in r.stderr


def test_rollback_to_a_release_built_with_another_python(server, tmp_path):
    bindir, minor = find_other_python(system_uwsgi_python())
    with Reachable(bindir):
        path = f"PATH={bindir}:/usr/local/bin:/usr/bin:/bin\n"
        repo = server.deployed(None, "rollpy", tmp_path, files(env=path + f"PYTHON_VERSION={minor}\n"))
        port = server.app_port("rollpy")
        server.commit(repo, "system python", {"ENV": path + f"PYTHON_VERSION={system_uwsgi_python()}\n",
                                              "app.py": wsgi_app("v2")})
        push_ok(server, repo, "rollpy")
        assert f"py {system_uwsgi_python()}" in releases(server, "rollpy")[0]
        with Hammer(server, port=port) as h:
            r = server.ssh("rollback", "rollpy")
        assert r.returncode == 0, r.stdout + r.stderr
        no_failures(h)
        assert server.http_get(port)[1].startswith("v1"), server.http_get(port)
        r = server.ssh("run", "rollpy", "python", "-c", "'import sys; print(sys.version_info[:2])'")
        assert r.stdout.strip() == str(tuple(int(x) for x in minor.split("."))), r.stdout


def test_rollback_to_a_pruned_release_is_refused_and_changes_nothing(server, tmp_path):
    repo = server.deployed(None, "rollgone", tmp_path, files(env="PIKU_RELEASES_KEPT=1\n"))
    for tag in ("v2", "v3"):
        server.commit(repo, tag, {"app.py": wsgi_app(tag),
                                  "pyproject.toml": PYPROJECT.format(deps='"markupsafe", "six"' if tag == "v2" else
                                                                     '"markupsafe"')})
        push_ok(server, repo, "rollgone")
    lines = releases(server, "rollgone")
    assert lines[-1].endswith("pruned"), lines
    before = server.tree()
    r = server.ssh("rollback", "rollgone", lines[-1].split()[0])
    assert r.returncode != 0 and "was pruned (PIKU_RELEASES_KEPT)" in r.stderr, r.stderr
    assert server.tree() == before
    assert server.http_get(server.app_port("rollgone"))[1].startswith("v3")


# -- scaling --------------------------------------------------------------------------------

def test_ps_scale_to_workers_that_fail_is_undone(server, tmp_path):
    procfile = ("web: python3 server.py\n"
                "worker: if [ \"$PROC_INDEX\" = 1 ]; then exec sleep 600; else echo index $PROC_INDEX fails; exit 1; fi\n")
    server.deployed("kinds", "scalefail", tmp_path, {"Procfile": procfile})
    scaling = server.read("envs/scalefail/SCALING")
    r = server.ssh("ps:scale", "scalefail", "worker=2")
    assert r.returncode != 0 and "worker.2: its command kept exiting" in r.stderr, r.stdout + r.stderr
    assert server.read("envs/scalefail/SCALING") == scaling
    assert server.vassal("scalefail", "worker", 1) and not server.vassal("scalefail", "worker", 2)
    deadline = time.monotonic() + 20
    while "worker: 1 configured, 1 running (running)" not in server.ssh("ps", "scalefail").stdout:
        assert time.monotonic() < deadline, server.ssh("ps", "scalefail").stdout
        time.sleep(0.5)


def test_a_restart_whose_new_workers_fail_is_undone_and_the_running_ones_serve_on(server, tmp_path):
    """`restart` goes through the switch: the new workers must pass the health check first. Here
    they cannot load the app (a file in DATA_ROOT, written after the deploy, breaks the import):
    the command fails, the running workers never stopped, and 0 requests failed."""
    host = "restartfail.piku.test"
    app_py = ("import os\n"
              "if os.path.exists(os.path.join(os.environ['DATA_ROOT'], 'broken')):\n"
              "    raise RuntimeError('broken on purpose')\n\n" + wsgi_app("v1"))
    server.deployed(None, "restartfail", tmp_path, files(env=server.nginx_env(host), **{"app.py": app_py}))
    server.wait_http(server.nginx_port, host=host, contains="v1")
    link = server.read_link("nginx/restartfail.1.live.sock")
    r = server.ssh("run", "restartfail", "python3", "-c",  # (ssh joins its arguments: one word, quoted)
                   shlex.quote("import os; open(os.path.join(os.environ['DATA_ROOT'], 'broken'), 'w').close()"))
    assert r.returncode == 0, r.stdout + r.stderr
    with Hammer(server, host) as h:
        r = server.ssh("restart", "restartfail")
    assert r.returncode == 1 and "broken on purpose" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "Restarted" not in r.stdout
    no_failures(h)
    assert server.read_link("nginx/restartfail.1.live.sock") == link  # traffic never moved
    r = server.ssh("run", "restartfail", "python3", "-c",
                   shlex.quote("import os; os.unlink(os.path.join(os.environ['DATA_ROOT'], 'broken'))"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = server.ssh("restart", "restartfail")
    assert r.returncode == 0 and "Restarted restartfail" in r.stdout, r.stdout + r.stderr
    assert server.read_link("nginx/restartfail.1.live.sock") != link


def test_web_scaled_to_three_behind_nginx(server, tmp_path):
    host = "webn.piku.test"
    server.deployed("kinds", "webn", tmp_path, {"ENV": server.nginx_env(host)})
    server.wait_http(server.nginx_port, host=host)
    with Hammer(server, host=host) as h:
        r = server.ssh("ps:scale", "webn", "web=3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not h.failures, h.failures[:5]
    ports = json.loads(server.read("state/webn/ports.json"))["web"]
    live = json.loads(server.read("state/webn/live.json"))["slot"]
    assert len(ports[live]) == 3
    conf = server.read("nginx/webn.conf")
    for n, p in enumerate(ports[live], 1):  # nginx reaches each instance through its router's link
        assert f"server unix:{server.path('nginx', f'webn.web{n}.live.sock')} max_fails=0;" in conf
        assert server.read_link(f"nginx/webn.web{n}.live.sock") == f"webn.web{n}.{live}.sock"
        assert json.loads(server.http_get(p)[1])["PORT"] == str(p)
    assert not os.path.lexists(server.path("nginx", "webn.web4.live.sock"))
    seen = {json.loads(server.http_get(server.nginx_port, host=host)[1])["PORT"] for _ in range(30)}
    assert len(seen) > 1, seen  # nginx balances over them
    assert "web: 3 configured, 3 running" in server.ssh("ps", "webn").stdout
    r = server.ssh("ps:scale", "webn", "web=1")
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(server.path("nginx", "webn.web2.live.sock"))  # (instances scaled away)
    r = server.ssh("config:unset", "webn", "NGINX_SERVER_NAME")
    assert r.returncode == 0, r.stderr  # (web=1: allowed without nginx)


def test_repeated_switches_of_a_web_app_are_never_throttled_by_the_emperor(server, tmp_path):
    """A web vassal never declares itself loyal to the emperor (it serves no uWSGI request), and
    the emperor delays each start of a name that stopped unloyal by one second more than the
    last: slots a and b reused would make every switch slower, until one times out."""
    host = "webthr.piku.test"
    server.deployed("kinds", "webthr", tmp_path, {"ENV": server.nginx_env(host)})
    names = set()
    for _ in range(6):
        r = server.ssh("restart", "webthr")
        assert r.returncode == 0, r.stdout + r.stderr
        names.add(os.path.basename(server.vassal("webthr", "web")))
    log = [l for l in server.read("uwsgi/uwsgi.log").splitlines() if "webthr" in l]
    assert not [l for l in log if "throttling" in l or "bad behaving" in l], log[-10:]
    assert len(names) == 6, names  # a new name each time


def test_the_old_web_workers_stop_after_the_push_returns_and_the_next_command_waits_for_them(server, tmp_path):
    """Behind nginx, a `web` switch returns once the new release answers by name; the old
    workers stop a moment later, in the background (nginx's workers with the old config take
    requests for ~100 ms more). The app's lock is held until they are gone: a command right
    after the push waits for that silently, and then exactly one web vassal and master run."""
    host = "webbg.piku.test"
    repo = server.deployed("kinds", "webbg", tmp_path, {"ENV": server.nginx_env(host)})
    server.commit(repo, "v2", {"ENV": server.nginx_env(host) + "RELEASE_MARK=v2\n"})
    r = server.push(repo, "webbg", settle=False)
    assert r.returncode == 0, r.stdout
    status, body = server.http_get(server.nginx_port, host=host)  # (at once: no wait)
    assert status == 200 and json.loads(body).get("RELEASE_MARK") == "v2", body
    r = server.ssh("restart", "webbg", settle=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "waiting for another operation" not in r.stdout + r.stderr
    assert server.settled("webbg", timeout=5), "the background stop of the old web workers still holds the lock"
    enabled = [n for n in os.listdir(server.path("uwsgi-enabled")) if n.startswith("webbg_web.")]
    assert len(enabled) == 1, enabled
    wait_for("one web master", lambda: len(server.masters("webbg", "web")) == 1, timeout=15)
    status, body = server.http_get(server.nginx_port, host=host)
    assert status == 200 and json.loads(body).get("RELEASE_MARK") == "v2", body


# -- interrupted operations ---------------------------------------------------------------------

def hook_pid(app):
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"git-hook" in argv and app.encode() in argv:
                return int(pid)
    return None


def test_kill_9_of_the_push_between_starting_the_new_workers_and_the_switch(server, tmp_path):
    repo = server.deployed(None, "killme", tmp_path, files(env="PIKU_HEALTH_TIMEOUT=120\n"))
    port = server.app_port("killme")
    slow = "import time\ntime.sleep(60)\n" + wsgi_app("v2")
    server.commit(repo, "slow v2", {"app.py": slow})
    result = {}
    pusher = threading.Thread(target=lambda: result.update(r=server.push(repo, "killme")))
    with Hammer(server, port=port) as h:
        pusher.start()
        deadline = time.monotonic() + 120
        while not (server.vassal("killme", "wsgi") and len([n for n in os.listdir(server.path("uwsgi-enabled"))
                                                            if n.startswith("killme_wsgi.")]) == 2):
            assert time.monotonic() < deadline and pusher.is_alive(), result
            time.sleep(0.1)
        os.kill(hook_pid("killme"), signal.SIGKILL)
        pusher.join(60)
        assert result["r"].returncode != 0
        # the next operation finds the new workers an interrupted push started, and stops them
        r = server.ssh("config:set", "killme", "AFTER=kill")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "interrupted" in r.stdout + r.stderr, r.stdout + r.stderr
    no_failures(h)
    assert set(h.bodies) == {"v1 markupsafe=" + h_version(h)}, h.bodies
    assert len([n for n in os.listdir(server.path("uwsgi-enabled")) if n.startswith("killme_wsgi.")]) == 1
    assert not os.path.exists(server.path("state", "killme", "switch.journal"))
    assert "failed: interrupted" in "\n".join(releases(server, "killme"))


def test_the_first_push_after_upgrading_from_an_older_piku_py_loses_no_request(server, tmp_path):
    """An app deployed by the piku.py before releases (socket nginx/<app>.1.sock, vassal
    <app>_wsgi.1.ini, a virtualenv in envs/<app>) moves to the new layout on its next push,
    behind nginx, without a failed request."""
    import shutil
    old = subprocess.run(["git", "show", "182971a:piku.py"], cwd=REPO, capture_output=True, text=True)
    assert old.returncode == 0, old.stderr
    shutil.copy(server.piku_py, server.piku_py + ".new")
    with open(server.piku_py + ".old", "w") as f:  # (replaced whole: other processes run the file)
        f.write(old.stdout)
    os.chmod(server.piku_py + ".old", 0o755)
    os.replace(server.piku_py + ".old", server.piku_py)
    host = "upgraded.piku.test"
    try:
        repo = server.deployed("uv-wsgi", "upgraded", tmp_path, {"ENV": server.nginx_env(host)})
        assert os.path.exists(server.path("uwsgi-enabled", "upgraded_wsgi.1.ini"))
        server.wait_http(server.nginx_port, host=host, contains="uv-wsgi v1")
    finally:
        os.replace(server.piku_py + ".new", server.piku_py)
    server.share_nginx_dir()  # (INSTALL.md: the root step again after an upgrade; the older one cleared it)
    text = open(repo / "app.py").read().replace("uv-wsgi v1", "uv-wsgi v2")
    server.commit(repo, "v2", {"app.py": text})
    with Hammer(server, host=host) as h:
        out = push_ok(server, repo, "upgraded")
    no_failures(h)
    assert h.bodies.get("uv-wsgi v2 markupsafe=" + next(k for k in h.bodies if "v2" in k).split("markupsafe=")[1]), h.bodies
    assert not os.path.exists(server.path("uwsgi-enabled", "upgraded_wsgi.1.ini"))
    assert server.vassal("upgraded", "wsgi")
    assert os.path.islink(server.path("envs", "upgraded", "bin"))
    assert "Dependencies unchanged" not in out  # (a first virtualenv of its own)
