"""Issue 2: git push over real ssh deploys; failures reject the push and keep the old release."""
import contextlib
import os
import stat

import pytest


@pytest.fixture(scope="module")
def uvapp(server, tmp_path_factory):
    return server.deployed("uv-wsgi", "uvapp", tmp_path_factory.mktemp("uvapp"))


def test_uv_wsgi_app_served(server, uvapp):
    r_out = server.read("state/uvapp/deploys.log")
    assert r_out and "main@" in r_out
    status, body = server.wait_http(server.app_port("uvapp"), contains="uv-wsgi v1")
    assert "markupsafe=" in body and "app=uvapp" in body  # a package only in the venv imports
    assert os.path.islink(server.path("apps", "uvapp"))
    assert server.vassal("uvapp", "wsgi")
    assert stat.S_IMODE(os.stat(server.path("envs", "uvapp", "LIVE_ENV")).st_mode) == 0o600


def test_push_output_is_heroku_style(server, uvapp, tmp_path):
    server.commit(uvapp, "empty")
    r = server.push(uvapp, "uvapp")
    assert r.returncode == 0, r.stdout
    assert "-----> Python (uv) app detected" in r.stdout
    assert "-----> Dependencies unchanged: using the live virtualenv" in r.stdout
    assert "-----> Deployed uvapp" in r.stdout
    server.wait_http(server.app_port("uvapp"), contains="uv-wsgi v1")


def test_push_change_serves_new_body_and_keeps_port(server, uvapp):
    port = server.app_port("uvapp")
    text = open(os.path.join(uvapp, "app.py")).read().replace("uv-wsgi v1", "uv-wsgi v2")
    server.commit(uvapp, "v2", {"app.py": text})
    r = server.push(uvapp, "uvapp", style="url")
    assert r.returncode == 0, r.stdout
    assert server.app_port("uvapp") == port
    # When the push returns, the new release answers (no polling needed).
    status, body = server.http_get(port)
    assert status == 200 and "uv-wsgi v2" in body, (body, r.stdout, server.listeners(port))
    assert server.remote_rev("uvapp") == server.rev(uvapp)


def test_apps_lists_app(server, uvapp):
    r = server.ssh("apps")
    assert r.returncode == 0 and "uvapp" in r.stdout


def test_requirements_gunicorn_web_app(server, tmp_path):
    repo = server.make_app("req-web", tmp_path / "reqweb")
    r = server.push(repo, "reqweb")
    assert r.returncode == 0, r.stdout + server.logs()
    assert "-----> Python (requirements.txt) app detected" in r.stdout
    port = server.app_port("reqweb")
    status, body = server.http_get(port)
    assert status == 200 and "req-web v1" in body and f"port={port}" in body and "proc=web" in body
    # A redeploy keeps the web app's port (the original moved it every time).
    server.commit(repo, "again")
    assert server.push(repo, "reqweb").returncode == 0
    assert server.app_port("reqweb") == port
    server.wait_http(port, contains="req-web v1")


def assert_rejected_and_old_served(server, repo, app, old_rev, body, output_has):
    r = server.push(repo, app)
    assert r.returncode != 0, r.stdout
    assert "pre-receive hook declined" in r.stdout
    assert output_has in r.stdout, r.stdout
    assert server.remote_rev(app) == old_rev
    status, got = server.http_get(server.app_port(app))
    assert status == 200 and body in got, (got, server.listeners(server.app_port(app)))
    return r


@contextlib.contextmanager
def commits_dropped(server, repo):
    """The commits a test makes are dropped when it ends, whether it passed or not: the next
    test starts from the code that is live (not from a failed test's broken commit)."""
    old = server.rev(repo)
    try:
        yield old
    finally:
        server.git(repo, "reset", "-q", "--hard", old)


def test_uninstallable_dependency_rejects_push(server, uvapp):
    with commits_dropped(server, uvapp) as old:
        pyproject = open(os.path.join(uvapp, "pyproject.toml")).read()
        broken = pyproject.replace('"markupsafe"', '"markupsafe", "piku-test-no-such-package-zz"')
        server.commit(uvapp, "broken deps", {"pyproject.toml": broken})
        assert_rejected_and_old_served(server, uvapp, "uvapp", old, "uv-wsgi v2",
                                       "piku-test-no-such-package-zz")


def test_failing_release_rejects_push(server, uvapp):
    with commits_dropped(server, uvapp) as old:
        procfile = open(os.path.join(uvapp, "Procfile")).read() + "release: echo migrating; exit 1\n"
        text = open(os.path.join(uvapp, "app.py")).read().replace("uv-wsgi v2", "uv-wsgi v3")
        server.commit(uvapp, "bad release", {"Procfile": procfile, "app.py": text})
        r = assert_rejected_and_old_served(server, uvapp, "uvapp", old, "uv-wsgi v2", "release command failed")
        assert "migrating" in r.stdout


