"""Issue 10 items 3, 7, 8 and 9: another app's broken state is read without failing, a failed
checkout says why in one line, and a supervised command's processes end with what started it
(pure functions; the port bookkeeping on a PIKU_ROOT in tmp_path; real short-lived processes)."""
import json
import os

import pytest

import piku


# --- item 3: state/<app>/ports.json, whatever it holds ------------------------------------------

def test_ports_written_by_piku_read_back():
    text = '{"port": 5000, "web": {"a": [5001, 5002], "b": [5003]}}'
    assert piku.parse_ports(text) == ({"port": 5000, "web": {"a": [5001, 5002], "b": [5003]}}, [])


@pytest.mark.parametrize("text", [None, "", "  \n"])
def test_no_ports_file_is_no_problem(text):
    assert piku.parse_ports(text) == ({}, [])


@pytest.mark.parametrize("text,problem", [
    ('{"port": 5000, "web": ', "is not valid JSON"),
    ("[5000]", "is not a JSON object"),
    ('"5000"', "is not a JSON object"),
    ('{"web": [5001]}', "`web` that is not an object"),
])
def test_unreadable_ports_file_gives_nothing_and_says_why(text, problem):
    ports, problems = piku.parse_ports(text)
    assert ports == {} and len(problems) == 1 and problem in problems[0]


def test_the_well_formed_parts_of_a_ports_file_are_kept():
    text = '{"port": 6002, "web": {"a": 5, "b": [6003, "x", true, 70000, "6004", "\u0665"]}}'
    ports, problems = piku.parse_ports(text)
    assert ports == {"port": 6002, "web": {"a": [], "b": [6003, 6004]}}
    assert [p.split(" holding")[0] for p in problems] == ["has web slot a", "has web slot b"]


@pytest.mark.parametrize("port", ['"x"', "0", "65536", "true", '"\u0665\u0660\u0660\u0660"', "5000.5"])
def test_a_port_that_is_no_port_number_is_left_out(port):
    ports, problems = piku.parse_ports('{"port": %s}' % port)
    assert ports == {} and "no port number" in problems[0]


