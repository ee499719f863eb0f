"""Issue 4: every command through real ssh, with bad input for each."""
import json
import os
import shlex
import subprocess
import time

import pytest

from harness import USER

HOSTILE = 'a b\n$HOME ; #x "q" \'s\' @(exec://id) %(k) =eq\\back'


@pytest.fixture(scope="module")
def kinds(server, tmp_path_factory):
    return server.deployed("kinds", "kinds", tmp_path_factory.mktemp("kinds"))


def web_env(server, app="kinds"):
    status, body = server.wait_http(server.app_port(app))
    return json.loads(body)


def ok(r):
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def refused(r, text=None):
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert r.stderr.strip() and len(r.stderr.strip().splitlines()) <= 3, r.stderr
    if text:
        assert text in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


def test_injected_environment(server, kinds):
    env = web_env(server)
    for key in ("APP", "DATA_ROOT", "LOG_ROOT", "HOME", "USER", "PATH", "VIRTUAL_ENV", "PORT",
                "BIND_ADDRESS", "PROC_TYPE", "PYTHONUNBUFFERED", "PYTHONIOENCODING"):
        assert key in env, key
    assert env["APP"] == "kinds" and env["PROC_TYPE"] == "web" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:")
    assert not any(k.startswith("GIT_") or k.startswith("UWSGI_") for k in env)


def test_worker_runs(server, kinds):
    path = server.path("data", "kinds", "worker.1")
    deadline = time.monotonic() + 20
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open(path).read().startswith("worker ")


def test_config_set_hostile_value_round_trips_without_rebuild(server, kinds):
    marker = os.path.join(server.base, "pwned")
    value = HOSTILE + f" @(exec://touch {marker})"
    out = ok(server.ssh("config:set", "kinds", shlex.quote(f"WEIRD={value}"), "'GREETING=hello world'"))
    assert "Restarted kinds" in out and "Syncing" not in out and "detected" not in out
    env = web_env(server)
    # piku's own names are filled in, as the original piku did (config:get shows what was set)
    assert env["WEIRD"] == value.replace("$HOME", server.home) and env["GREETING"] == "hello world"
    assert ok(server.ssh("config:get", "kinds", "WEIRD")) == value + "\n"
    assert not os.path.exists(marker)
    assert "GREETING=hello world" in ok(server.ssh("config", "kinds"))
    mode = os.stat(server.path("envs", "kinds", "ENV")).st_mode & 0o777
    assert mode == 0o600


def test_config_set_unquoted_words_and_equals(server, kinds):
    ok(server.ssh("config:set", "kinds", "SPACED=a", "b", "c", "EQ=x=y=z"))
    env = web_env(server)
    assert env["SPACED"] == "a b c" and env["EQ"] == "x=y=z"


def test_config_unset_and_live(server, kinds):
    ok(server.ssh("config:set", "kinds", "TEMP=1"))
    ok(server.ssh("config:unset", "kinds", "TEMP"))
    assert "TEMP" not in web_env(server)
    live = ok(server.ssh("config:live", "kinds"))
    assert "PORT=" in live and "APP=kinds" in live
    refused(server.ssh("config:get", "kinds", "TEMP"), "not set")


@pytest.mark.parametrize("args,text", [
    (["config:set", "kinds", "1BAD=x"], "KEY=VALUE"),
    (["config:set", "kinds", "novalue"], "KEY=VALUE"),
    (["config:set", "kinds", "PORT=notaport"], "PORT"),
    (["config:set", "kinds", "UWSGI_PROCESSES=-3"], "UWSGI_PROCESSES"),
    (["config:set", "kinds", "NGINX_SERVER_NAME='a.test;evil'"], "NGINX_SERVER_NAME"),
    (["config:set", "kinds", "PYTHON_VERSION=banana"], "Python"),
    (["config:set", "nosuchapp", "A=1"], "no such app"),
    (["config:set", "kinds"], None),
    (["config:get", "kinds"], None),
    (["config:unset", "kinds", "'bad key'"], "invalid key"),
    (["ps:scale", "kinds", "worker=-1"], "worker"),
    (["ps:scale", "kinds", "nosuch=1"], "unknown process kind"),
    (["ps:scale", "kinds", "worker"], "KIND=COUNT"),
    (["ps:scale", "kinds", "worker=1000"], "out of range"),
    (["ps:scale", "kinds", "web=2"], "same PORT"),
    (["ps:scale", "kinds", "cron1=2"], "once per schedule"),
    (["logs", "nosuchapp"], "no such app"),
    (["ps", "nosuchapp"], "no such app"),
    (["restart", "nosuchapp"], "no such app"),
    (["stop", "nosuchapp"], "no such app"),
    (["destroy", "nosuchapp"], "no such app"),
    (["destroy", "nosuchapp", "--force"], "no such app"),
    (["destroy", "kinds"], "confirm with `destroy kinds --confirm kinds` (or --force)"),
    (["destroy", "kinds", "--confirm", "kinds2"], "'kinds2' is not 'kinds': nothing was removed"),
    (["destroy", "kinds", "--confirm"], "requires an argument"),
    (["deploy", "nosuchapp"], "no such app"),
    (["run", "nosuchapp", "true"], "no such app"),
    (["run", "kinds"], None),
    (["nosuchcommand"], "not a piku command"),
    (["config", "nosuchapp"], "no such app"),
    (["config", "'../etc'"], "invalid app name"),
    (["config:live", "nosuchapp"], "no such app"),
    (["config:get", "kinds", "NOPE"], "not set"),
    (["logs", "kinds", "-n", "many"], "many"),
    (["logs", "kinds", "nosuchworker"], "no logs"),
    (["update"], "update needs the new piku.py"),
    (["update", "/nonexistent/piku.py"], "no such file"),
    (["setup:ssh", "/nonexistent.pub"], "no such key file"),
    (["scp", "-t", "/etc/"], "refused"),
    (["git-hook", "kinds"], "internal"),
    (["exec-worker", "kinds", "web", "1"], "internal"),
])
def test_bad_input_is_refused_and_changes_nothing(server, kinds, args, text):
    before = server.tree()
    refused(server.ssh(*args), text)
    assert server.tree() == before


