"""Issue 10 item 3: another app's broken state is read without failing (pure functions, and the
port bookkeeping on a PIKU_ROOT in tmp_path)."""
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


def test_own_broken_ports_file_falls_back_to_the_live_port(tmp_path):
    paths = piku_root(tmp_path, {"mine": {"state/mine/ports.json": "[1]", "envs/mine/LIVE_ENV": "PORT=5600\n"}})
    assert piku.load_ports(paths, "mine") == {}
    assert piku.live_port(paths, "mine") == "5600"

