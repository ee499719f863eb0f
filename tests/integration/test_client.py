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


# Groups of remotes (issue 14). The test suite has one server: the "servers" of a group are
# three apps on it (grp1, grp2, grp3), each behind its own git remote; the client treats them
# exactly as it would three hosts.

GROUP_APP = {"Procfile": "web: python3 server.py\nrelease: test \"$FAIL_RELEASE\" != 1\n",
             "server.py": open(os.path.join(REPO, "tests", "apps", "kinds", "server.py")).read()}


@pytest.fixture(scope="module")
def group_checkout(server, tmp_path_factory):
    repo = server.make_app(None, tmp_path_factory.mktemp("group") / "grp", GROUP_APP)
    server.git(repo, "remote", "add", "prod1", f"{USER}@127.0.0.1:grp1")
    server.git(repo, "remote", "add", "prod2", f"ssh://{USER}@127.0.0.1:{server.ssh_port}/grp2")
    server.git(repo, "remote", "add", "bad", f"{USER}@127.0.0.1:grp3")
    server.git(repo, "config", "piku.group.prod", "prod1 prod2")
    server.git(repo, "config", "piku.group.order", "prod1,bad prod2")
    return repo


def test_group_push_and_commands_run_on_each_remote(server, piku_cmd, group_checkout):
    r = client(piku_cmd, server, group_checkout, "-g", "prod", "push", "main")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prod1 (" in r.stdout and "prod2 (" in r.stdout and "Pushed to prod1, prod2" in r.stdout
    assert "Deployed grp1" in r.stderr and "Deployed grp2" in r.stderr  # git's remote: lines
    rev = server.rev(group_checkout)
    assert server.remote_rev("grp1") == rev == server.remote_rev("grp2")
    r = client(piku_cmd, server, group_checkout, "-g", "prod", "config:set", "GREETING=hello group")
    assert r.returncode == 0 and "config:set done on prod1, prod2" in r.stdout, r.stdout + r.stderr
    for app in ("grp1", "grp2"):
        assert server.ssh("config:get", app, "GREETING").stdout == "hello group\n"
        server.wait_http(server.app_port(app), contains="hello group")
    r = client(piku_cmd, server, group_checkout, "-r", "prod2", "-r", "prod1", "config:get", "GREETING")
    assert r.returncode == 0 and r.stdout.count("hello group\n") == 2, r.stdout + r.stderr
    assert r.stdout.index("prod2 (") < r.stdout.index("prod1 (")


def test_a_group_spans_two_servers(server, second_server, piku_cmd, tmp_path):
    """The same as above with two real servers (each its own user, sshd, emperor and nginx)."""
    repo = server.make_app(None, tmp_path / "twin", GROUP_APP)
    for name, srv in (("east", server), ("west", second_server)):
        server.git(repo, "remote", "add", name, f"ssh://{srv.user}@127.0.0.1:{srv.ssh_port}/twin")
    server.git(repo, "config", "piku.group.both", "east west")
    argv = server.ssh_argv()
    del argv[argv.index("-p"):argv.index("-p") + 2]
    ssh = {"GIT_SSH_COMMAND": " ".join(argv + ["-i", second_server.key])}  # (a key for each server)
    r = client(piku_cmd, server, repo, "-g", "both", "push", "main", env=ssh)
    assert r.returncode == 0 and "Pushed to east, west" in r.stdout, r.stdout + r.stderr
    r = client(piku_cmd, server, repo, "-g", "both", "config:set", "GREETING=on two servers", env=ssh)
    assert r.returncode == 0 and "config:set done on east, west" in r.stdout, r.stdout + r.stderr
    for srv in (server, second_server):
        assert srv.remote_rev("twin") == server.rev(repo)
        srv.wait_http(srv.app_port("twin"), contains="on two servers")


def test_group_push_stops_at_the_first_failure_and_says_where_the_release_runs(server, piku_cmd, group_checkout):
    r = client(piku_cmd, server, group_checkout, "-r", "bad", "push", "main")
    assert r.returncode == 0, r.stdout + r.stderr
    assert server.ssh("config:set", "grp3", "FAIL_RELEASE=1").returncode == 0  # its next release fails
    old = server.rev(group_checkout)
    server.commit(group_checkout, "v2", {"version.txt": "2\n"})
    new = server.rev(group_checkout)
    r = client(piku_cmd, server, group_checkout, "-g", "order", "push", "main")
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith(" !     ") and "remote:" not in l]
    assert errors[-2:] == [" !     prod1 already runs the new release; to go back there: `piku -r prod1 rollback`",
                           " !     push to bad failed (exit 1): bad keeps its previous release; not pushed to prod2"], r.stderr
    assert "release command failed" in r.stderr and "prod2 (" not in r.stdout
    assert (server.remote_rev("grp1"), server.remote_rev("grp3"), server.remote_rev("grp2")) == (new, old, old)
    r = client(piku_cmd, server, group_checkout, "-g", "order", "config:unset", "NOPE")
    assert r.returncode == 0 and "config:unset done on prod1, bad, prod2" in r.stdout


def test_group_errors_run_nothing(server, piku_cmd, group_checkout):
    r = client(piku_cmd, server, group_checkout, "-g", "nosuch", "ps")
    assert r.returncode == 1 and "no group 'nosuch' here: define it with git config piku.group.nosuch" in r.stderr
    server.git(group_checkout, "config", "piku.group.typo", "prod1 prdo2")
    r = client(piku_cmd, server, group_checkout, "-g", "typo", "config:set", "TYPO=1")
    assert r.returncode == 1 and "no git remote named 'prdo2' here" in r.stderr and r.stdout == ""
    assert server.ssh("config:get", "grp1", "TYPO").returncode != 0


def test_client_destroy_asks_for_the_app_name(server, piku_cmd, group_checkout):
    r = client(piku_cmd, server, group_checkout, "-r", "bad", "destroy", input="grp1\n")
    assert r.returncode == 1 and "'grp1' is not 'grp3': nothing was removed" in r.stderr
    assert "Type the app's name to confirm" in r.stderr and os.path.exists(server.path("repos", "grp3"))
    r = client(piku_cmd, server, group_checkout, "-r", "bad", "destroy", input="grp3\n")
    assert r.returncode == 0 and "Destroyed grp3" in r.stdout, r.stdout + r.stderr
    assert not os.path.exists(server.path("repos", "grp3"))
