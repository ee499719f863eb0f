"""Unit tests for issue 14 item 5, deploy hooks and notifications: the webhook setting, the
Procfile's postdeploy command, the server's pre-deploy and post-deploy hooks and the deploy
notice, against an HTTP receiver on 127.0.0.1 in a thread."""
import json
import os
import threading

import pytest

import piku
from piku import PikuError
from tests.receiver import Receiver


# -- the webhook setting --------------------------------------------------------

@pytest.mark.parametrize("url", ["https://hooks.example.com/services/T0/B0/xyz", "http://127.0.0.1:8080/hook?k=v",
                                 "http://[::1]:9/x", "HTTPS://ci.example.org"])
def test_webhook_urls_accepted(url):
    assert piku.parse_webhook_url(url) == url
    piku.validate_settings({"PIKU_DEPLOY_WEBHOOK": url})


@pytest.mark.parametrize("url,text", [
    ("ftp://example.com/x", "expected an http:// or https:// URL"),
    ("javascript:alert(1)", "expected an http:// or https:// URL"),
    ("example.com/hook", "expected an http:// or https:// URL"),
    ("http://", "expected an http:// or https:// URL"),
    ("http://a b/", "expected an http:// or https:// URL"),
    ("http://host:99999/", "expected an http:// or https:// URL"),
    ("http://héllo.example/", "expected an http:// or https:// URL"),
    ("http://x/\n", "expected an http:// or https:// URL"),
    ("https://user:pw@example.com/", "user:password@ in the URL is not supported"),
    ("http://*.example.com/", "is not a host name"),
    ("http://bad!host/", "is not a host name"),
])
def test_webhook_urls_refused(url, text):
    with pytest.raises(PikuError, match=text.replace("(", r"\(")):
        piku.validate_settings({"PIKU_DEPLOY_WEBHOOK": url})


def test_webhook_timeout_is_bounded():
    piku.validate_settings({"PIKU_DEPLOY_WEBHOOK_TIMEOUT": "1"})
    with pytest.raises(PikuError, match="out of range"):
        piku.validate_settings({"PIKU_DEPLOY_WEBHOOK_TIMEOUT": "600"})


def test_postdeploy_is_a_phase_not_a_process():
    assert piku.plan_scaling({"web": "x", "postdeploy": "echo", "release": "m"}, {}) == {"web": 1}
    assert not piku.detect_generic({}, {"postdeploy": "y"})


# -- hooks and the webhook ----------------------------------------------------------

def target(paths, release_dir, workers, settings):
    release = piku.release_from({"id": "20260101-000000-abcdef0123", "dir": str(release_dir), "rev": "b" * 40,
                                 "ref": "main"})
    return piku.Target(paths, "shop", piku.OPERATIONS["deploy"], release, workers, settings, {"web": 1},
                       {"release": "20251231-000000-0000000000"}, None, set(), {"port": 5000}, dict(settings),
                       None, None, None, [], False, "stamp", None)


@pytest.fixture
def hooked(tmp_path):
    paths = piku.paths_for(str(tmp_path / "piku"))
    piku.ensure_dirs(*paths[1:], os.path.join(paths.root, "hooks"))
    release = tmp_path / "release"
    release.mkdir()
    return paths, release


def hook(paths, name, body, mode=0o755):
    path = os.path.join(paths.root, "hooks", name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, mode)


def test_a_successful_deploy_runs_postdeploy_then_the_post_hook_then_notifies(hooked, capsys):
    paths, release = hooked
    rx = Receiver()
    hook(paths, "post-deploy", 'echo "post $APP $REV $BRANCH $RELEASE $PREVIOUS_RELEASE $URL" >> order\n')
    settings = {"PIKU_DEPLOY_WEBHOOK": rx.url, "PIKU_DEPLOY_WEBHOOK_TIMEOUT": "60", "BIND_ADDRESS": "127.0.0.1"}
    t = target(paths, release, {"web": "x", "postdeploy": "echo postdeploy $PROC_TYPE >> order; exit 3"},
               settings | {"PORT": "5000"})
    try:
        assert piku.with_deploy_hooks(lambda *a: t, paths, "shop", "b" * 40, "main", os.environ) is t
    finally:
        rx.close()
    assert (release / "order").read_text().splitlines() == [
        "postdeploy postdeploy", f"post shop {'b' * 40} main 20260101-000000-abcdef0123 20251231-000000-0000000000 "
                                 "http://127.0.0.1:5000/"]
    out, err = capsys.readouterr()
    assert "postdeploy command failed (exit 3): shop stays on 20260101-000000-abcdef0123, nothing was rolled back" in err
    assert "deploy notice sent to http://127.0.0.1:" in out and "s3cret" not in out + err
    [(path, ctype, body)] = rx.got
    assert path == "/hook?token=s3cret" and ctype == "application/json"
    assert set(body) == set(piku.DEPLOY_NOTICE_FIELDS)
    assert body["status"] == "success" and body["release"] == t.release.id and body["revision"] == "b" * 40
    assert body["url"] == "http://127.0.0.1:5000/" and body["error"] is None and body["app"] == "shop"