def piku_root(tmp_path, apps):
    """A PIKU_ROOT whose apps have the given files ({app: {relative path: text}})."""
    paths = piku.paths_for(str(tmp_path))
    for app, files in apps.items():
        os.makedirs(os.path.join(paths.repos, app))
        for rel, text in files.items():
            path = os.path.join(str(tmp_path), rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if text is None:
                os.makedirs(path)
            else:
                with open(path, "w") as f:
                    f.write(text)
    return paths


def test_other_apps_broken_state_is_skipped_with_a_warning_naming_each(tmp_path, capsys):
    paths = piku_root(tmp_path, {
        "mine": {"state/mine/ports.json": '{"port": 5000}'},
        "good": {"state/good/ports.json": '{"port": 5100, "web": {"a": [5101], "b": [5102]}}',
                 "envs/good/LIVE_ENV": "garbage, never read\n"},
        "legacy": {"envs/legacy/LIVE_ENV": "PORT=5200\n"},
        "badenv": {"envs/badenv/LIVE_ENV": "PORT=5300\nno setting here\n"},
        "badjson": {"state/badjson/ports.json": "{", "envs/badjson/LIVE_ENV": "PORT=5400\n"},
        "shape": {"state/shape/ports.json": '{"port": 5500, "web": {"a": 1}}'},
        "isdir": {"state/isdir/ports.json": None, "envs/isdir/LIVE_ENV": None},
        "standby": {"state/standby/standby_port": None},
    })
    taken = piku.ports_of_other_apps(paths, "mine")
    assert taken == {5100: "good", 5101: "good", 5102: "good", 5200: "legacy", 5400: "badjson", 5500: "shape"}
    err = capsys.readouterr().err
    for app in ("badenv", "badjson", "shape", "isdir", "standby"):
        assert f"app {app}:" in err, err
    for app in ("good", "legacy", "mine"):
        assert f"app {app}:" not in err, err
    assert "Traceback" not in err


def test_other_apps_ports_are_read_again_only_when_their_file_changed(tmp_path, monkeypatch, capsys):
    """With many apps, state/_ports.json spares reading every ports.json: an app whose file was
    replaced, or that is new, is read again; a destroyed one drops out; a broken one (and one
    from before ports.json) is read, and warned about, every time."""
    paths = piku_root(tmp_path, {
        "mine": {"state/mine/ports.json": '{"port": 5000}'},
        "one": {"state/one/ports.json": '{"port": 5100}'},
        "two": {"state/two/ports.json": '{"port": 5200, "web": {"a": [5201], "b": [5202]}}'},
        "legacy": {"envs/legacy/LIVE_ENV": "PORT=5300\n"},
        "badjson": {"state/badjson/ports.json": "{", "envs/badjson/LIVE_ENV": "PORT=5400\n"},
    })
    read = []
    real = piku.read_ports
    monkeypatch.setattr(piku, "read_ports", lambda paths, app: read.append(app) or real(paths, app))
    want = {5100: "one", 5200: "two", 5201: "two", 5202: "two", 5300: "legacy", 5400: "badjson"}
    assert piku.ports_of_other_apps(paths, "mine") == want
    assert sorted(read) == ["badjson", "legacy", "one", "two"]
    index = os.path.join(paths.state, "_ports.json")
    assert os.stat(index).st_mode & 0o777 == 0o600
    capsys.readouterr()
    read.clear()
    written = piku.file_key(index)
    assert piku.ports_of_other_apps(paths, "mine") == want
    assert sorted(read) == ["badjson", "legacy"]
    assert piku.file_key(index) == written  # (nothing new to keep: not written again)
    assert "app badjson:" in capsys.readouterr().err
    piku.write_atomic(os.path.join(paths.state, "two", "ports.json"), '{"port": 5210}')  # a redeploy
    with open(os.path.join(paths.envs, "legacy", "LIVE_ENV"), "w") as f:
        f.write("PORT=5310\n")
    os.makedirs(os.path.join(paths.repos, "three"))
    os.makedirs(os.path.join(paths.state, "three"))
    piku.write_atomic(os.path.join(paths.state, "three", "ports.json"), '{"port": 5500}')
    os.rmdir(os.path.join(paths.repos, "one"))  # destroyed
    read.clear()
    want = {5210: "two", 5310: "legacy", 5400: "badjson", 5500: "three"}
    assert piku.ports_of_other_apps(paths, "mine") == want
    assert sorted(read) == ["badjson", "legacy", "three", "two"]
    # the app's own entry is kept for the others; the destroyed app is gone from the index
    assert sorted(json.loads(open(index).read())["apps"]) == ["three", "two"]
    assert piku.ports_of_other_apps(paths, "two") == {5000: "mine", 5310: "legacy", 5400: "badjson", 5500: "three"}
    read.clear()
    assert piku.ports_of_other_apps(paths, "mine") == want and sorted(read) == ["badjson", "legacy"]


@pytest.mark.parametrize("text", ["{", "[]", '{"apps": [1]}', '{"apps": {"one": [null, [1]], "two": "x"}}',
                                  '{"apps": {"one": ["k", ["5100"]]}}'])
def test_a_broken_ports_index_is_read_past(tmp_path, text):
    paths = piku_root(tmp_path, {"mine": {}, "one": {"state/one/ports.json": '{"port": 5100}'}})
    with open(os.path.join(paths.state, "_ports.json"), "w") as f:
        f.write(text)
    assert piku.ports_of_other_apps(paths, "mine") == {5100: "one"}
    assert piku.ports_of_other_apps(paths, "mine") == {5100: "one"}


def test_own_broken_ports_file_falls_back_to_the_live_port(tmp_path):
    paths = piku_root(tmp_path, {"mine": {"state/mine/ports.json": "[1]", "envs/mine/LIVE_ENV": "PORT=5600\n"}})
    assert piku.load_ports(paths, "mine") == {}
    assert piku.live_port(paths, "mine") == "5600"


def test_certs_renew_of_all_apps_goes_past_an_app_whose_settings_cannot_be_read(tmp_path, monkeypatch, capsys):
    """The daily renewal of every app stopped at the first app it could not read (or lock)."""
    paths = piku_root(tmp_path, {"bad": {"envs/bad/ENV": "this line is no setting\n"},
                                 "good": {"envs/good/ENV": "NGINX_SERVER_NAME=good.example\n",
                                          "nginx/good.crt": "(the admin's)", "nginx/good.key": "(the admin's)"}})
    monkeypatch.setenv("PIKU_ROOT", paths.root)
    assert piku.main(["certs:renew"]) != 0
    out, err = capsys.readouterr()
    assert "good: certificate provided by the admin, left as it is" in out
    assert "app bad:" in err and "not renewed: bad" in err
    assert piku.main(["certs:renew", "bad"]) != 0


# --- item 9: a checkout that fails says why in one line -----------------------------------------

def test_a_failed_checkout_is_one_line_with_gits_reason(tmp_path):
    git = piku.PikuError("git failed (exit 1): error: unable to write file Procfile\n"
                         "error: unable to write file app.py")
    err = piku.checkout_failure(git, str(tmp_path))
    assert isinstance(err, piku.PikuError) and "\n" not in str(err)
    assert str(err) == "could not check the revision out: error: unable to write file Procfile"


def test_a_checkout_that_ran_out_of_space_says_so(tmp_path):
    import errno
    err = piku.checkout_failure(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path))
    assert f"no space left in {tmp_path} (" in str(err) and "free some disk space" in str(err)
    git = piku.PikuError("git failed (exit 128): fatal: cannot create directory at 'a': No space left on device")
    assert "no space left in" in str(piku.checkout_failure(git, str(tmp_path)))