def test_failed_push_never_touches_the_live_virtualenv(server, uvapp):
    """The build changed the packages (in a virtualenv of its own), then the release step
    failed: the live virtualenv was never written to, and the next deploy reuses it."""
    def version():
        r = server.ssh("run", "uvapp", "python", "-c", "'import markupsafe; print(markupsafe.__version__)'")
        return r.stdout.strip()
    with commits_dropped(server, uvapp) as old:
        before, live_venv = version(), os.path.realpath(server.path("envs", "uvapp", "bin"))
        files_before = venv_files(live_venv)
        assert before and before != "2.1.5"
        pyproject = open(os.path.join(uvapp, "pyproject.toml")).read()
        procfile = open(os.path.join(uvapp, "Procfile")).read() + "release: exit 1\n"
        server.commit(uvapp, "downgrade, add six, fail", {
            "pyproject.toml": pyproject.replace('"markupsafe"', '"markupsafe==2.1.5", "six"'), "Procfile": procfile})
        r = assert_rejected_and_old_served(server, uvapp, "uvapp", old, "uv-wsgi v2", "release command failed")
        assert "+ six==" in r.stdout and "the live one is not touched" in r.stdout
        assert version() == before and venv_files(live_venv) == files_before
        assert server.ssh("run", "uvapp", "python", "-c", "'import six'").returncode != 0
        assert os.path.realpath(server.path("envs", "uvapp", "bin")) == live_venv
    server.commit(uvapp, "redeploy the live code")
    r = server.push(uvapp, "uvapp")
    assert r.returncode == 0 and "Dependencies unchanged: using the live virtualenv" in r.stdout, r.stdout


def venv_files(bindir):
    """{path: sha256} of every file of the virtualenv whose bin/ is bindir."""
    import hashlib
    out = {}
    for d, dirs, files in os.walk(os.path.dirname(bindir)):
        for n in files:
            p = os.path.join(d, n)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_push_without_procfile_rejected(server, uvapp, tmp_path):
    old = server.rev(uvapp)
    server.commit(uvapp, "no procfile", {"Procfile": None})
    assert_rejected_and_old_served(server, uvapp, "uvapp", old, "uv-wsgi v2", "no Procfile")
    server.git(uvapp, "reset", "-q", "--hard", old)
    repo = server.make_app(None, tmp_path / "noproc", {"app.py": "x = 1\n"})
    r = server.push(repo, "noproc")
    assert r.returncode != 0 and "no Procfile" in r.stdout


def test_release_runs_with_clean_env_before_switch(server, tmp_path):
    files = {"Procfile": "web: python3 -m http.server --bind $BIND_ADDRESS $PORT\n"
                         "release: env > release-env.txt; git --version; cp release-env.txt $DATA_ROOT/\n"}
    repo = server.make_app(None, tmp_path / "relenv", files)
    r = server.push(repo, "relenv")
    assert r.returncode == 0, r.stdout
    env = open(server.path("data", "relenv", "release-env.txt")).read()
    assert "GIT_DIR" not in env and "GIT_QUARANTINE_PATH" not in env and "GIT_OBJECT_DIRECTORY" not in env
    assert "git-core" not in env  # git's exec dir, which git puts on PATH for hooks
    assert "git-core" not in server.read("envs/relenv/LIVE_ENV")
    for key in ("APP=relenv", "PROC_TYPE=release", "PYTHONUNBUFFERED=1", "DATA_ROOT=", "LOG_ROOT=",
                "BIND_ADDRESS=127.0.0.1", "PORT="):
        assert key in env
    server.wait_http(server.app_port("relenv"))


def test_preflight_runs_before_the_build_and_can_stop_it(server, tmp_path):
    files = {"Procfile": "wsgi: app:application\n"
                         "preflight: echo checked by $PROC_TYPE > $DATA_ROOT/preflight.txt; test -f requirements.txt\n",
             "requirements.txt": "markupsafe\n",
             "app.py": "def application(e, s):\n    s('200 OK', [])\n    return [b'preflight ok']\n"}
    repo = server.make_app(None, tmp_path / "pre", files)
    r = server.push(repo, "pre")
    assert r.returncode == 0, r.stdout
    assert r.stdout.index("Running preflight") < r.stdout.index("Installing requirements"), r.stdout
    assert open(server.path("data", "pre", "preflight.txt")).read() == "checked by preflight\n"
    server.wait_http(server.app_port("pre"), contains="preflight ok")
    old = server.rev(repo)
    server.commit(repo, "no requirements", {"requirements.txt": None, "pyproject.toml": "[project]\nname='x'\n"
                                            "version='0'\ndependencies=['six']\n"})
    r = server.push(repo, "pre")
    assert r.returncode != 0 and "preflight command failed" in r.stdout, r.stdout
    assert "Syncing" not in r.stdout and server.remote_rev("pre") == old
    server.wait_http(server.app_port("pre"), contains="preflight ok")