def test_a_failed_deploy_notifies_the_live_settings_webhook_and_runs_no_post_hooks(hooked, capsys, monkeypatch):
    paths, release = hooked
    rx = Receiver(status=500)
    piku.write_config(paths, "shop", {"PIKU_DEPLOY_WEBHOOK": rx.url, "PIKU_DEPLOY_WEBHOOK_TIMEOUT": "60"})
    hook(paths, "post-deploy", "touch ran\n")

    def broken(*args):
        raise PikuError("the new workers failed their health check (GET / answered 500)")
    try:
        with pytest.raises(PikuError, match="health check"):
            piku.with_deploy_hooks(broken, paths, "shop", "c" * 40, "main", os.environ)
    finally:
        rx.close()
    [(_, _, body)] = rx.got
    assert body["status"] == "failed" and body["error"].startswith("the new workers failed") and body["url"] is None
    err = capsys.readouterr().err
    assert "the deploy notice to http://127.0.0.1:" in err and "failed (500): the deploy is not affected" in err
    assert not os.path.exists(release / "ran")


def test_a_webhook_that_does_not_answer_costs_its_timeout_only(hooked, capsys):
    paths, release = hooked
    hang = threading.Event()
    rx = Receiver(hang=hang)
    t = target(paths, release, {"web": "x"}, {"PIKU_DEPLOY_WEBHOOK": rx.url, "PIKU_DEPLOY_WEBHOOK_TIMEOUT": "1",
                                              "PORT": "5000"})
    try:
        piku.with_deploy_hooks(lambda *a: t, paths, "shop", "b" * 40, "main", os.environ)
    finally:
        hang.set()
        rx.close()
    assert "got no answer within 1s (PIKU_DEPLOY_WEBHOOK_TIMEOUT): the deploy is not affected" in capsys.readouterr().err


def test_post_json_reports_what_happened():
    rx = Receiver(status=201)
    try:
        assert piku.post_json(rx.url, b"{}", 60) == 201
    finally:
        rx.close()
    assert isinstance(piku.post_json(rx.url, b"{}", 60), str)  # connection refused: the error's text


def test_a_failing_pre_deploy_hook_refuses_the_deploy(hooked, capfd):
    paths, release = hooked
    hook(paths, "pre-deploy", 'echo "freeze: no deploys of $APP ($RELEASE) today"; exit 7\n')
    t = target(paths, release, {"web": "x"}, {})
    with pytest.raises(PikuError, match=r"pre-deploy hook refused the deploy \(exit 7\): nothing was changed"):
        piku.run_server_hook(t, "pre-deploy")
    assert "freeze: no deploys of shop (20260101-000000-abcdef0123) today" in capfd.readouterr().out


@pytest.mark.parametrize("mode,text", [(0o775, "it is not a file only root or the piku user can write"),
                                       (0o644, "it is not executable")])
def test_hooks_others_could_change_or_not_executable_are_not_run(hooked, capsys, mode, text):
    paths, release = hooked
    t = target(paths, release, {"web": "x"}, {})
    for name in piku.SERVER_HOOKS:
        hook(paths, name, "touch ran\n", mode)
    with pytest.raises(PikuError, match=f"pre-deploy hook .* cannot be run: {text}.*no app deploys until"):
        piku.run_server_hook(t, "pre-deploy")
    piku.run_server_hook(t, "post-deploy")
    assert f"post-deploy hook {paths.root}/hooks/post-deploy was not run: {text}" in capsys.readouterr().err
    assert not os.path.exists(release / "ran")


def test_the_notice_has_every_field():
    body = json.loads(piku.render_deploy_notice({"app": "a", "duration": 1.23456, "status": "success"}))
    assert set(body) == set(piku.DEPLOY_NOTICE_FIELDS) and body["duration"] == 1.23 and body["release"] is None


def test_a_hook_that_cannot_start_refuses_before_and_only_warns_after(hooked, capsys):
    paths, release = hooked
    for name in piku.SERVER_HOOKS:
        path = os.path.join(paths.root, "hooks", name)
        with open(path, "w") as f:
            f.write("echo no interpreter line\n")  # (exec fails: ENOEXEC)
        os.chmod(path, 0o755)
    t = target(paths, release, {"web": "x"}, {"PORT": "5000"})
    with pytest.raises(PikuError, match="pre-deploy hook .* could not start .*; no app deploys until it is fixed"):
        piku.run_server_hook(t, "pre-deploy")
    assert piku.with_deploy_hooks(lambda *a: t, paths, "shop", "b" * 40, "main", os.environ) is t
    err = capsys.readouterr().err
    assert "post-deploy hook could not start (cannot start post-deploy: Exec format error): the deploy is not affected" \
        in err.replace(f" {paths.root}/hooks/post-deploy", ""), err


def test_a_redirect_is_an_answer_not_followed():
    with Receiver(status=301, headers={"Location": "http://127.0.0.1:1/elsewhere"}) as rx:
        assert piku.post_json(rx.url, b"{}", 60) == 301
        assert len(rx.got) == 1
