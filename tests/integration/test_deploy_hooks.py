"""Issue 14 item 5 over real git pushes: the Procfile's postdeploy command, the server's
pre-deploy and post-deploy hooks, and PIKU_DEPLOY_WEBHOOK's notices, received by an HTTP server
on 127.0.0.1 in this test process."""
import json
import os
import shutil
import threading

import pytest

from tests.receiver import Receiver

WEB = open(os.path.join(os.path.dirname(__file__), "..", "apps", "kinds", "server.py")).read()
POSTDEPLOY = "postdeploy: echo \"postdeploy $PROC_TYPE $APP $(cat VERSION)\" >> $DATA_ROOT/post.log\n"
HOOK = """#!/bin/sh
[ "$APP" = hooked ] || exit 0
env | grep -E '^(APP|REV|BRANCH|RELEASE|RELEASE_DIR|PREVIOUS_RELEASE|URL)=' | sort > "$PIKU_ROOT/{name}.env"
[ ! -e "$PIKU_ROOT/freeze" ] || {{ echo "deploys are frozen today"; exit 1; }}
"""


@pytest.fixture(scope="module")
def rx():
    with Receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def hooked(server, rx, tmp_path_factory):
    """App `hooked`, whose repository's ENV names the receiver: its first push is notified too."""
    files = {"Procfile": "web: python3 server.py\n" + POSTDEPLOY, "server.py": WEB, "VERSION": "1",
             "ENV": f"PIKU_DEPLOY_WEBHOOK={rx.url}\nPIKU_DEPLOY_WEBHOOK_TIMEOUT=60\n"}  # (a busy machine)
    repo = server.make_app(None, tmp_path_factory.mktemp("hooked") / "hooked", files)
    r = server.push(repo, "hooked")
    assert r.returncode == 0, r.stdout
    return repo, r.stdout


def notice(rx, n=-1):
    path, ctype, body = rx.got[n]
    assert path == "/hook?token=s3cret" and ctype == "application/json"
    return body


def live_release(server, app):
    return json.loads(server.read(f"state/{app}/live.json"))["release"]


def test_a_push_runs_postdeploy_and_notifies_the_webhook(server, rx, hooked):
    repo, out = hooked
    assert "Running postdeploy: echo" in out and "deploy notice sent to http://127.0.0.1:" in out
    assert "s3cret" not in out  # (a webhook's path or query may hold its token)
    assert server.read("data/hooked/post.log") == "postdeploy postdeploy hooked 1\n"
    body = notice(rx)
    assert body["status"] == "success" and body["app"] == "hooked" and body["branch"] == "main"
    assert body["release"] == live_release(server, "hooked") and body["revision"] == server.rev(repo)
    assert body["url"] == f"http://127.0.0.1:{server.app_port('hooked')}/" and body["error"] is None
    assert body["duration"] > 0 and body["piku"] and body["server"] and body["time"].endswith("Z")


def install_hooks(server):
    d = server.path("hooks")
    os.makedirs(d, exist_ok=True)
    server.chown(d)
    for name in ("pre-deploy", "post-deploy"):
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(HOOK.format(name=name))
        os.chmod(path, 0o755)
        server.chown(path)
    return d


def read_env(server, name):
    return dict(line.split("=", 1) for line in (server.read(f"{name}.env") or "").splitlines())