def test_hostile_ssh_commands_refused(server):
    before = server.tree()
    for cmd in (["rm -rf /"], ["apps; id"], ["apps && id"], ["$(id)"], ["`id`"], ["git-hook", "uvapp"],
                ["exec-worker", "uvapp", "wsgi", "1"], ["git-receive-pack '../x'"],
                ["git-receive-pack 'a/b'"], ["git-upload-pack 'nope'"]):
        r = server.ssh(*cmd)
        assert r.returncode != 0, (cmd, r.stdout)
        assert r.stderr.strip(), cmd
        assert "uid=" not in r.stdout
    assert server.tree() == before


@pytest.mark.parametrize("name", ["..", "a/b", "''", "x" * 300, ".hidden", "-rf"])
def test_invalid_app_names_refused(server, name):
    before = server.tree()
    for cmd in (["config:set", name, "A=1"], ["destroy", name, "--force"], ["logs", name]):
        r = server.ssh(*cmd)
        assert r.returncode != 0 and r.stderr.strip(), (cmd, r.stdout, r.stderr)
    assert server.tree() == before


def test_push_to_invalid_name_changes_nothing(server, uvapp):
    before = server.tree()
    for name in ("..", "a/b", "-x"):
        r = server.push(uvapp, name)
        assert r.returncode != 0, r.stdout
    assert server.tree() == before
    assert not os.path.exists(os.path.join(server.root, "HEAD"))


def test_uwsgi_syntax_in_values_is_inert(server, tmp_path):
    marker = os.path.join(server.base, "pwned")
    value = f"@(exec://touch {marker}) $(HOME) %(x) ;semi #hash"
    files = {"Procfile": "wsgi: app:application\n", "requirements.txt": "",
             "ENV": f"EVIL='{value}'\n",
             "app.py": "import os\ndef application(e, s):\n    s('200 OK', [])\n"
                       "    return [os.environ['EVIL'].encode()]\n"}
    repo = server.make_app(None, tmp_path / "evil", files)
    r = server.push(repo, "evil")
    assert r.returncode == 0, r.stdout
    status, body = server.wait_http(server.app_port("evil"))
    assert body == value
    assert not os.path.exists(marker)
    boots = [f"state/evil/boot/{n}" for n in os.listdir(server.path("state", "evil", "boot"))]
    envs = [f"state/evil/env/{n}" for n in os.listdir(server.path("state", "evil", "env"))]
    assert boots  # (a native wsgi vassal names its loader only: the env file of its trial start is pruned)
    for secret in ["apps/evil/ENV", "envs/evil/LIVE_ENV"] + boots + envs:
        assert stat.S_IMODE(os.stat(server.path(secret)).st_mode) == 0o600, secret


def test_prefix_apps_are_independent(server, tmp_path):
    files = {"Procfile": "web: python3 -m http.server --bind $BIND_ADDRESS $PORT\n"}
    for app in ("pfx", "pfx2"):
        repo = server.make_app(None, tmp_path / app, files)
        assert server.push(repo, app).returncode == 0
    r = server.ssh("stop", "pfx")
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(server.path("uwsgi-enabled", "pfx_web.1.ini"))
    assert os.path.exists(server.path("uwsgi-enabled", "pfx2_web.1.ini"))
    server.wait_http(server.app_port("pfx2"))
    assert server.ssh("destroy", "pfx", "--force").returncode == 0
    assert os.path.exists(server.path("repos", "pfx2")) and not os.path.exists(server.path("repos", "pfx"))
    server.wait_http(server.app_port("pfx2"))