def test_logs_tail_and_process_filter(server, kinds):
    out = ok(server.ssh("logs", "kinds", "-n", "5"))
    assert "web.1 | " in out and "worker.1 | " in out
    out = ok(server.ssh("logs", "kinds", "worker", "-n", "3"))
    assert "worker.1 | " in out and "web.1 | " not in out
    assert len(out.strip().splitlines()) <= 3


def test_logs_follow(server, kinds):
    proc = subprocess.Popen(server.ssh_argv() + [f"{USER}@127.0.0.1", "logs", "kinds", "worker", "-n", "0", "-f"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the worker logs a line every second
        assert line.startswith("worker.1 | ")
    finally:
        proc.terminate()
        proc.wait(10)


def test_config_unset_of_a_key_that_is_not_set_changes_nothing(server, kinds):
    vassal = server.path("uwsgi-enabled", "kinds_web.1.ini")
    before = os.stat(vassal).st_mtime_ns, server.read("envs/kinds/LIVE_ENV")
    out = ok(server.ssh("config:unset", "kinds", "NEVER_SET_KEY"))
    assert "NEVER_SET_KEY: not set with config:set" in out and "Nothing to change" in out, out
    assert (os.stat(vassal).st_mtime_ns, server.read("envs/kinds/LIVE_ENV")) == before


def test_ps_of_a_static_site(server, tmp_path):
    server.deployed(None, "pstatic", tmp_path, {"Procfile": "static: public\n", "public/index.html": "x\n"})
    assert ok(server.ssh("ps", "pstatic")) == "static: public/ served by nginx (no process)\n"


def test_ps_stop_restart(server, kinds):
    out = ok(server.ssh("ps", "kinds"))
    assert "web: 1 configured, 1 running" in out and "worker: 1 configured" in out
    port = server.app_port("kinds")
    ok(server.ssh("stop", "kinds"))
    # stop returns once the workers are gone: nothing answers any more
    assert server.http_get(port)[0] is None
    out = ok(server.ssh("ps", "kinds"))
    assert "web: 1 configured, 0 running (stopped)" in out and "worker: 1 configured, 0 running (stopped)" in out, out
    assert "not running" in ok(server.ssh("stop", "kinds"))  # stop on a stopped app works
    assert ok(server.ssh("apps")).count("  kinds") == 1
    ok(server.ssh("restart", "kinds"))
    server.wait_http(server.app_port("kinds"))
    assert "* kinds" in ok(server.ssh("apps"))
    ok(server.ssh("restart", "kinds"))  # restart on a running app works
    server.wait_http(server.app_port("kinds"))


def test_ps_scale_exact_difference(server, kinds):
    web_before = os.stat(server.path("uwsgi-enabled", "kinds_web.1.ini")).st_mtime_ns
    ok(server.ssh("ps:scale", "kinds", "worker=2"))
    assert os.path.exists(server.path("uwsgi-enabled", "kinds_worker.2.ini"))
    assert os.stat(server.path("uwsgi-enabled", "kinds_web.1.ini")).st_mtime_ns == web_before
    deadline = time.monotonic() + 20
    while not os.path.exists(server.path("data", "kinds", "worker.2")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.path.exists(server.path("data", "kinds", "worker.2"))
    ok(server.ssh("ps:scale", "kinds", "worker=0"))
    assert not any(n.startswith("kinds_worker") for n in os.listdir(server.path("uwsgi-enabled")))
    assert "worker: 0 configured" in ok(server.ssh("ps", "kinds"))
    ok(server.ssh("ps:scale", "kinds", "worker=1"))


def test_run_passes_stdin_stdout_and_exit_code(server, kinds):
    r = server.ssh("run", "kinds", "sh", "-c", shlex.quote("cat; echo $APP; pwd; exit 7"), input="from stdin\n")
    assert r.returncode == 7
    lines = r.stdout.splitlines()
    assert lines[0] == "from stdin" and lines[1] == "kinds" and "/releases/kinds/" in lines[2]
    r = server.ssh("run", "kinds", "python3", "-c", shlex.quote("import os; print(os.environ['GREETING'])"))
    assert r.stdout == "hello world\n"
    refused(server.ssh("run", "kinds", "no-such-binary-xyz"), "cannot run")
    r = server.ssh("run", "kinds")
    assert r.returncode == 2 and "run needs a command: run APP CMD [ARGS]..." in r.stderr, r.stderr
    r = server.ssh("run", "kinds", "ls", "--", "-a")  # the original piku's own example
    assert r.returncode == 0 and "..\n" in r.stdout and "Procfile" in r.stdout, r.stdout + r.stderr


def test_cron_job_runs(server, kinds):
    path = server.path("data", "kinds", "cron.log")
    deadline = time.monotonic() + 75
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(1)
    assert os.path.exists(path), server.read("logs/kinds/cron1.1.log")
    assert open(path).read().startswith("cron1 ")


def test_deploy_command_redeploys(server, kinds):
    out = ok(server.ssh("deploy", "kinds"))
    assert "-----> Deployed kinds" in out
    server.wait_http(server.app_port("kinds"))


def test_setup_ssh_from_stdin_no_duplicates(server):
    key = open(server.key + ".pub").read()
    assert "Key already present" in ok(server.ssh("setup:ssh", "-", input=key))
    before = open(os.path.join(server.home, ".ssh", "authorized_keys")).read()
    refused(server.ssh("setup:ssh", "-", input="not a key\n"))
    refused(server.ssh("setup:ssh", "-", input='command="sh" ' + key))
    assert open(os.path.join(server.home, ".ssh", "authorized_keys")).read() == before


def test_update_checks_the_new_file_first(server):
    broken = os.path.join(server.base, "broken.py")
    with open(broken, "w") as f:
        f.write("raise SystemExit(3)\n")
    os.chmod(broken, 0o644)
    before = open(server.piku_py).read()
    refused(server.ssh("update", broken), "does not run")
    assert open(server.piku_py).read() == before
    good = os.path.join(server.base, "good.py")
    with open(good, "w") as f:
        f.write(before)
    os.chmod(good, 0o644)
    assert "Updated piku.py" in ok(server.ssh("update", good))
    assert open(server.piku_py).read() == before
    from harness import free_port
    refused(server.ssh("update", f"https://127.0.0.1:{free_port()}/piku.py"), "cannot download")
    assert open(server.piku_py).read() == before


def test_restart_applies_settings_saved_without_auto_restart(server, kinds):
    out = ok(server.ssh("config:set", "kinds", "PIKU_AUTO_RESTART=false", "LATER=1"))
    assert "PIKU_AUTO_RESTART is false" in out and "Restarted" not in out
    assert "LATER" not in web_env(server)
    assert "Restarted kinds" in ok(server.ssh("restart", "kinds"))
    deadline = time.monotonic() + 20
    while web_env(server).get("LATER") != "1":
        assert time.monotonic() < deadline, "restart did not apply the saved settings"
        time.sleep(0.3)
    ok(server.ssh("config:unset", "kinds", "PIKU_AUTO_RESTART", "LATER"))
    assert "LATER" not in web_env(server)


def test_wsgi_workers_get_proc_type_and_index(server, tmp_path):
    app_py = ("import os\ndef application(environ, start_response):\n"
              "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
              "    return [f\"{os.environ.get('PROC_TYPE')} {os.environ.get('PROC_INDEX')}\".encode()]\n")
    server.deployed(None, "wsgienv", tmp_path, {"Procfile": "wsgi: app:application\n",
                                                "requirements.txt": "", "app.py": app_py})
    assert server.wait_http(server.app_port("wsgienv"))[1] == "wsgi 1"


def test_gevent_without_its_plugin_is_refused_at_deploy(server, tmp_path):
    files = {"Procfile": "wsgi: app:application\n", "requirements.txt": "", "ENV": "UWSGI_GEVENT=true\n",
             "app.py": "def application(e, s):\n    s('200 OK', [])\n    return [b'x']\n"}
    repo = server.make_app(None, tmp_path / "gev", files)
    r = server.push(repo, "gev")
    assert r.returncode != 0 and "apt-get install uwsgi-plugin-gevent-python3" in r.stdout, r.stdout


def test_plugins(server):
    pkg = server.path("plugins", "hello_plugin")
    os.makedirs(pkg, exist_ok=True)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("import click\n\n\ndef cli_commands():\n    @click.group()\n    def g():\n        pass\n\n"
                "    @g.command('hello')\n    def hello():\n        '''Say hello.'''\n        click.echo('hello from plugin')\n"
                "    return g\n")
    try:
        assert ok(server.ssh("hello")) == "hello from plugin\n"
        assert "hello" in ok(server.ssh("help"))
    finally:
        import shutil
        shutil.rmtree(pkg)


def test_destroy_removes_exactly_the_app_and_keeps_data(server, tmp_path):
    repo = server.make_app("req-web", tmp_path / "doomed")
    assert server.push(repo, "doomed").returncode == 0
    repo2 = server.make_app("req-web", tmp_path / "doomed2")
    assert server.push(repo2, "doomed2").returncode == 0
    os.makedirs(server.path("data", "doomed"), exist_ok=True)
    with open(server.path("data", "doomed", "keep.txt"), "w") as f:
        f.write("x")
    out = ok(server.ssh("destroy", "doomed", "--confirm", "doomed"))
    assert "kept" in out and "data/doomed" in out
    for rel in ("apps/doomed", "repos/doomed", "envs/doomed", "logs/doomed", "releases/doomed",
                "uwsgi-enabled/doomed_web.1.ini", "uwsgi-available/doomed_web.1.ini"):
        assert not os.path.lexists(server.path(rel)), rel
    assert os.path.exists(server.path("data", "doomed", "keep.txt"))
    assert os.path.exists(server.path("repos", "doomed2"))
    server.wait_http(server.app_port("doomed2"), contains="req-web")


def scp(server, *args):
    argv = ["scp", "-O", "-q", "-P", str(server.ssh_port)] + [a for a in server.ssh_argv()[1:]
                                                                if a not in ("-p", str(server.ssh_port))]
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=60)


def test_scp_reaches_only_app_data(server, kinds, tmp_path):
    src = tmp_path / "upload.txt"
    src.write_text("uploaded\n")
    r = scp(server, str(src), f"{USER}@127.0.0.1:kinds/")
    assert r.returncode == 0, r.stderr
    assert open(server.path("data", "kinds", "upload.txt")).read() == "uploaded\n"
    r = scp(server, f"{USER}@127.0.0.1:{server.path('data', 'kinds', 'upload.txt')}", str(tmp_path / "back.txt"))
    assert r.returncode == 0 and (tmp_path / "back.txt").read_text() == "uploaded\n", r.stderr
    before = server.tree()
    auth = os.path.join(server.home, ".ssh", "authorized_keys")
    keys = open(auth).read()
    for target in (".ssh/authorized_keys", "../.ssh/", "kinds/../../", "/etc/", "nosuchapp/", "'a;id'"):
        r = scp(server, str(src), f"{USER}@127.0.0.1:{target}")
        assert r.returncode != 0, target
    assert open(auth).read() == keys and server.tree() == before
    r = server.ssh("scp", "-t", "-oProxyCommand=x", "kinds/")
    assert r.returncode != 0 and "refused" in r.stderr


def test_port_of_another_app_or_program_is_refused(server, kinds, tmp_path):
    """The health check would take whatever listens on PORT for the app: a port another app
    has, or one some other program listens on, is refused and nothing changes."""
    files = {"Procfile": "web: python3 -m http.server --bind $BIND_ADDRESS $PORT\n"}
    server.deployed(None, "portless", tmp_path, files)
    mine, theirs = server.app_port("portless"), server.app_port("kinds")
    before = server.read("envs/portless/ENV")
    refused(server.ssh("config:set", "portless", f"PORT={theirs}"), f"PORT {theirs} is already used by app kinds")
    refused(server.ssh("config:set", "portless", f"PORT={server.ssh_port}"), "something else listens there")
    assert server.read("envs/portless/ENV") == before and server.app_port("portless") == mine
    from harness import free_port
    port = free_port()
    assert server.ssh("config:set", "portless", f"PORT={port}").returncode == 0
    assert server.app_port("portless") == port
    server.wait_http(port)
    assert server.ssh("config:set", "portless", f"PORT={port}", "X=1").returncode == 0  # its own port


def test_app_name_that_could_share_worker_files_is_refused(server, kinds, tmp_path):
    repo = server.make_app("kinds", tmp_path / "kinds_web")
    r = server.push(repo, "kinds_web")
    assert r.returncode != 0 and "app name kinds_web is refused: with app kinds" in r.stdout, r.stdout
    assert not os.path.exists(server.path("repos", "kinds_web"))