def test_server_hooks_get_the_deploy_and_pre_deploy_can_refuse_it(server, rx, hooked):
    repo, _ = hooked
    hooks = install_hooks(server)
    try:
        previous = live_release(server, "hooked")
        server.commit(repo, "two", {"VERSION": "2"})
        r = server.push(repo, "hooked")
        assert r.returncode == 0 and "Running the server's pre-deploy hook" in r.stdout, r.stdout
        live = live_release(server, "hooked")
        want = {"APP": "hooked", "REV": server.rev(repo), "BRANCH": "main", "RELEASE": live,
                "RELEASE_DIR": server.path("releases", "hooked", live), "PREVIOUS_RELEASE": previous}
        assert read_env(server, "pre-deploy") == want
        assert read_env(server, "post-deploy") == want | {"URL": f"http://127.0.0.1:{server.app_port('hooked')}/"}

        # a failing pre-deploy hook rejects the push before the release command; the live release serves on
        open(server.path("freeze"), "w").close()
        server.commit(repo, "three", {"VERSION": "3"})
        before = server.remote_rev("hooked")
        r = server.push(repo, "hooked")
        assert r.returncode != 0 and "deploys are frozen today" in r.stdout, r.stdout
        assert "the server's pre-deploy hook refused the deploy (exit 1): nothing was changed" in r.stdout
        assert server.remote_rev("hooked") == before and live_release(server, "hooked") == live
        body = notice(rx)
        assert body["status"] == "failed" and "pre-deploy hook refused the deploy" in body["error"]
        assert body["revision"] == server.rev(repo) and body["release"] not in (None, live) and body["url"] is None
        os.unlink(server.path("freeze"))

        # a hook other users could change is never run: every deploy is refused until it is fixed
        os.chmod(os.path.join(hooks, "pre-deploy"), 0o777)
        r = server.push(repo, "hooked")
        assert r.returncode != 0 and "pre-deploy hook" in r.stdout and \
            "cannot be run: it is not a file only root or the piku user can write" in r.stdout, r.stdout
        assert server.remote_rev("hooked") == before
    finally:  # (hooks are the whole server's)
        shutil.rmtree(hooks)
        for name in ("freeze", "pre-deploy.env", "post-deploy.env"):
            if os.path.exists(server.path(name)):
                os.unlink(server.path(name))
    r = server.push(repo, "hooked")
    assert r.returncode == 0, r.stdout


def test_a_failing_postdeploy_warns_and_the_deploy_stands(server, rx, hooked):
    repo, _ = hooked
    server.commit(repo, "postdeploy fails", {"Procfile": "web: python3 server.py\npostdeploy: echo oops; exit 4\n",
                                             "VERSION": "4"})
    r = server.push(repo, "hooked")
    assert r.returncode == 0, r.stdout
    assert "postdeploy command failed (exit 4)" in r.stdout and "never rolls a deploy back" in r.stdout
    assert server.remote_rev("hooked") == server.rev(repo)
    assert notice(rx)["status"] == "success" and notice(rx)["release"] == live_release(server, "hooked")


def test_a_failed_build_is_notified_too(server, rx, hooked):
    repo, _ = hooked
    good = server.remote_rev("hooked")
    server.commit(repo, "release fails", {"Procfile": "web: python3 server.py\nrelease: exit 5\n"})
    r = server.push(repo, "hooked")
    assert r.returncode != 0 and "release command failed (exit 5)" in r.stdout
    body = notice(rx)
    assert body["status"] == "failed" and body["error"].startswith("release command failed (exit 5)")
    assert body["revision"] == server.rev(repo) and server.remote_rev("hooked") == good
    server.git(repo, "reset", "-q", "--hard", "HEAD~1")


def test_a_webhook_that_hangs_only_costs_its_timeout(server, hooked):
    hang = threading.Event()
    with Receiver(hang=hang) as slow:
        r = server.ssh("config:set", "hooked", f"PIKU_DEPLOY_WEBHOOK={slow.url}", "PIKU_DEPLOY_WEBHOOK_TIMEOUT=1")
        assert r.returncode == 0 and not slow.got, r.stderr  # (a restart is not a deploy)
        r = server.ssh("deploy", "hooked")
        hang.set()
    assert r.returncode == 0, r.stderr
    # (the receiver answers only after the deploy ended: whatever the machine's speed, there is no answer)
    assert "got no answer within 1s (PIKU_DEPLOY_WEBHOOK_TIMEOUT): the deploy is not affected" in r.stderr


@pytest.mark.parametrize("value,text", [
    ("ftp://example.com/x", "PIKU_DEPLOY_WEBHOOK: expected an http:// or https:// URL"),
    ("https://user:pw@example.com/", "user:password@ in the URL is not supported"),
    ("hooks.example.com", "expected an http:// or https:// URL"),
])
def test_a_webhook_url_that_is_not_http_is_refused(server, hooked, value, text):
    before = server.tree()
    r = server.ssh("config:set", "hooked", f"PIKU_DEPLOY_WEBHOOK={value}")
    assert r.returncode == 1 and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert server.tree() == before
