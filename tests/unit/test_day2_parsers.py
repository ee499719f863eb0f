"""Unit tests for the day-two commands (issue 14): safe destroy, config export/import, ssh keys,
cron control and the client's groups of remotes. Commands run through piku.main() against a
PIKU_ROOT in tmp_path, with stdin replaced."""
import io
import os
import time

import pytest

import piku
from piku import PikuError


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("PIKU_ROOT", str(tmp_path / "piku"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSH_ORIGINAL_COMMAND", raising=False)
    paths = piku.paths_for(str(tmp_path / "piku"))
    piku.ensure_dirs(*paths[1:], str(tmp_path / "home"))
    return paths


def call(capsys, monkeypatch, argv, stdin=""):
    monkeypatch.setattr("sys.stdin", stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin))
    code = piku.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def make_app(paths, app):
    os.makedirs(os.path.join(paths.repos, app))


# -- destroy ----------------------------------------------------------------

def test_destroy_without_confirmation_names_the_flags_and_removes_nothing(root, capsys, monkeypatch):
    make_app(root, "shop")
    code, out, err = call(capsys, monkeypatch, ["destroy", "shop"])
    assert code == 2 and "confirm with `destroy shop --confirm shop` (or --force); nothing was removed" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = call(capsys, monkeypatch, ["destroy", "shop", "--confirm", "shopp"])
    assert code == 1 and "'shopp' is not 'shop': nothing was removed" in err
    assert os.path.isdir(os.path.join(root.repos, "shop"))


@pytest.mark.parametrize("argv,stdin", [(["--confirm", "shop"], ""), (["--force"], ""), ([], Tty("shop\n"))])
def test_destroy_confirmed(root, capsys, monkeypatch, argv, stdin):
    make_app(root, "shop")
    code, out, err = call(capsys, monkeypatch, ["destroy", "shop", *argv], stdin)
    assert code == 0 and "Destroyed shop" in out, err
    assert not os.path.exists(os.path.join(root.repos, "shop"))


def test_destroy_prompt_on_a_terminal_refuses_another_name(root, capsys, monkeypatch):
    make_app(root, "shop")
    code, out, err = call(capsys, monkeypatch, ["destroy", "shop"], Tty("other\n"))
    assert code == 1 and "Type the app's name to confirm" in err and "'other' is not 'shop'" in err
    assert os.path.isdir(os.path.join(root.repos, "shop"))


def test_destroy_of_an_unknown_app_says_so_before_asking(root, capsys, monkeypatch):
    code, out, err = call(capsys, monkeypatch, ["destroy", "nope", "--force"])
    assert code == 1 and "no such app: nope" in err


def test_client_asks_for_the_name_before_destroy(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("shop\n"))
    assert piku.client_confirm_destroy(["destroy", "shop"], "shop", "piku@h") == \
        ["destroy", "shop", "--confirm", "shop"]
    assert "Type the app's name to confirm" in capsys.readouterr().err
    for given in (["--force"], ["--confirm", "shop"], ["--confirm=shop"]):
        assert piku.client_confirm_destroy(["destroy", "shop", *given], "shop", "h") == ["destroy", "shop", *given]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(PikuError, match="'' is not 'shop': nothing was removed"):
        piku.client_confirm_destroy(["destroy", "shop"], "shop", "h")


# -- config:export / config:import ------------------------------------------

HOSTILE = ['a b\n$HOME ; #x "q" \'s\' @(exec://id) %(k) =eq\\back', " lead", "trail ", "", "'q'", '"dq"',
           "a\x0cb", "a\x0bb", "x\x1cy\x1dz\x1e", "next\x85line", "u\u2028v\u2029w", "tab\there", "\r", "é ü 中",
           "zero\u200bwidth", "${HOME}", "=", "#", "\\", "\udc80 undecodable", "export X=1"]


def test_env_rendering_round_trips_hostile_values():
    config = {f"K{i}": v for i, v in enumerate(HOSTILE)}
    assert piku.parse_env(piku.render_env(config)) == config
    assert piku.parse_config_import(piku.render_env(config)) == config


def test_config_import_reads_json_and_env_lines():
    assert piku.parse_config_import('{"A": "1", "B": "x y"}') == {"A": "1", "B": "x y"}
    assert piku.parse_config_import("# c\nexport A=1\nB=$A-2\nC='$A'\n") == {"A": "1", "B": "1-2", "C": "$A"}


@pytest.mark.parametrize("text,error", [
    ("A=1\nnot a setting\n", "config:import input line 2: expected KEY=value"),
    ("1BAD=x\n", "line 1"),
    ("", "nothing to import"),
    ("# only a comment\n\n", "nothing to import"),
    ('{"A": 1}', "A: values must be JSON strings, got 1"),
    ('{"A": null}', "got null"),
    ('{"bad key": "x"}', "invalid key 'bad key'"),
    ('{"A": "1",}', "not valid JSON"),
    ('["A=1"]', "line 1: expected KEY=value"),
    ('{}', "nothing to import"),
    ("A=" + "x" * 1_000_001, "larger than 1 MB"),
])
def test_config_import_bad_input(text, error):
    with pytest.raises(PikuError, match=error.replace("(", r"\(").replace("[", r"\[")):
        piku.parse_config_import(text)


def test_a_nul_in_a_value_is_refused():
    with pytest.raises(PikuError, match="A holds a NUL character"):
        piku.validate_settings({"A": "x\0y"})


def test_plan_config_changes():
    assert piku.plan_config_changes({"A": "1", "B": "2", "C": "3"}, {"A": "1", "B": "x", "D": "4"}) == ["B", "C", "D"]


def test_config_export_import_round_trip(root, capsys, monkeypatch):
    make_app(root, "shop")
    config = {f"K{i}": v for i, v in enumerate(HOSTILE)} | {"PORT": "8123"}
    piku.write_config(root, "shop", config)
    for flag in ([], ["--json"]):
        code, exported, err = call(capsys, monkeypatch, ["config:export", "shop", *flag])
        assert code == 0, err
        make_app(root, "copy" + "".join(flag).strip("-"))
        target = "copy" + "".join(flag).strip("-")
        code, out, err = call(capsys, monkeypatch, ["config:import", target], exported)
        assert code == 0, err
        assert piku.load_config(root, target) == config
        assert "not deployed yet" in out and "K1: set" in out
        assert oct(os.stat(os.path.join(root.envs, target, "ENV")).st_mode & 0o777) == "0o600"


def test_config_import_merges_or_replaces_and_skips_no_change(root, capsys, monkeypatch):
    make_app(root, "shop")
    piku.write_config(root, "shop", {"A": "1", "B": "2"})
    code, out, err = call(capsys, monkeypatch, ["config:import", "shop"], "B=3\nC=4\n")
    assert code == 0 and piku.load_config(root, "shop") == {"A": "1", "B": "3", "C": "4"}
    assert "A: " not in out and "B: set" in out and "C: set" in out
    code, out, err = call(capsys, monkeypatch, ["config:import", "shop"], "B=3\n")
    assert code == 0 and "Nothing to change" in out
    code, out, err = call(capsys, monkeypatch, ["config:import", "shop", "--replace"], "C=4\n")
    assert code == 0 and piku.load_config(root, "shop") == {"C": "4"} and "A: unset" in out


@pytest.mark.parametrize("stdin,error", [
    ("PORT=notaport\n", "PORT: expected a whole number"),
    ("A=1\nB\n", "line 2"),
    ('{"A": "x\\u0000y"}', "NUL"),
    (Tty(""), "config:import reads the settings from stdin"),
])
def test_config_import_refusals_change_nothing(root, capsys, monkeypatch, stdin, error):
    make_app(root, "shop")
    piku.write_config(root, "shop", {"A": "1"})
    before = open(os.path.join(root.envs, "shop", "ENV")).read()
    code, out, err = call(capsys, monkeypatch, ["config:import", "shop"], stdin)
    assert code != 0 and error in err and len(err.strip().splitlines()) == 1, err
    assert open(os.path.join(root.envs, "shop", "ENV")).read() == before


def test_config_import_of_an_unknown_app(root, capsys, monkeypatch):
    code, out, err = call(capsys, monkeypatch, ["config:import", "nope"], "A=1\n")
    assert code == 1 and "no such app: nope" in err
    code, out, err = call(capsys, monkeypatch, ["config:export", "nope"])
    assert code == 1 and "no such app: nope" in err


# -- ssh keys ---------------------------------------------------------------

def new_key(tmp_path, comment):
    import subprocess
    path = tmp_path / f"key-{len(list(tmp_path.glob('key-*')))}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
    return (tmp_path / (path.name + ".pub")).read_text()


def keygen_fingerprint(pub):
    import subprocess
    return subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=pub, capture_output=True, text=True).stdout.split()[1]