def test_one_app_at_a_time_other_apps_in_parallel(server, tmp_path):
    """While a push of `slowapp` holds its lock (a slow release), a config:set and a second push
    of the same app wait; the second push, whose ref went stale meanwhile, is rejected with the
    fix; a push to another app finishes first, unhindered."""
    import subprocess
    import threading
    import time
    marker = server.path("data", "slowapp", "release-started")
    procfile = "web: python3 server.py\nrelease: touch \"$DATA_ROOT/release-started\"; sleep 6\n"
    slow = server.deployed("kinds", "slowapp", tmp_path, {"Procfile": procfile})
    fast = server.deployed("kinds", "fastapp", tmp_path)
    os.unlink(marker)
    server.commit(fast, "fast")
    first = server.rev(server.commit(slow, "first"))
    clone = tmp_path / "slowclone"
    server.git(tmp_path, "clone", "-q", server.remote_url("slowapp"), str(clone))
    server.commit(clone, "second", {"second.txt": "2\n"})

    def push(repo, app, out):
        out["r"] = server.push(repo, app)
        out["t"] = time.monotonic()
    p1, p2, pf, cs = {}, {}, {}, {}
    t1 = threading.Thread(target=push, args=(slow, "slowapp", p1))
    t1.start()
    deadline = time.monotonic() + 60
    while not os.path.exists(marker):
        assert time.monotonic() < deadline, "the slow release never started"
        time.sleep(0.1)
    threads = [threading.Thread(target=push, args=(clone, "slowapp", p2)),
               threading.Thread(target=push, args=(fast, "fastapp", pf)),
               threading.Thread(target=lambda: cs.update(r=server.ssh("config:set", "slowapp", "X=1"),
                                                         t=time.monotonic()))]
    for t in threads:
        t.start()
    for t in [t1] + threads:
        t.join(300)
    assert p1["r"].returncode == 0, p1["r"].stdout
    assert pf["r"].returncode == 0 and "Deployed fastapp" in pf["r"].stdout, pf["r"].stdout
    assert pf["t"] < p1["t"], "another app's push waited for slowapp"
    assert cs["r"].returncode == 0 and cs["t"] > p1["t"], (cs["r"].stdout, cs["r"].stderr)
    assert "waiting for another operation on slowapp" in cs["r"].stdout + cs["r"].stderr
    out2 = p2["r"].stdout
    assert p2["r"].returncode != 0 and "waiting for another operation on slowapp" in out2, out2
    assert "updated by another push while this one waited" in out2, out2
    assert server.remote_rev("slowapp") == first
    assert "first" in subprocess.run(["git", "log", "-1", "--format=%s", first], cwd=slow,
                                     capture_output=True, text=True).stdout
    assert not os.path.exists(server.path("apps", "slowapp", "second.txt"))
    assert server.wait_http(server.app_port("slowapp"), contains='"X": "1"')


def test_first_release_whose_web_keeps_dying_fails_fast_and_says_so(server, tmp_path):
    files = {"Procfile": "web: no-such-server-xyz --port $PORT\n", "ENV": "PIKU_HEALTH_TIMEOUT=300\n"}
    r = server.push(server.make_app(None, tmp_path / "diesfast", files), "diesfast")
    assert r.returncode != 0, r.stdout
    assert "failed their health check (web tried on port" in r.stdout, r.stdout
    assert "exited with status 127 before it answered" in r.stdout, r.stdout
    assert "no-such-server-xyz: not found" in r.stdout, r.stdout
    assert "the app had no earlier release, so nothing serves it" in r.stdout, r.stdout
    assert "previous release keeps serving" not in r.stdout
    assert not [n for n in os.listdir(server.path("uwsgi-enabled")) if n.startswith("diesfast_")]


def test_ps_tells_a_crash_looping_worker_from_a_running_one(server, tmp_path):
    import time
    files = {"Procfile": "web: python3 -m http.server --bind $BIND_ADDRESS $PORT\n"
                         "crashy: echo dying; exit 2\nsteady: sleep 600\n"}
    server.deployed(None, "crashps", tmp_path, files)
    deadline = time.monotonic() + 60
    while True:
        out = server.ssh("ps", "crashps").stdout
        if "crashy: 1 configured, 0 running (crashing" in out:
            break
        assert time.monotonic() < deadline, out
        time.sleep(1)
    assert "web: 1 configured, 1 running (running)" in out and "steady: 1 configured, 1 running (running)" in out


def test_repo_env_expands_piku_values_as_the_original_did(server, tmp_path):
    """`$DATA_ROOT`, `$APP`, `$HOME` and `$PATH` in the repo's ENV file mean what they mean in
    the app's processes (the original piku expanded them); earlier keys still come first."""
    files = {"Procfile": "web: python3 -m http.server --bind $BIND_ADDRESS $PORT\n",
             "ENV": "DB_PATH=$DATA_ROOT/db.sqlite\nNAME=${APP}-site\nPATH=$PATH:/opt/piku-extra/bin\n"
                    "CACHE=$HOME/.cache/$NAME\n"}
    server.deployed(None, "expander", tmp_path, files)
    live = server.ssh("config:live", "expander").stdout
    assert f"DB_PATH={server.path('data', 'expander', 'db.sqlite')}\n" in live, live
    assert "NAME=expander-site\n" in live and "/.cache/expander-site\n" in live, live
    path = [l for l in live.splitlines() if l.startswith("PATH=")][0]
    assert path.startswith(f"PATH={server.path('envs', 'expander', 'bin')}:") and \
        path.endswith(":/opt/piku-extra/bin") and "$PATH" not in path, path
