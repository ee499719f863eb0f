"""Unit tests for the day-two commands (issue 14): safe destroy, config export/import, ssh keys,
cron control and the client's groups of remotes. Commands run through piku.main() against a
PIKU_ROOT in tmp_path, with stdin replaced."""
import io
import os

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
    with pytest.raises(PikuError, match="A: a value cannot contain a NUL character"):
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