def test_key_lines_are_parsed_as_sshd_reads_them(tmp_path):
    pub = new_key(tmp_path, "alice@laptop")
    fp = keygen_fingerprint(pub)
    plain = piku.parse_key_line(pub)
    assert plain == piku.AuthorizedKey("ssh-ed25519", fp, "alice@laptop", False)
    ours = piku.render_authorized_key("/usr/bin/python3", "/home/piku/piku.py", "/home/piku/.piku", pub)
    assert piku.parse_key_line(ours) == plain._replace(piku=True)
    original = ('command="FINGERPRINT=SHA256:x NAME=default /home/piku/piku.py $SSH_ORIGINAL_COMMAND",'
                "no-agent-forwarding,no-user-rc,no-X11-forwarding,no-port-forwarding " + pub)
    assert piku.parse_key_line(original).piku
    quoted = 'from="10.0.0.1",command="echo \\"a b, c\\" piku",no-pty ' + pub
    assert piku.parse_key_line(quoted) == plain  # another command that merely mentions piku
    assert piku.parse_key_line(pub.split()[0] + " " + pub.split()[1]).comment == ""
    for junk in ("", "# a comment", "   ", "ssh-ed25519", "ssh-ed25519 not!base64 c", "garbage line here",
                 'command="unterminated ssh-ed25519 AAAA', "ssh-ed25519 AAAAC3Nz=a= x"):
        assert piku.parse_key_line(junk) is None, junk