def test_an_interrupted_checkout_stays_an_interrupt(tmp_path):
    stop = KeyboardInterrupt()
    assert piku.checkout_failure(stop, str(tmp_path)) is stop


# --- items 7 and 8: a supervised command's processes all end with the process that started it -

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pids, timeout=20.0):
    """The pids still alive after timeout seconds (or none, as soon as all are gone)."""
    import time
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_supervised_command_gives_its_exit_status():
    import subprocess
    for script, code in (("exit 0", 0), ("exit 3", 3), ("kill -TERM $$", 128 + 15)):
        assert subprocess.run(piku.supervised(["/bin/sh", "-c", script])).returncode == code


def test_supervised_command_that_cannot_start_exits_127(capfd):
    import subprocess
    assert subprocess.run(piku.supervised(["/nonexistent/tool"])).returncode == 127
    assert "cannot start /nonexistent/tool" in capfd.readouterr().err


# The parent: starts the supervised command with the signal piku gives it on the parent's death,
# prints the pid of what the shell forked, then waits to be killed.
PARENT = """
import subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import piku
proc = subprocess.Popen(piku.supervised(["/bin/sh", "-c", sys.argv[2]], grace=0.5), stdout=subprocess.PIPE,
                        preexec_fn=piku._die_with_parent)
print(proc.pid, proc.stdout.readline().decode().strip(), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("script", [
    "sleep 600 & echo $!; wait",                                         # (forked by the shell)
    "trap '' TERM; sleep 600 & echo $!; wait",                           # ignores SIGTERM: SIGKILL after the grace
])
def test_supervised_commands_processes_end_when_the_parent_is_killed(script):
    import signal
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, root, script], stdout=subprocess.PIPE)
    supervisor, grandchild = (int(x) for x in parent.stdout.readline().split())
    assert alive(supervisor) and alive(grandchild)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert wait_dead([supervisor, grandchild]) == []


def test_what_a_supervised_command_leaves_running_ends_with_it():
    import subprocess
    out = subprocess.run(piku.supervised(["/bin/sh", "-c", "sleep 600 >/dev/null & echo $!"]),
                         capture_output=True, text=True, timeout=60).stdout
    assert wait_dead([int(out)]) == []


# A vassal starts its daemon from a launch file: the supervisor alone, no piku.py loaded.

def launch(tmp_path, argv, env, environ=None):
    import subprocess
    import sys
    (tmp_path / "sup.py").write_text(piku.SUPERVISOR)
    (tmp_path / "launch").write_text(piku.render_launch(str(tmp_path), argv, env))
    return subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "sup.py"), "--launch", str(tmp_path / "launch"),
                           "0.5"], capture_output=True, text=True, env=environ or {}, timeout=60)


def test_a_launch_file_gives_the_command_its_directory_and_environment_exactly(tmp_path):
    import json
    import sys
    values = {"PLAIN": "v", "BACKSLASH": "a\\b", "LF": "one\ntwo", "LITERAL": "\\n not a line feed",
              "MIXED": "\\\nx\\\\", "EMPTY": "", "WIDE": "\u00e9 \u2028 \x0b \x85 end", "EQ": "a=b=c"}
    show = "import json, os; print(json.dumps([os.getcwd(), dict(os.environ)]))"
    r = launch(tmp_path, [sys.executable, "-c", show], values,
               environ={"LANG": "C.UTF-8", "TZ": "UTC", "SECRET_OF_THE_MASTER": "x", "UWSGI_VASSAL": "y"})
    assert r.returncode == 0, r.stderr
    cwd, env = json.loads(r.stdout)
    assert cwd == str(tmp_path)
    assert env == values | {"LANG": "C.UTF-8", "TZ": "UTC"}  # the master's own variables are not passed on


def test_a_launch_file_runs_its_command_under_the_supervisor(tmp_path):
    r = launch(tmp_path, ["/bin/sh", "-c", 'echo "$0 $1"; exit 3', "first", "second"], {"PATH": "/usr/bin:/bin"})
    assert (r.returncode, r.stdout) == (3, "first second\n")


@pytest.mark.parametrize("damage", ["missing", "not a launch file", "directory"])
def test_a_bad_launch_file_starts_nothing_and_says_why(tmp_path, damage):
    import subprocess
    import sys
    (tmp_path / "sup.py").write_text(piku.SUPERVISOR)
    marker = tmp_path / "started"
    text = piku.render_launch(str(tmp_path / "gone"), ["/bin/sh", "-c", f"touch {marker}"], {})
    if damage == "directory":  # (its release was removed: uWSGI respawned it as its vassal was being removed)
        (tmp_path / "launch").write_text(text)
    elif damage == "not a launch file":
        (tmp_path / "launch").write_text(text.replace("piku-launch 1", "piku-launch 9"))
    r = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "sup.py"), "--launch", str(tmp_path / "launch"), "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("piku: not started (") and not marker.exists()


def test_a_launch_file_refuses_what_no_process_can_hold():
    with pytest.raises(piku.PikuError, match="NUL"):
        piku.render_launch("/d", ["/bin/sh", "-c", "x"], {"A": "a\0b"})
    with pytest.raises(piku.PikuError, match="invalid key"):
        piku.render_launch("/d", ["/bin/sh"], {"A=B": "x"})


# --- item 9: what failed pushes of an older piku.py left in releases/<app> --------------------

LIVE = "20240102-030405-0123456789"


def test_unrecorded_releases_newer_than_the_live_one_are_leftovers():
    names = [LIVE, "20240102-030406-abcdef0123", "20240103-000000-abcdef0123.2", "20240101-000000-abcdef0123"]
    assert piku.plan_staging_leftovers(names, set(), LIVE, False) == names[1:3]


def test_recorded_older_same_second_and_foreign_names_are_kept():
    names = ["20240102-030406-abcdef0123", "20240102-030405-fedcba9876", "legacy-20240105-000000",
             "20240105-000000-ABCDEF0123", "20240105-000000-abcdef01234", "notes"]
    assert piku.plan_staging_leftovers(names, {"20240102-030406-abcdef0123"}, LIVE, False) == []


def test_no_leftovers_once_a_release_of_the_history_went_live():
    assert piku.plan_staging_leftovers(["20240109-000000-abcdef0123"], set(), LIVE, True) == []


def test_with_no_live_release_every_unrecorded_release_is_a_leftover():
    assert piku.plan_staging_leftovers(["20240109-000000-abcdef0123"], set(), None, False) == \
        ["20240109-000000-abcdef0123"]
