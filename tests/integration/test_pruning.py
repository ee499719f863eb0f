"""Issue 9: no process piku starts depends on a release directory that pruning removes. Chain
reloads keep a uWSGI master alive across deploys; its workers (and every other long-lived
process) must never be left in a directory that `PIKU_RELEASES_KEPT` has pruned."""
import os

import pytest

from harness import Reachable, find_other_python, system_uwsgi_python
from test_zero_downtime import Hammer

KEPT = 1


def push_many(server, repo, app, port=None, host=None):
    """1 + KEPT + 1 empty commits, then a change: each pushed with a request loop running."""
    for i in range(KEPT + 1):
        server.commit(repo, f"empty {i}")
        with Hammer(server, host=host, port=port) as h:
            r = server.push(repo, app)
        assert r.returncode == 0, f"push {i + 2}: " + r.stdout + server.logs()
        assert not h.failures, f"push {i + 2}: {len(h.failures)} of {h.ok + len(h.failures)} failed: {h.failures[:5]}"
        print(f"{app} push {i + 2}: {h.ok} answered, 0 failed")
    text = open(repo / "app.py").read().replace(" v1", " v2")
    server.commit(repo, "change", {"app.py": text})
    with Hammer(server, host=host, port=port) as h:
        r = server.push(repo, app)
    assert r.returncode == 0, "last push: " + r.stdout + server.logs()
    assert not h.failures, f"last push: {len(h.failures)} of {h.ok + len(h.failures)} failed: {h.failures[:5]}"
    assert h.ok > 20
    print(f"{app} push {KEPT + 3} (a change): {h.ok} answered, 0 failed")
    releases = os.listdir(server.path("releases", app))
    return releases


def env_lines(**settings):
    return "".join(f"{k}={v}\n" for k, v in settings.items())


def assert_no_process_in_a_removed_release(server, app):
    """Every process of the test user whose cwd is under releases/<app> sits in a release that exists."""
    base = server.path("releases", app)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cwd.startswith(base + "/"):
            assert not cwd.endswith(" (deleted)") and os.path.isdir(cwd), f"pid {pid} runs in {cwd}"


def test_pyuwsgi_app_survives_more_deploys_than_releases_kept(server, tmp_path):
    bindir, minor = find_other_python(system_uwsgi_python())
    with Reachable(bindir):
        env = env_lines(PATH=f"{bindir}:/usr/local/bin:/usr/bin:/bin", PYTHON_VERSION=minor,
                        PIKU_RELEASES_KEPT=KEPT)
        repo = server.deployed("uv-wsgi", "prunepy", tmp_path, {"ENV": env})
        assert "--uwsgi" in server.vassal_text("prunepy", "wsgi")  # the pyuwsgi mode
        port = server.app_port("prunepy")
        server.wait_http(port, contains="uv-wsgi v1")
        push_many(server, repo, "prunepy", port=port)
        server.wait_http(port, contains="uv-wsgi v2")
        assert_no_process_in_a_removed_release(server, "prunepy")


def test_native_wsgi_app_survives_more_deploys_than_releases_kept(server, tmp_path):
    repo = server.deployed("uv-wsgi", "prunenat", tmp_path, {"ENV": env_lines(PIKU_RELEASES_KEPT=KEPT)})
    assert "plugin = python3" in server.vassal_text("prunenat", "wsgi")
    port = server.app_port("prunenat")
    server.wait_http(port, contains="uv-wsgi v1")
    push_many(server, repo, "prunenat", port=port)
    server.wait_http(port, contains="uv-wsgi v2")
    assert_no_process_in_a_removed_release(server, "prunenat")


def test_web_app_survives_more_deploys_than_releases_kept(server, tmp_path):
    env = server.nginx_env("pruneweb.piku.test", PIKU_RELEASES_KEPT=KEPT)
    repo = server.deployed("req-web", "pruneweb", tmp_path, {"ENV": env})
    server.wait_http(server.nginx_port, host="pruneweb.piku.test", contains="req-web v1")
    push_many(server, repo, "pruneweb", host="pruneweb.piku.test")
    server.wait_http(server.nginx_port, host="pruneweb.piku.test", contains="req-web v2")
    assert_no_process_in_a_removed_release(server, "pruneweb")