def keyset(*specs):
    """[(index, AuthorizedKey)] from (fingerprint, comment, piku) triples."""
    return [(i, piku.AuthorizedKey("ssh-ed25519", fp, c, mine)) for i, (fp, c, mine) in enumerate(specs)]


def test_plan_key_removal():
    keys = keyset(("SHA256:aaa", "alice", True), ("SHA256:bbb", "bob", True), ("SHA256:aaa", "alice", True),
                  ("SHA256:ccc", "admin", False), ("SHA256:ddd", "twin", True), ("SHA256:eee", "twin", True))
    assert piku.plan_key_removal(keys, "SHA256:aaa")[0] == [0, 2]
    assert piku.plan_key_removal(keys, "bbb")[0] == [1]
    assert piku.plan_key_removal(keys, "bob") == ([1], keys[1][1])
    for wanted, error in [("SHA256:zzz", "no key with the fingerprint or comment 'SHA256:zzz'"),
                          ("twin", "2 keys have the comment 'twin' (SHA256:ddd, SHA256:eee)"),
                          ("admin", "key SHA256:ccc was not added by piku"),
                          ("", "expected a fingerprint"), ("a\nb", "expected a fingerprint")]:
        with pytest.raises(PikuError, match=error.replace("(", r"\(").replace(")", r"\)")):
            piku.plan_key_removal(keys, wanted)
    last = keyset(("SHA256:aaa", "alice", True), ("SHA256:ccc", "admin", False))
    with pytest.raises(PikuError, match="the last key piku has.*pass --force"):
        piku.plan_key_removal(last, "alice")
    assert piku.plan_key_removal(last, "alice", force=True)[0] == [0]


