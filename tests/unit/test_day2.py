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
