"""Issue 14: day-two commands through real ssh: ssh keys, safe destroy, config export/import and
cron control (cron:run, overlap, @reboot, run records)."""
import json
import os
import shlex
import shutil
import subprocess

import pytest

from harness import USER, wait_for

HOSTILE = 'a b\n$HOME ; #x "q" \'s\' @(exec://id) %(k) =eq\\back'
WEB = open(os.path.join(os.path.dirname(__file__), "..", "apps", "kinds", "server.py")).read()


# The cron app is deployed before the first test of this module, so uWSGI's minute clock runs
# while the other tests do: the overlap test waits for scheduled runs at minute boundaries.
pytestmark = pytest.mark.usefixtures("daycron")


def ok(r):
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def refused(r, text, code=None):
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and text in r.stderr and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def authorized_keys(server):
    return os.path.join(server.home, ".ssh", "authorized_keys")


# -- keys -------------------------------------------------------------------

def keypair(server, comment):
    path = os.path.join(server.priv, comment)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True)
    fp = subprocess.run(["ssh-keygen", "-l", "-f", path + ".pub"], capture_output=True, text=True).stdout.split()[1]
    return path, open(path + ".pub").read(), fp


def ssh_with(server, key, *args):
    argv = server.ssh_argv()
    argv[argv.index("-i") + 1] = key
    return subprocess.run(argv + ["-o", "IdentitiesOnly=yes", f"{USER}@127.0.0.1", *args], capture_output=True,
                          text=True, timeout=60)


def test_keys_add_list_remove_over_ssh(server):
    auth = authorized_keys(server)
    foreign = "# kept: the admin's note\n"
    with open(auth, "a") as f:  # a line piku did not write
        f.write(foreign)
    mine = subprocess.run(["ssh-keygen", "-l", "-f", server.key + ".pub"], capture_output=True, text=True).stdout.split()[1]
    key, pub, fp = keypair(server, "carol@laptop")
    assert ssh_with(server, key, "apps").returncode == 255  # not authorized yet
    assert f"Added key 256 {fp} carol@laptop" in ok(server.ssh("keys:add", input=pub))
    assert ok(ssh_with(server, key, "keys")).splitlines() == [f"ssh-ed25519 {mine} piku-test",
                                                              f"ssh-ed25519 {fp} carol@laptop"]
    assert "Key already present" in ok(server.ssh("keys:add", "-", input=pub))
    before = open(auth).read()
    for args, text in [(["keys:remove", "SHA256:nosuchkey"], "no key with the fingerprint or comment 'SHA256:nosuchkey'"),
                       (["keys:remove", "nobody@nowhere"], "no key with the fingerprint or comment"),
                       (["keys:add"], "expected exactly one public key line"),
                       (["keys:add", "/nonexistent.pub"], "no such key file"),
                       (["keys:remove"], "Missing argument")]:
        refused(server.ssh(*args), text)
        assert open(auth).read() == before
    assert f"Removed key {fp} carol@laptop" in ok(server.ssh("keys:remove", "carol@laptop"))
    assert ssh_with(server, key, "apps").returncode == 255  # that key is out again
    refused(server.ssh("keys:remove", mine), "is the last key piku has")
    assert open(auth).read().endswith(foreign) and ok(server.ssh("keys")).count("\n") == 1


# -- destroy ----------------------------------------------------------------

def static_app(server, tmp_path, app):
    server.deployed(None, app, tmp_path, {"Procfile": "static: public\n", "public/index.html": "x\n"})


