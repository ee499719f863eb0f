"""Orchestration on a temporary PIKU_ROOT (no sshd, no uWSGI): what deploys leave on disk."""
import os
import subprocess
import sys
import time

import piku


def make_releases(root, app, n):
    paths = piku.paths_for(str(root))
    base = os.path.join(paths.releases, app)
    dirs = []
    for i in range(n):
        d = os.path.join(base, f"r{i}")
        os.makedirs(d)
        os.utime(d, (time.time() - 100 + i, time.time() - 100 + i))
        dirs.append(d)
    os.makedirs(paths.apps, exist_ok=True)
    os.symlink(dirs[-1], os.path.join(paths.apps, app))
    return paths, dirs


def test_prune_keeps_the_newest_and_the_live_release(tmp_path):
    paths, dirs = make_releases(tmp_path, "demo", 5)
    piku.prune_releases(paths, "demo", 2)
    assert sorted(os.listdir(os.path.join(paths.releases, "demo"))) == ["r3", "r4"]


def test_prune_never_removes_a_release_a_process_works_in(tmp_path):
    """Issue 9: a uWSGI master kept by chain reloads (or a worker that was not restarted) sits in
    the release it started in; removing that directory breaks every worker it forks later."""
    paths, dirs = make_releases(tmp_path, "demo", 4)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=dirs[0])
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{proc.pid}/cwd") != os.path.realpath(dirs[0]) and time.monotonic() < deadline:
            time.sleep(0.01)
        piku.prune_releases(paths, "demo", 1)
        assert sorted(os.listdir(os.path.join(paths.releases, "demo"))) == ["r0", "r3"]
    finally:
        proc.kill()
        proc.wait()
    piku.prune_releases(paths, "demo", 1)  # once nothing runs there, it goes
    assert sorted(os.listdir(os.path.join(paths.releases, "demo"))) == ["r3"]


def test_an_asgi_app_called_as_wsgi_is_recognised_in_the_log():
    assert piku.looks_asgi("TypeError: application() missing 1 required positional argument: 'send'")
    assert piku.looks_asgi("TypeError: app() missing 2 required positional arguments: 'receive' and 'send'")
    assert not piku.looks_asgi("TypeError: f() missing 1 required positional argument: 'x'")
