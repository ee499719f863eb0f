"""Issue 4: the `piku` client a developer gets from `pip install .`, driving the real server over
real ssh from inside a git checkout (the `piku` remote), from PIKU_SERVER/PIKU_APP, and -r."""
import os
import subprocess
import sys

import pytest

from harness import REPO, USER


@pytest.fixture(scope="module")
def piku_cmd(tmp_path_factory):
    venv = tmp_path_factory.mktemp("client") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", REPO], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    exe = venv / "bin" / "piku"
    assert exe.exists(), "pip install . made no `piku` command"
    return str(exe)


def ssh_command(server, with_port=True):
    argv = server.ssh_argv()
    if not with_port:
        i = argv.index("-p")
        del argv[i:i + 2]
    return " ".join(argv)


@pytest.fixture(scope="module")
def checkout(server, tmp_path_factory):
    repo = server.make_app("kinds", tmp_path_factory.mktemp("client") / "clientapp")
    server.git(repo, "remote", "add", "piku", f"{USER}@127.0.0.1:clientapp")
    r = server.git(repo, "push", "piku", "main")
    assert "Deployed clientapp" in r.stdout + r.stderr
    return repo


def client(piku_cmd, server, cwd, *args, env=None, input=None, with_port=True):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PIKU_", "GIT_SSH"))}
    e["GIT_SSH_COMMAND"] = ssh_command(server, with_port)
    e.update(env or {})
    return subprocess.run([piku_cmd, *args], cwd=cwd, env=e, input=input, capture_output=True,
                          text=True, timeout=300)


def test_commands_use_the_piku_remote(server, piku_cmd, checkout):
    r = client(piku_cmd, server, checkout, "apps")
    assert r.returncode == 0 and "clientapp" in r.stdout, r.stderr
    r = client(piku_cmd, server, checkout, "config:set", "GREETING=hello world", "X=a=b")
    assert r.returncode == 0 and "Restarted clientapp" in r.stdout, r.stdout + r.stderr
    r = client(piku_cmd, server, checkout, "config:get", "GREETING")
    assert r.returncode == 0 and r.stdout == "hello world\n", r.stdout + r.stderr
    r = client(piku_cmd, server, checkout, "logs", "-n", "2", "worker")
    assert r.returncode == 0 and "worker.1 | " in r.stdout and "web.1" not in r.stdout


def test_run_passes_arguments_stdin_and_exit_code(server, piku_cmd, checkout):
    code = "import os, sys; print(os.environ['APP'], os.environ['GREETING'], sys.stdin.read().upper()); sys.exit(7)"
    r = client(piku_cmd, server, checkout, "run", "--", "python3", "-c", code, input="piped in")
    assert r.returncode == 7, r.stdout + r.stderr
    assert r.stdout == "clientapp hello world PIPED IN\n"


def test_remote_errors_come_back_with_their_exit_code(server, piku_cmd, checkout):
    r = client(piku_cmd, server, checkout, "nosuchcommand")
    assert r.returncode == 2 and "not a piku command" in r.stderr
    r = client(piku_cmd, server, checkout, "ps:scale", "worker=-1")
    assert r.returncode == 1 and "worker" in r.stderr


def test_piku_server_and_app_outside_a_checkout(server, piku_cmd, checkout, tmp_path):
    env = {"PIKU_SERVER": f"{USER}@127.0.0.1:{server.ssh_port}", "PIKU_APP": "clientapp"}
    r = client(piku_cmd, server, tmp_path, "ps", env=env, with_port=False)
    assert r.returncode == 0 and "web: 1 configured" in r.stdout, r.stdout + r.stderr
    r = client(piku_cmd, server, tmp_path, "ps", env={"PIKU_SERVER": env["PIKU_SERVER"]}, with_port=False)
    assert r.returncode != 0 and "ps needs an app" in r.stderr


def test_other_remote_in_url_form(server, piku_cmd, checkout):
    server.git(checkout, "remote", "add", "prod", f"ssh://{USER}@127.0.0.1:{server.ssh_port}/clientapp.git")
    try:
        r = client(piku_cmd, server, checkout, "-r", "prod", "config:get", "GREETING", with_port=False)
        assert r.returncode == 0 and r.stdout == "hello world\n", r.stdout + r.stderr
        r = client(piku_cmd, server, checkout, "-r", "nosuch", "ps")
        assert r.returncode == 1 and "no git remote named 'nosuch'" in r.stderr
    finally:
        server.git(checkout, "remote", "remove", "prod")


def test_no_server_known_is_a_clear_error(server, piku_cmd, tmp_path):
    r = client(piku_cmd, server, tmp_path, "ps")
    assert r.returncode == 1 and "no piku server" in r.stderr and len(r.stderr.splitlines()) == 1


def test_hostile_remote_never_reaches_ssh_options(server, piku_cmd, tmp_path):
    marker = tmp_path / "pwned"
    repo = tmp_path / "evil"
    server.git(tmp_path, "init", "-q", str(repo))
    server.git(repo, "remote", "add", "piku", "--", f"-oProxyCommand=touch {marker}:app")
    r = client(piku_cmd, server, repo, "ps")
    assert r.returncode == 1 and "not a piku remote" in r.stderr
    assert not marker.exists()


def test_init_writes_starters_that_deploy(server, piku_cmd, tmp_path):
    app = tmp_path / "fresh"
    app.mkdir()
    (app / "app.py").write_text("def application(environ, start_response):\n"
                                "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
                                "    return [b'fresh from init']\n")
    (app / "requirements.txt").write_text("")
    r = client(piku_cmd, server, app, "init")
    assert r.returncode == 0 and "wrote Procfile" in r.stdout and "wrote ENV" in r.stdout
    assert "wsgi: app:application" in (app / "Procfile").read_text()
    before = (app / "ENV").read_text()
    (app / "ENV").write_text(before + "PIKU_TEST=1\n")
    r = client(piku_cmd, server, app, "init")
    assert r.returncode == 0 and "Procfile exists: kept" in r.stdout
    assert (app / "ENV").read_text() == before + "PIKU_TEST=1\n"
    server.git(app, "init", "-q", "-b", "main")
    server.commit(app, "init", allow_empty=False)
    r = server.push(app, "fresh")
    assert r.returncode == 0, r.stdout
    server.wait_http(server.app_port("fresh"), contains="fresh from init")