def test_destroy_asks_for_the_name_on_a_terminal(server, tmp_path):
    static_app(server, tmp_path, "goner")
    argv = server.ssh_argv() + ["-tt", f"{USER}@127.0.0.1", "destroy", "goner"]
    r = subprocess.run(argv, input="gonerr\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Type the app's name to confirm" in r.stdout, r.stdout
    assert "'gonerr' is not 'goner': nothing was removed" in r.stdout
    assert os.path.exists(server.path("repos", "goner"))
    r = subprocess.run(argv, input="goner\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Destroyed goner" in r.stdout, r.stdout
    assert not os.path.exists(server.path("repos", "goner"))


def test_destroy_without_a_terminal_needs_the_flag(server, tmp_path):
    static_app(server, tmp_path, "keeper")
    before = server.tree()
    refused(server.ssh("destroy", "keeper"), "confirm with `destroy keeper --confirm keeper` (or --force)", code=2)
    refused(server.ssh("destroy", "keeper", "--confirm", "other"), "'other' is not 'keeper'", code=1)
    assert server.tree() == before
    assert "Destroyed keeper" in ok(server.ssh("destroy", "keeper", "--force"))


# -- config:export / config:import ------------------------------------------

@pytest.fixture(scope="module")
def conf(server, tmp_path_factory):
    server.deployed(None, "dayconf", tmp_path_factory.mktemp("dayconf"),
                    {"Procfile": "web: python3 server.py\n", "server.py": WEB})
    return "dayconf"


def web_env(server, app):
    return json.loads(server.wait_http(server.app_port(app))[1])


def test_config_export_import_round_trip_of_hostile_values(server, conf):
    values = {"WEIRD": HOSTILE, "SPACES": "  two  ", "EMPTY": "", "UNI": "é\u2028x\x0cy"}
    for key, value in values.items():
        ok(server.ssh("config:set", conf, shlex.quote(f"{key}={value}")))
    exported = ok(server.ssh("config:export", conf))
    as_json = json.loads(ok(server.ssh("config:export", conf, "--json")))
    assert as_json == values
    ok(server.ssh("config:unset", conf, *values))
    assert not set(values) & set(web_env(server, conf))
    out = ok(server.ssh("config:import", conf, input=exported))
    assert out.count("Restarted dayconf") == 1 and "WEIRD: set" in out, out
    env = web_env(server, conf)
    assert {k: env[k] for k in values} == {**values, "WEIRD": HOSTILE.replace("$HOME", server.home)}  # (expanded)
    assert ok(server.ssh("config:export", conf)) == exported
    assert "Nothing to change" in ok(server.ssh("config:import", conf, input=json.dumps(as_json)))
    fewer = json.dumps({k: v for k, v in values.items() if k != "UNI"})
    out = ok(server.ssh("config:import", conf, "--replace", input=fewer))
    assert "UNI: unset" in out and out.count("Restarted dayconf") == 1
    assert "UNI" not in web_env(server, conf)


@pytest.mark.parametrize("args,stdin,text", [
    ([], "GOOD=1\nthis is not a setting\n", "config:import input line 2: expected KEY=value"),
    ([], '{"PORT": 8000}', "PORT: values must be JSON strings"),
    ([], '{"A": "1"', "not valid JSON"),
    ([], "", "nothing to import"),
    ([], "PORT=notaport\n", "PORT: expected a whole number"),
    (["--json"], None, "No such option: --json"),
])
def test_config_import_bad_input_changes_nothing(server, conf, args, stdin, text):
    before = server.tree()
    refused(server.ssh("config:import", conf, *args, input=stdin), text)
    assert server.tree() == before


def test_config_export_import_of_unknown_apps(server):
    refused(server.ssh("config:export", "nosuchapp"), "no such app")
    refused(server.ssh("config:import", "nosuchapp", input="A=1\n"), "no such app")
    refused(server.ssh("config:import", "'../x'", input="A=1\n"), "invalid app name")


# -- cron -------------------------------------------------------------------

CRON_APP = {
    "Procfile": "cronfail: 0 0 1 1 * echo out-$APP-$PROC_TYPE.$PROC_INDEX; echo err-line >&2; exit 3\n"
                "cronwait: * * * * * echo waiting; while [ ! -e $DATA_ROOT/go ]; do sleep 0.2; done; echo waited\n"
                "cronnames: 0 9 * jan-dec mon-fri echo weekday\n"
                "cronweekly: @weekly echo weekly\n",
    "ENV": "PIKU_CRON_OVERLAP=forbid\n",
}
BOOT_APP = {
    "Procfile": "cronboot: @reboot echo boot $PROC_TYPE >> $DATA_ROOT/boot.log\n"
                "cronhold: @reboot while [ ! -e $DATA_ROOT/release ]; do sleep 0.2; done; echo released\n",
    "ENV": "PIKU_CRON_OVERLAP=forbid\n",
}


@pytest.fixture(scope="module")
def daycron(server, tmp_path_factory):
    server.deployed(None, "daycron", tmp_path_factory.mktemp("daycron"), CRON_APP)
    return "daycron"


def cron_log(server, app, kind):
    return server.read(f"logs/{app}/{kind}.1.log") or ""


def test_cron_run_returns_the_job_exit_code_and_output(server, daycron):
    r = server.ssh("cron:run", daycron, "cronfail")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "out-daycron-cronfail.1\n" in r.stdout and "Running cronfail of daycron now" in r.stdout
    assert "err-line" in r.stderr and "cronfail failed: exit 3 after" in r.stderr.strip().splitlines()[-1]
    log = cron_log(server, daycron, "cronfail")
    assert "[piku cron] cronfail.1: started (cron:run): echo out-" in log
    assert "[piku cron] cronfail.1: finished: exit 3 after " in log
    r = server.ssh("cron:run", daycron, "cronnames")
    assert r.returncode == 0 and "weekday\n" in r.stdout and "cronnames finished: exit 0" in r.stdout
    assert "cronweekly: 1 configured" in ok(server.ssh("ps", daycron))


@pytest.mark.parametrize("args,text", [
    (["cron:run", "daycron", "nosuch"], "daycron has no cron job 'nosuch': its cron jobs are cronfail, cronwait"),
    (["cron:run", "daycron", "'../x'"], "daycron has no cron job '../x'"),
    (["cron:run", "nosuchapp", "cron1"], "no such app"),
    (["cron:run", "daycron"], "Missing argument 'KIND'"),
    (["exec-worker", "--at-start", "daycron", "cronfail", "1"], "internal"),
])
def test_cron_run_bad_input_changes_nothing(server, daycron, args, text):
    before = server.tree()
    refused(server.ssh(*args), text)
    assert server.tree() == before


def test_a_bad_schedule_rejects_the_push(server, tmp_path):
    repo = server.make_app(None, tmp_path / "badcron", {"Procfile": "cron: @often echo x\n"})
    r = server.push(repo, "badcron")
    assert r.returncode != 0 and "Procfile line 1: unknown cron shortcut '@often'" in r.stdout, r.stdout


def test_reboot_jobs_run_when_the_worker_starts_and_never_twice_at_once(server, tmp_path):
    server.deployed(None, "dayboot", tmp_path, BOOT_APP)
    boot = server.path("data", "dayboot", "boot.log")
    wait_for("the @reboot job after the deploy", lambda: "finished: exit 0" in cron_log(server, "dayboot", "cronboot"))
    assert open(boot).read() == "boot cronboot\n"
    assert "started (@reboot): echo boot" in cron_log(server, "dayboot", "cronboot")
    wait_for("the held @reboot job to start", lambda: "started (@reboot)" in cron_log(server, "dayboot", "cronhold"))
    ok(server.ssh("restart", "dayboot"))  # the workers start again: the job runs again ...
    wait_for("the @reboot job after restart", lambda: open(boot).read() == "boot cronboot\n" * 2)
    # ... but the one still running from the deploy (a restart does not stop it) holds the lock
    wait_for("the second start of the held job to be skipped",
             lambda: "skipped (@reboot): the previous run (pid" in cron_log(server, "dayboot", "cronhold"))
    open(server.path("data", "dayboot", "release"), "w").close()
    wait_for("the held job to end", lambda: "finished: exit 0" in cron_log(server, "dayboot", "cronhold"))
    assert cron_log(server, "dayboot", "cronhold").count("started (@reboot)") == 1
    assert ok(server.ssh("cron:run", "dayboot", "cronboot")) and open(boot).read() == "boot cronboot\n" * 3


def test_overlap_forbid_skips_runs_while_one_is_running(server, daycron):
    """A scheduled run of cronwait blocks until data/daycron/go exists: while it runs, cron:run
    and the next minute's scheduled run are skipped and say so in the job's log."""
    wait_for("the first scheduled run", lambda: "started (scheduled)" in cron_log(server, daycron, "cronwait"), 75)
    r = server.ssh("cron:run", daycron, "cronwait")
    refused(r, "cronwait was not run: its previous run (pid ")
    assert "PIKU_CRON_OVERLAP=forbid" in r.stderr and "waiting" not in r.stdout.splitlines()
    assert "skipped (cron:run)" in cron_log(server, daycron, "cronwait")
    try:  # (up to two minute boundaries: once, on a loaded CI machine, the next minute's run came later)
        wait_for("a scheduled run to be skipped",
                 lambda: "skipped (scheduled): the previous run" in cron_log(server, daycron, "cronwait"), 135)
    finally:  # the blocked job must end whatever happens: a job left running fails later tests
        open(server.path("data", daycron, "go"), "w").close()
    wait_for("the run to end", lambda: "finished: exit 0" in cron_log(server, daycron, "cronwait"))
    log = cron_log(server, daycron, "cronwait")
    first = log[log.index("started (scheduled)"):]
    assert first.index("waiting") < first.index("waited") < first.index("finished: exit 0"), log
    r = server.ssh("cron:run", daycron, "cronwait")
    assert r.returncode == 0 and r.stdout.count("waiting\nwaited\n") == 1, r.stdout + r.stderr
