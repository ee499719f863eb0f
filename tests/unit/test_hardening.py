"""Issue 10 (hardening): names, values and repository content that must not get through."""
import ast
import os
import re

import pytest

import piku
from piku import PikuError

PIKU_SOURCE = os.path.join(os.path.dirname(__file__), "..", "..", "piku.py")


def app_root(tmp_path, monkeypatch, app="app"):
    """A PIKU_ROOT with one app that was created (repos/<app>) but never deployed."""
    monkeypatch.setenv("PIKU_ROOT", str(tmp_path))
    paths = piku.paths_for(str(tmp_path))
    os.makedirs(os.path.join(paths.repos, app))
    return paths


# --- item 2: whole-string validation is a full match ------------------------------------------

@pytest.mark.parametrize("arg", ["FOO\n=bar", "FOO\r=bar", "FOO\x0b=bar", "FOO =bar", "\nFOO=bar"])
def test_a_key_with_a_line_break_is_refused(arg):
    with pytest.raises(PikuError):
        piku.parse_assignments([arg])


def test_config_set_refuses_a_key_ending_in_a_newline_before_writing(tmp_path, monkeypatch, capsys):
    paths = app_root(tmp_path, monkeypatch)
    assert piku.main(["config:set", "app", "FOO\n=bar"]) != 0
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(paths.envs, "app", "ENV"))
    assert piku.main(["config:unset", "app", "FOO\n"]) != 0


@pytest.mark.parametrize("check,value", [
    (lambda v: piku.safe_path(v, "K"), "/srv/x.ini\n"),
    (lambda v: piku.parse_ssh_dest(v, "K"), "piku@host\n"),
    (lambda v: piku.parse_static_paths(v), "/url\n:dir"),
    (lambda v: piku.parse_url_prefixes(v, "K"), "/a\n"),
    (lambda v: piku.parse_email(v, "K"), "a@b.example\n"),
    (lambda v: piku.v_hostnames(v, "K"), "a.example;\n"),
])
def test_validators_refuse_a_trailing_newline(check, value):
    with pytest.raises(PikuError):
        check(value)


def test_no_regex_in_piku_validates_with_a_dollar_anchor_or_a_prefix_match():
    """`$` matches before a trailing newline and `.match` only checks a prefix: whole strings
    are checked with fullmatch, and no pattern ends in `$` (multi-line searches excepted)."""
    tree = ast.parse(open(PIKU_SOURCE).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                and getattr(node.func.value, "id", None) == "re":
            flags = ast.unparse(node)
            if "re.M" not in flags:
                assert not node.args[0].value.endswith("$"), ast.unparse(node)
    constants = {name for name in dir(piku) if name.endswith("_RE") and isinstance(getattr(piku, name), re.Pattern)}
    text = open(PIKU_SOURCE).read()
    for name in constants:
        assert f"{name}.match(" not in text, name