def test_keys_add_list_remove_keep_other_lines(root, capsys, monkeypatch, tmp_path):
    auth = os.path.join(os.environ["HOME"], ".ssh", "authorized_keys")
    os.makedirs(os.path.dirname(auth))
    alice, bob, admin = new_key(tmp_path, "alice"), new_key(tmp_path, "bob"), new_key(tmp_path, "admin")
    foreign = f"# the admin's own lines\n\nfrom=\"10.0.0.1\" {admin}garbage that is no key\n"
    with open(auth, "w") as f:
        f.write(foreign)
    assert call(capsys, monkeypatch, ["keys:add"], alice)[0] == 0
    code, out, err = call(capsys, monkeypatch, ["keys:add", "-"], bob)
    assert code == 0 and "Added key 256 " + keygen_fingerprint(bob) in out
    code, out, err = call(capsys, monkeypatch, ["keys:add"], bob)
    assert code == 0 and "Key already present" in out
    code, out, err = call(capsys, monkeypatch, ["keys"])
    assert out.splitlines() == [f"ssh-ed25519 {keygen_fingerprint(admin)} admin  [not added by piku: left alone]",
                                f"ssh-ed25519 {keygen_fingerprint(alice)} alice",
                                f"ssh-ed25519 {keygen_fingerprint(bob)} bob"]
    code, out, err = call(capsys, monkeypatch, ["keys:remove", keygen_fingerprint(alice)])
    assert code == 0 and f"Removed key {keygen_fingerprint(alice)} alice" in out
    for wanted, error in [("alice", "no key with the fingerprint or comment 'alice'"),
                          ("admin", "was not added by piku"), ("bob", "the last key piku has")]:
        before = open(auth).read()
        code, out, err = call(capsys, monkeypatch, ["keys:remove", wanted])
        assert code == 1 and error in err and len(err.strip().splitlines()) == 1, err
        assert open(auth).read() == before
    code, out, err = call(capsys, monkeypatch, ["keys:remove", "bob", "--force"])
    assert code == 0 and open(auth).read() == foreign
    assert oct(os.stat(auth).st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("stdin,error", [("", "expected exactly one public key line"),
                                         ("a\nb\n", "expected exactly one"),
                                         ('command="sh" ssh-ed25519 AAAA x', "options are not allowed"),
                                         ("ssh-ed25519 AAAAnotakeyx x", "ssh-keygen rejected the key")])
def test_keys_add_refuses_what_setup_ssh_refuses(root, capsys, monkeypatch, stdin, error):
    code, out, err = call(capsys, monkeypatch, ["keys:add"], stdin)
    assert code == 1 and error in err
    assert not os.path.exists(os.path.join(os.environ["HOME"], ".ssh", "authorized_keys"))
    code, out, err = call(capsys, monkeypatch, ["keys:add", "/nonexistent.pub"])
    assert code == 1 and "no such key file: /nonexistent.pub" in err


# -- cron -------------------------------------------------------------------

def test_cron_names_and_shortcuts():
    sets, cmd = piku.parse_cron("30 9 * jan,JUL-sep mon-fri ./report.sh --x")
    assert cmd == "./report.sh --x" and sets[3] == {1, 7, 8, 9} and sets[4] == {1, 2, 3, 4, 5}
    assert piku.parse_cron("0 0 * * sun-sat/2 x")[0][4] == {0, 2, 4, 6}
    assert piku.parse_cron("@daily python job.py")[0] == piku.parse_cron("0 0 * * * x")[0]
    assert piku.parse_cron("@hourly  x")[0][0] == {0} and piku.parse_cron("@hourly x")[0][1] == set(range(24))
    assert piku.parse_cron("@weekly x")[0][4] == {0} and piku.parse_cron("@monthly x")[0][2] == {1}
    assert piku.parse_cron("@yearly x")[0][3] == {1} and piku.parse_cron("@annually x") == piku.parse_cron("@yearly x")
    assert piku.parse_cron("@reboot python warm.py --all") == (None, "python warm.py --all")
    assert not piku.cron_matches(None, time.localtime())


@pytest.mark.parametrize("spec,error", [
    ("@often x", "unknown cron shortcut '@often': use @reboot, @hourly"),
    ("@daily", "cron @daily needs a command"),
    ("@reboot   ", "cron @reboot needs a command"),
    ("0 0 * * monday x", "bad cron day of week field 'monday' (names: sun, mon"),
    ("0 0 * mon * x", "bad cron month field 'mon' (names: jan"),
    ("0 mon * * * x", "bad cron hour field 'mon' (no names here)"),
    ("0 0 * * */mon x", "bad cron day of week field"),
    ("0 0 * * fri-mon x", "out of range"),
])
def test_cron_errors(spec, error):
    with pytest.raises(PikuError, match=error.replace("(", r"\(").replace(")", r"\)")):
        piku.parse_cron(spec)


def test_procfile_accepts_the_new_cron_forms():
    workers, _ = piku.parse_procfile("cron-a: @reboot python warm.py\ncron-b: 0 9 * * mon-fri x\n")
    assert workers == {"cron-a": "@reboot python warm.py", "cron-b": "0 9 * * mon-fri x"}
    with pytest.raises(PikuError, match="Procfile line 1: unknown cron shortcut"):
        piku.parse_procfile("cron: @sometimes x\n")


def test_cron_record():
    tm = time.struct_time((2026, 5, 1, 12, 0, 3, 4, 121, 0))
    assert piku.render_cron_record(tm, "cron1.1", "finished: exit 0 after 1.00s") == \
        "2026-05-01 12:00:03 [piku cron] cron1.1: finished: exit 0 after 1.00s\n"


@pytest.fixture
def cronapp(root):
    """A deployed app `jobs` with cron kinds; its jobs write into data/jobs."""
    release = os.path.join(root.releases, "jobs", "r1")
    data = os.path.join(root.data, "jobs")
    piku.ensure_dirs(release, data, os.path.join(root.repos, "jobs"), os.path.join(root.envs, "jobs"))
    with open(os.path.join(release, "Procfile"), "w") as f:
        f.write("web: python3 -m http.server\n"
                "cron1: */5 * * * * echo ran $PROC_TYPE.$PROC_INDEX $GREETING; echo oops >&2; exit 3\n"
                "cronboot: @reboot echo booted >> $DATA_ROOT/boot\n")
    os.symlink(release, os.path.join(root.apps, "jobs"))
    piku.write_atomic(os.path.join(root.envs, "jobs", "LIVE_ENV"),
                      piku.render_env({"GREETING": "hi there", "DATA_ROOT": data, "PATH": "/usr/bin:/bin"}))
    return root


def job_log(root, worker):
    return open(os.path.join(root.logs, "jobs", f"{worker}.log")).read()


def test_cron_run_gives_the_exit_code_and_records_the_run(cronapp, capfd, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code = piku.main(["cron:run", "jobs", "cron1"])
    out, err = capfd.readouterr()
    assert code == 3 and "ran cron1.1 hi there" in out and "oops" in err
    assert "Running cron1 of jobs now: echo ran" in out
    assert "cron1 failed: exit 3 after" in err.strip().splitlines()[-1]
    log = job_log(cronapp, "cron1.1").splitlines()
    assert "[piku cron] cron1.1: started (cron:run): echo ran" in log[0]
    assert "[piku cron] cron1.1: finished: exit 3 after " in log[1]


@pytest.mark.parametrize("argv,error", [
    (["cron:run", "jobs", "nosuch"], "jobs has no cron job 'nosuch': its cron jobs are cron1, cronboot"),
    (["cron:run", "jobs", "web"], "jobs has no cron job 'web'"),
    (["cron:run", "nope", "cron1"], "no such app: nope"),
    (["cron:run", "jobs"], "Missing argument 'KIND'"),
])
def test_cron_run_refusals(cronapp, capsys, monkeypatch, argv, error):
    code, out, err = call(capsys, monkeypatch, argv)
    assert code != 0 and error in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(os.path.join(cronapp.logs, "jobs"))


def test_cron_run_of_an_app_not_deployed(root, capsys, monkeypatch):
    make_app(root, "fresh")
    code, out, err = call(capsys, monkeypatch, ["cron:run", "fresh", "cron1"])
    assert code == 1 and "fresh has not been deployed yet" in err


def test_overlap_forbid_skips_while_a_run_holds_the_lock(cronapp, capfd, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    fd, _ = piku.take_cron_lock(cronapp, "jobs", "cron1")  # a run in progress
    try:
        fd2, holder = piku.take_cron_lock(cronapp, "jobs", "cron1")
        assert fd2 is None and holder.startswith(f"pid {os.getpid()}, started 20")
        assert piku.main(["cron:run", "jobs", "cron1"]) == 3  # allow (the default): it runs anyway
        live = os.path.join(cronapp.envs, "jobs", "LIVE_ENV")
        piku.write_atomic(live, open(live).read() + "PIKU_CRON_OVERLAP=forbid\n")
        capfd.readouterr()
        assert piku.main(["cron:run", "jobs", "cron1"]) == 1
        out, err = capfd.readouterr()
        assert f"cron1 was not run: its previous run (pid {os.getpid()}, started" in err and "ran cron1" not in out
        run = piku.run_cron_job(cronapp, "jobs", "cron1", 1, "true", "scheduled", {})
        assert run.code is None and run.busy.startswith(f"pid {os.getpid()}")
        assert "skipped (scheduled): the previous run (pid" in job_log(cronapp, "cron1.1").splitlines()[-1]
    finally:
        os.close(fd)
    assert piku.run_cron_job(cronapp, "jobs", "cron1", 1, "true", "scheduled", {}).code == 0


def test_scheduled_runs_and_at_start(cronapp):
    import subprocess
    import sys
    env = {"PIKU_ROOT": cronapp.root, "PATH": "/usr/bin:/bin"}
    worker = [sys.executable, piku.__file__, "exec-worker"]
    r = subprocess.run(worker + ["--at-start", "jobs", "cron1", "1"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == r.stderr == ""  # not an @reboot job: nothing happens
    r = subprocess.run(worker + ["--if-due", "jobs", "cronboot", "1"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and not os.path.exists(os.path.join(cronapp.data, "jobs", "boot"))  # never due
    r = subprocess.run(worker + ["--at-start", "jobs", "cronboot", "1"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    while "finished" not in (piku.read_text(os.path.join(cronapp.logs, "jobs", "cronboot.1.log")) or ""):
        assert time.monotonic() < deadline, "the @reboot job did not run"
        time.sleep(0.05)
    assert open(os.path.join(cronapp.data, "jobs", "boot")).read() == "booted\n"
    assert "started (@reboot): echo booted" in job_log(cronapp, "cronboot.1")
    r = subprocess.run(worker + ["jobs", "cron1", "1"], env=env, capture_output=True, text=True)
    assert r.returncode == 3 and r.stdout == "ran cron1.1 hi there\n"


# -- the client's groups of remotes -------------------------------------------

@pytest.mark.parametrize("argv,remotes,group,rest", [
    (["ps"], [], None, ["ps"]),
    (["-r", "a", "--remote", "b", "--remote=c", "logs", "-n", "1"], ["a", "b", "c"], None, ["logs", "-n", "1"]),
    (["-g", "prod", "push", "-f"], [], "prod", ["push", "-f"]),
    (["--group=prod-eu", "ps"], [], "prod-eu", ["ps"]),
])
def test_client_options(argv, remotes, group, rest):
    opts, left = piku.parse_client_options(argv)
    assert (opts["remotes"], opts["group"], left) == (remotes, group, rest)


@pytest.mark.parametrize("argv,error", [
    (["-x", "ps"], "unknown option '-x'"),
    (["-r"], "-r needs a name"),
    (["--remote=", "ps"], "--remote needs a name"),
    (["-g", "prod", "-g", "staging", "ps"], "-g takes one group name"),
    (["-g", "prod_1", "ps"], "-g takes one group name (letters, digits and -"),
    (["-g", "prod", "-r", "x", "ps"], "use either -g GROUP or -r REMOTE"),
])
def test_client_option_errors(argv, error):
    with pytest.raises(PikuError, match=error.replace("(", r"\(")):
        piku.parse_client_options(argv)


def test_group_remotes():
    assert piku.parse_group_remotes("prod", " prod1  prod2,prod3\nprod1 ") == ["prod1", "prod2", "prod3"]
    with pytest.raises(PikuError, match="group prod lists no remotes"):
        piku.parse_group_remotes("prod", " , ")


def test_group_report():
    assert piku.plan_group_report("push", ["p1", "p2"], "p3", 1, ["p4"]) == [
        "p1, p2 already run the new release; to go back there: `piku -r p1 rollback`, `piku -r p2 rollback`",
        "push to p3 failed (exit 1): p3 keeps its previous release; not pushed to p4"]
    assert piku.plan_group_report("push", [], "p1", 128, []) == ["push to p1 failed (exit 128): p1 keeps its previous release"]
    assert piku.plan_group_report("push", ["p1"], "p2", 1, [])[0].startswith("p1 already runs the new release")
    assert piku.plan_group_report("config:set", ["p1"], "p2", 1, ["p3", "p4"]) == [
        "config:set ran on p1", "config:set failed on p2 (exit 1); stopped there: not run on p3, p4"]


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    import subprocess
    repo = tmp_path / "checkout"
    repo.mkdir()
    monkeypatch.chdir(repo)
    for k in [k for k in os.environ if k.startswith(("PIKU_", "GIT_"))]:
        monkeypatch.delenv(k)
    subprocess.run(["git", "init", "-q"], check=True)
    for name, url in (("prod1", "piku@one.example:shop"), ("prod2", "ssh://piku@two.example:2222/shop")):
        subprocess.run(["git", "remote", "add", name, url], check=True)
    return repo


@pytest.mark.parametrize("group,argv,error", [
    (None, ["-g", "prod", "ps"], "no group 'prod' here: define it with git config piku.group.prod \"REMOTE1 REMOTE2\""),
    ("prod1 nosuch prod2", ["-g", "prod", "push"], "no git remote named 'nosuch' here"),
    ("prod1 -oProxyCommand=x", ["-g", "prod", "config:set", "A=1"], "invalid git remote name '-oProxyCommand=x'"),
    ("", ["-g", "prod", "ps"], "group prod lists no remotes"),
    (None, ["-r", "prod1", "-r", "nosuch", "ps"], "no git remote named 'nosuch' here"),
])
def test_client_group_errors_run_nothing(checkout, capsys, group, argv, error):
    import subprocess
    if group is not None:
        subprocess.run(["git", "config", "piku.group.prod", group], check=True)
    code = piku.client_main(argv)
    out, err = capsys.readouterr()
    assert code in (1, 2) and error in err and len(err.strip().splitlines()) == 1, err
    assert out == ""  # no "-----> prod1 ..." header: nothing was started


def test_destroy_takes_the_names_from_nginx_before_the_workers_stop(root, monkeypatch):
    """The app's nginx config goes, and nginx is waited for, before any worker is stopped: a
    request meanwhile gets the default server, never a stopped worker (502)."""
    make_app(root, "shop")
    conf = os.path.join(root.nginx, "shop.conf")
    with open(conf, "w") as f:
        f.write("server { listen 127.0.0.1:8080; server_name shop.test; }\n")
    calls = []
    monkeypatch.setattr(piku, "nginx_drained", lambda since, timeout, quiesced=False: calls.append(
        ("nginx_drained", os.path.exists(conf), quiesced)))
    monkeypatch.setattr(piku, "stop_app", lambda paths, app: calls.append(("stop_app", os.path.exists(conf))) or ([], []))
    removed = piku.destroy_app(root, "shop")
    assert calls == [("nginx_drained", False, True), ("stop_app", False)]
    assert conf in removed and not os.path.exists(os.path.join(root.repos, "shop"))
