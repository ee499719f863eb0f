"""The command line through main() and click's CliRunner: exit codes and one-line errors, on a
temporary PIKU_ROOT (nothing on disk changes for a refused command)."""
import os

import pytest
from click.testing import CliRunner

import piku


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("PIKU_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("SSH_ORIGINAL_COMMAND", raising=False)
    return tmp_path / "root"


def lines(text):
    return [l for l in text.splitlines() if l.strip()]


@pytest.mark.parametrize("argv,code,message", [
    (["config"], 2, "Missing argument"),
    (["config", "nosuch"], 1, "no such app: nosuch"),
    (["releases", "nosuch"], 1, "no such app: nosuch"),
    (["rollback", "../x"], 1, "invalid app name"),
    (["ps:scale", "nosuch", "web=2"], 1, "no such app"),
    (["no-such-command"], 2, "No such command"),
])
def test_bad_commands_exit_non_zero_with_one_line(root, capsys, argv, code, message):
    assert piku.main(argv) == code
    err = capsys.readouterr().err
    assert len(lines(err)) == 1 and message in err, err
    assert not os.path.exists(root / "apps")


def test_version_and_help(root, capsys):
    assert piku.main(["--version"]) == 0
    assert piku.__version__ in capsys.readouterr().out
    result = CliRunner().invoke(piku.build_cli(), ["--help"])
    assert result.exit_code == 0
    for command in ("releases", "rollback", "ps:scale", "config:set", "maintenance:on"):
        assert command in result.output


def test_internal_commands_are_refused_over_ssh(root, capsys, monkeypatch):
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "exec-worker demo wsgi 1")
    assert piku.main() == 2
    assert "internal" in capsys.readouterr().err
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "rollback demo; id")
    assert piku.main() == 1  # (one argument too many for click, or no such app: never a shell)


def test_releases_of_an_app_without_history(root, capsys):
    paths = piku.paths_for(str(root))
    os.makedirs(os.path.join(paths.repos, "demo"))
    assert piku.main(["releases", "demo"]) == 0
    assert "no release history yet" in capsys.readouterr().out
    assert piku.main(["rollback", "demo"]) == 1
    assert "no earlier release to roll back to" in capsys.readouterr().err


@pytest.mark.parametrize("args,parsed", [
    (["demo", "web", "1"], {"app": "demo", "kind": "web", "index": 1, "port": None, "if_due": False}),
    (["--if-due", "--dir", "/r", "--env", "/e", "demo", "cron1", "2"],
     {"kind": "cron1", "index": 2, "if_due": True, "release_dir": "/r", "env_file": "/e"}),
    (["--port", "5001", "--uwsgi", "/s/i.ini", "--at-start", "d", "wsgi", "1"],
     {"port": 5001, "inner": "/s/i.ini", "at_start": True}),
])
def test_exec_worker_arguments_without_click(args, parsed):
    got = piku.parse_exec_worker_args(args)
    assert {k: got[k] for k in parsed} == parsed


@pytest.mark.parametrize("args", [["demo", "web"], ["--bogus", "a", "b", "1"], ["a", "b", "x"],
                                  ["--port", "http", "a", "b", "1"]])
def test_exec_worker_bad_arguments(args):
    with pytest.raises(piku.PikuError):
        piku.parse_exec_worker_args(args)


def test_the_internal_commands_need_no_click():
    """git and uWSGI start these on every push and worker start: no click import."""
    import subprocess
    import sys
    code = ("import sys, importlib.util as u; s = u.spec_from_file_location('piku', sys.argv[1]); "
            "m = u.module_from_spec(s); sys.modules['piku'] = m; s.loader.exec_module(m); "
            "rc = m.main(['exec-worker', 'bad/app', 'web', '1']); print(rc, 'click' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, piku.__file__], capture_output=True, text=True,
                         env={"PIKU_ROOT": "/nonexistent", "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["1", "False"], out.stdout + out.stderr


def test_exec_worker_of_a_release_that_is_gone_says_so(tmp_path, monkeypatch):
    """uWSGI may start a daemon once more as its vassal is removed, after the failed release's
    directory went: one clear line in the app's log, not 'no Procfile in the pushed revision'."""
    monkeypatch.setenv("PIKU_ROOT", str(tmp_path))
    paths = piku.paths_for(str(tmp_path))
    os.makedirs(os.path.join(paths.releases, "demo"))
    os.makedirs(os.path.join(paths.state, "demo"))
    with pytest.raises(piku.PikuError, match=r"release r1 is gone: web\.1 does not start"):
        piku.exec_worker("demo", "web", 1, False, False, os.path.join(paths.releases, "demo", "r1"),
                         os.path.join(paths.state, "demo", "env"), None, None)


@pytest.mark.parametrize("argv,bound", [
    (["config:set", "demo", "A=1", "B=two words"], {"app": "demo", "settings": ("A=1", "B=two words")}),
    (["config:unset", "demo", "A"], {"app": "demo", "keys": ("A",)}),
    (["rollback", "demo"], {"app": "demo", "release": None}),
    (["rollback", "demo", "3"], {"app": "demo", "release": "3"}),
    (["restart", "demo"], {"app": "demo"}),
    (["config:get", "demo", "A"], {"app": "demo", "key": "A"}),
    (["apps"], {}),
])
def test_plain_commands_run_without_click(argv, bound):
    f, got = piku.plain_call(argv)
    assert got == bound and f is piku.cli.specs[argv[0]][0]


@pytest.mark.parametrize("argv", [
    ["config:set", "demo"],                 # missing: click says so
    ["config:set", "demo", "--help"],       # an option
    ["config:set", "demo", "-A=1"],         # click's ignore_unknown_options decides
    ["restart", "demo", "extra"],           # one too many
    ["rollback"], ["apps", "x"], ["help"],  # (help takes the context)
    ["destroy", "demo"],                    # a command with options
    ["logs", "demo"], ["run", "demo", "ls"], ["no-such-command"], [],
])
def test_other_command_lines_go_to_click(argv):
    assert piku.plain_call(argv) is None


@pytest.mark.parametrize("argv", [["config:set", "nosuch", "A=1"], ["config:set", "../x", "A=1"],
                                  ["rollback", "nosuch"], ["rollback", "nosuch", "2"], ["restart", "nosuch"],
                                  ["releases", "nosuch"], ["ps:scale", "nosuch", "web=2"], ["apps"],
                                  ["config:unset", "nosuch", "A"], ["config:set", "nosuch"]])
def test_a_plain_command_answers_as_click_would(root, capsys, monkeypatch, argv):
    """Exit code, stdout and stderr are the same with and without click."""
    fast = (piku.main(list(argv)), *capsys.readouterr())
    monkeypatch.setattr(piku, "plain_call", lambda args: None)
    assert (piku.main(list(argv)), *capsys.readouterr()) == fast
