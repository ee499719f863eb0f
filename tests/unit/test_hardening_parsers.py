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


# --- item 1: one definition of a line for every writer and reader -----------------------------

SPLITLINES_BREAKS = [c for c in map(chr, range(0x3000)) if len(f"a{c}b".splitlines()) == 2]


def test_line_breaks_cover_every_character_splitlines_breaks_at():
    assert sorted(SPLITLINES_BREAKS) == sorted(piku.LINE_BREAKS)


@pytest.mark.parametrize("sep", SPLITLINES_BREAKS + ["\r\n"])
def test_env_round_trip_keeps_every_line_break_inside_its_value(sep):
    """A value can never become a second setting, whatever line break it holds and whoever
    reads the file (piku, or anything that splits with str.splitlines)."""
    env = {"G": f"hi{sep}UWSGI_INCLUDE_FILE=/tmp/x.ini", "H": f"{sep}", "I": f"a{sep}", "J": f"{sep}K=1{sep}"}
    text = piku.render_env(env)
    assert piku.parse_env(text) == env
    assert len(text.splitlines()) == len(env) and text.isascii()
    assert all(line.isprintable() for line in text.splitlines())


@pytest.mark.parametrize("sep", SPLITLINES_BREAKS)
def test_committed_env_json_escape_of_a_line_break_stays_one_setting(sep):
    """A committed ENV value written as a JSON string (`"hi\\u000bX=1"`) is one setting, also once
    piku writes it into LIVE_ENV and reads it back."""
    escaped = "\\u%04x" % ord(sep)
    env = piku.parse_env(f'G="hi{escaped}UWSGI_INCLUDE_FILE=/tmp/x.ini"\nB=2\n')
    assert env == {"G": f"hi{sep}UWSGI_INCLUDE_FILE=/tmp/x.ini", "B": "2"}
    assert piku.parse_env(piku.render_env(env), source="LIVE_ENV") == env


@pytest.mark.parametrize("sep", [c for c in SPLITLINES_BREAKS if c not in "\n\r"])
def test_a_raw_separator_in_a_committed_env_is_part_of_the_value(sep):
    """Only \\n, \\r\\n and \\r end a line: other separators typed into a committed ENV stay in
    the value (they are quoted when piku writes it back)."""
    env = piku.parse_env(f"A=1{sep}UWSGI_INCLUDE_FILE=/tmp/x.ini\nB=2\n")
    assert list(env) == ["A", "B"] and env["A"] == f"1{sep}UWSGI_INCLUDE_FILE=/tmp/x.ini"


def test_committed_env_with_crlf_or_cr_line_ends():
    assert piku.parse_env("A=1\r\nB=2\r\n") == {"A": "1", "B": "2"}
    assert piku.parse_env("A=1\rB=2\r") == {"A": "1", "B": "2"}


@pytest.mark.parametrize("sep", SPLITLINES_BREAKS)
def test_config_set_value_with_a_line_break_is_one_setting(tmp_path, monkeypatch, sep):
    paths = app_root(tmp_path, monkeypatch)
    assert piku.main(["config:set", "app", f"G=hi{sep}UWSGI_INCLUDE_FILE=/tmp/x.ini"]) == 0
    config = piku.load_config(paths, "app")
    assert config == {"G": f"hi{sep}UWSGI_INCLUDE_FILE=/tmp/x.ini"}
    with open(os.path.join(paths.envs, "app", "ENV"), newline="") as f:
        assert len(f.read().splitlines()) == 1


@pytest.mark.parametrize("value", ["tab\there", "nul\0byte", "esc\x1b[31m", "nbsp\xa0", "bell\x07",
                                   "surrogate\udcff", "del\x7f", "\x1f", "\x1cx"])
def test_unprintable_values_round_trip_as_printable_json(value):
    text = piku.render_env({"K": value})
    assert text.isascii() and text[:-1].isprintable() and piku.parse_env(text) == {"K": value}


@pytest.mark.parametrize("sep", SPLITLINES_BREAKS + ["\0"])
def test_uwsgi_ini_refuses_every_line_break(sep):
    with pytest.raises(PikuError):
        piku.render_ini([("env", f"A=1{sep}ini = /tmp/x.ini")])


@pytest.mark.parametrize("sep", [c for c in SPLITLINES_BREAKS if c not in "\n\r"])
def test_procfile_and_scaling_lines_end_only_at_newlines(sep):
    workers, _ = piku.parse_procfile(f"web: python3 server.py{sep}worker: evil\n")
    assert list(workers) == ["web"]
    assert piku.parse_scaling(f"web:1{sep}worker:5\nother:2\n") == {"other": 2}
    assert piku.parse_scaling(piku.render_scaling({"web": 1, "cron1": 0})) == {"web": 1, "cron1": 0}


def test_render_env_refuses_a_key_the_reader_would_refuse():
    for key in ("A\nB", "A=B", "", "1A", "A B", "A\u2028"):
        with pytest.raises(PikuError):
            piku.render_env({key: "x"})


def test_git_hook_lines_and_ssh_keys_use_the_same_line_ends():
    assert piku.split_lines("a\u2028b\nc\r\nd\re") == ["a\u2028b", "c", "d", "e"]
    with pytest.raises(PikuError, match="control characters"):
        piku.add_ssh_key("ssh-ed25519 AAAA comment\x1b[2J", None)


# --- item 4: committed symbolic links; item 1: include files ----------------------------------

def release(tmp_path, files=None, links=None):
    """A release directory with files {rel: text} and symbolic links {rel: target}."""
    d = tmp_path / "release"
    d.mkdir()
    for rel, text in (files or {}).items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    for rel, target in (links or {}).items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, d / rel)
    return str(d)


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text("root:x:0:0:SECRET-CONTENT\n")
    return str(path)


@pytest.mark.parametrize("name", piku.REPO_FILES)
def test_a_repo_file_linked_outside_the_release_is_refused_without_naming_the_target(tmp_path, secret, name):
    rel = release(tmp_path, {"Procfile": "web: x\n"} if name != "Procfile" else {}, {name: secret})
    with pytest.raises(PikuError, match=f"{re.escape(name)} leads outside the repository") as e:
        piku.check_repo_links(rel)
    assert "SECRET" not in str(e.value) and "outside/secret" not in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_links_inside_the_release_are_fine_and_directories_are_not_files(tmp_path, secret):
    rel = release(tmp_path, {"conf/ENV.prod": "A=1\n", "conf/Procfile": "web: x\n", "lib/dir/x": ""},
                  {"ENV": "conf/ENV.prod", "Procfile": os.path.join(str(tmp_path), "release", "conf", "Procfile"),
                   "pyproject.toml": "lib/dir"})
    with pytest.raises(PikuError, match="pyproject.toml is not a file"):
        piku.check_repo_links(rel)
    os.unlink(os.path.join(rel, "pyproject.toml"))
    piku.check_repo_links(rel)
    assert piku.read_procfile(rel)[0] == {"web": "x"}


def test_requirements_includes_are_checked_before_they_are_read(tmp_path, secret):
    files = {"requirements.txt": "-r reqs/base.txt\n-c https://example.com/c.txt\n-r /abs/x.txt\nflask\n",
             "reqs/base.txt": "-r more.txt\n"}
    rel = release(tmp_path, files, {"reqs/more.txt": secret})
    with pytest.raises(PikuError, match="reqs/more.txt leads outside"):
        piku.check_repo_links(rel)
    os.unlink(os.path.join(rel, "reqs", "more.txt"))
    piku.check_repo_links(rel)  # (missing includes are pip's to report)
    with open(os.path.join(rel, "requirements.txt"), "a") as f:
        f.write(f"-r {os.path.relpath(secret, rel)}\n")
    with pytest.raises(PikuError, match="leads outside"):
        piku.check_repo_links(rel)


def test_a_committed_env_link_is_never_chmodded(tmp_path):
    """new_release made ENV 0600 through the link: a push changed the mode of a piku file."""
    import subprocess
    target = tmp_path / "uwsgi.ini"
    target.write_text("[uwsgi]\n")
    target.chmod(0o644)
    repo = tmp_path / "work"
    repo.mkdir()
    os.symlink(str(target), repo / "ENV")
    (repo / "Procfile").write_text("web: x\n")
    git = lambda *a, **kw: subprocess.run(["git", *a], check=True, capture_output=True, text=True, **kw)  # noqa
    git("init", "-q", str(repo))
    git("-C", str(repo), "add", "-A")
    git("-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    rev = git("-C", str(repo), "rev-parse", "HEAD").stdout.strip()
    paths = piku.paths_for(str(tmp_path / "root"))
    os.makedirs(paths.repos)
    git("clone", "-q", "--bare", str(repo), os.path.join(paths.repos, "app"))
    _, target_dir = piku.new_release(paths, "app", rev, "main", dict(os.environ))
    assert os.path.islink(os.path.join(target_dir, "ENV"))
    assert target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(PikuError, match="ENV leads outside"):
        piku.check_repo_links(target_dir)
    # a link to a file of the repository: that file holds the settings, so it is made 0600
    os.unlink(repo / "ENV")
    (repo / "conf").mkdir()
    (repo / "conf" / "env").write_text("SECRET=1\n")
    os.symlink("conf/env", repo / "ENV")
    git("-C", str(repo), "add", "-A")
    git("-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "y")
    git("-C", str(repo), "push", "-q", os.path.join(paths.repos, "app"), "HEAD:refs/heads/master")
    rev = git("-C", str(repo), "rev-parse", "HEAD").stdout.strip()
    _, target_dir = piku.new_release(paths, "app", rev, "main", dict(os.environ))
    assert os.stat(os.path.join(target_dir, "conf", "env")).st_mode & 0o777 == 0o600
    piku.check_repo_links(target_dir)


def other_users(path):
    """Make path another user's (as root), or return None when the tests cannot."""
    if os.getuid() != 0:
        return None
    os.lchown(path, 65534, 65534)
    return path


def test_absolute_include_files_must_be_the_piku_users_alone(tmp_path):
    d = tmp_path / "conf"
    d.mkdir()
    ini = d / "extra.ini"
    ini.write_text("[uwsgi]\n")
    ini.chmod(0o644)
    check = lambda key, value: piku.check_app_paths(None, None, {key: value})  # noqa
    for key in piku.INCLUDE_SETTINGS:
        check(key, str(ini))
    ini.chmod(0o666)
    with pytest.raises(PikuError, match="not a file only the piku user can write"):
        check("UWSGI_INCLUDE_FILE", str(ini))
    ini.chmod(0o644)
    d.chmod(0o777)
    with pytest.raises(PikuError, match="other users can change"):
        check("NGINX_INCLUDE_FILE", str(ini))
    d.chmod(0o1777)  # sticky (as /tmp): other users cannot replace the piku user's file
    check("NGINX_INCLUDE_FILE", str(ini))
    d.chmod(0o755)
    with pytest.raises(PikuError, match="does not exist"):
        check("UWSGI_INCLUDE_FILE", str(d / "missing.ini"))
    with pytest.raises(PikuError, match="not a regular file"):
        check("UWSGI_INCLUDE_FILE", str(d))
    os.symlink(str(ini), d / "link.ini")
    check("UWSGI_INCLUDE_FILE", str(d / "link.ini"))
    if other_users(str(d / "link.ini")):
        d.chmod(0o1777)
        with pytest.raises(PikuError, match="another user's symbolic link"):
            check("UWSGI_INCLUDE_FILE", str(d / "link.ini"))
        d.chmod(0o755)
    if other_users(str(ini)):
        with pytest.raises(PikuError, match="UWSGI_INCLUDE_FILE: .* is refused: it is not a file only the piku"):
            check("UWSGI_INCLUDE_FILE", str(ini))
        with pytest.raises(PikuError, match="is refused"):
            check("UWSGI_INCLUDE_FILE", str(d / "link.ini"))


def test_relative_include_files_and_static_dirs_stay_in_the_release(tmp_path, secret):
    rel = release(tmp_path, {"extra/uwsgi.ini": "[uwsgi]\n", "public/index.html": "x"},
                  {"out.ini": secret, "in.ini": "extra/uwsgi.ini", "pub": os.path.dirname(secret),
                   "assets": "public"})
    for key in piku.INCLUDE_SETTINGS:
        piku.check_app_paths(rel, {}, {key: "in.ini"})
        piku.check_app_paths(rel, {}, {key: "not-yet-there.ini"})  # (a release command may write it)
        with pytest.raises(PikuError, match="out.ini leads outside"):
            piku.check_app_paths(rel, {}, {key: "out.ini"})
    piku.check_app_paths(rel, {"static": "assets"}, {"NGINX_STATIC_PATHS": "/a:assets,/b:public/"})
    with pytest.raises(PikuError, match="pub leads outside"):
        piku.check_app_paths(rel, {}, {"NGINX_STATIC_PATHS": "/a:assets,/b:pub/"})
    with pytest.raises(PikuError, match="pub leads outside"):
        piku.check_app_paths(rel, {"static": "pub"}, {})
    piku.check_app_paths(None, {}, {"UWSGI_INCLUDE_FILE": "out.ini"})  # (not deployed: checked at push)


def test_config_set_of_another_users_include_file_changes_nothing(tmp_path, monkeypatch, capsys):
    paths = app_root(tmp_path, monkeypatch)
    ini = tmp_path / "open.ini"
    ini.write_text("[uwsgi]\n")
    ini.chmod(0o646)
    assert piku.main(["config:set", "app", f"UWSGI_INCLUDE_FILE={ini}"]) != 0
    assert "UWSGI_INCLUDE_FILE" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(paths.envs, "app", "ENV"))


# --- item 5: big values ----------------------------------------------------------------------

def test_value_and_settings_size_limits():
    piku.check_env_limits({"A": "x" * piku.MAX_VALUE_BYTES}, "config:set")
    with pytest.raises(PikuError, match=r"config:set: A is 65537 bytes long; a value may have at most 64 KiB"):
        piku.check_env_limits({"A": "x" * (piku.MAX_VALUE_BYTES + 1)}, "config:set")
    with pytest.raises(PikuError, match="bytes long"):  # UTF-8 bytes, not characters
        piku.check_env_limits({"A": "é" * (piku.MAX_VALUE_BYTES // 2 + 1)}, "x")
    many = {f"K{i}": "x" * 60000 for i in range(18)}
    with pytest.raises(PikuError, match="the settings take .* bytes together; at most 1 MiB"):
        piku.check_env_limits(many, "ENV (in the repo)")
    piku.check_env_limits(dict(list(many.items())[:17]), "x")
    with pytest.raises(PikuError, match="NUL"):
        piku.check_env_limits({"A": "a\0b"}, "x")
    with pytest.raises(PikuError, match="no UTF-8 form"):
        piku.check_env_limits({"A": "\ud800"}, "x")
    piku.check_env_limits({"A": "\udcff"}, "x")  # (a byte that is not UTF-8, as read from a file)


def test_a_megabyte_value_in_the_repo_env_is_refused_by_name(tmp_path):
    rel = release(tmp_path, {"ENV": "SMALL=1\nBIG=" + "x" * 1024 * 1024 + "\n"})
    with pytest.raises(PikuError, match=r"ENV \(in the repo\): BIG is 1048576 bytes long") as e:
        piku.read_repo_env(None, "app", rel, {})
    assert len(str(e.value)) < 300


def test_config_set_of_a_big_value_changes_nothing(tmp_path, monkeypatch, capsys):
    paths = app_root(tmp_path, monkeypatch)
    assert piku.main(["config:set", "app", "BIG=" + "x" * 70000]) != 0
    err = capsys.readouterr().err
    assert "config:set: BIG is 70000 bytes long" in err and len(err) < 300
    assert not os.path.exists(os.path.join(paths.envs, "app", "ENV"))
    assert piku.main(["config:set", "app", "K" * 129 + "=1"]) != 0
    err = capsys.readouterr().err
    assert "at most 128" in err and len(err) < 300


def test_build_tools_get_only_what_configures_them():
    settings = {"BIG": "x" * 60000, "HOME": "/evil-home", "USER": "evil", "PYTHONPATH": "/evil",
                "LD_PRELOAD": "/evil.so", "DATA_ROOT": "/evil", "UV_INDEX_URL": "https://idx.example/simple",
                "PIP_INDEX_URL": "https://idx.example/simple", "HTTPS_PROXY": "http://proxy:3128",
                "no_proxy": "localhost", "PATH": "/opt/py/bin:/usr/bin", "PIKU_UWSGI_PLUGIN_DIR": "/opt/uwsgi",
                "PIKU_NOT_A_SETTING": "x", "SSL_CERT_FILE": "/etc/ssl/ca.pem", "VIRTUAL_ENV": "/evil"}
    environ = {"HOME": "/home/piku", "USER": "piku", "PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "GIT_DIR": "/x", "SSH_CONNECTION": "1 2 3 4", "UV_SYSTEM_CERTS": "1", "VIRTUAL_ENV": "/v",
               "PYTHONPATH": "/server"}
    env = piku.build_env(piku.paths_for("/srv/piku"), "app", settings, environ)
    assert env["HOME"] == "/home/piku" and env["USER"] == "piku"
    for key in ("BIG", "PYTHONPATH", "LD_PRELOAD", "DATA_ROOT", "GIT_DIR", "SSH_CONNECTION", "VIRTUAL_ENV",
                "PIKU_NOT_A_SETTING"):
        assert key not in env, key
    for key in ("UV_INDEX_URL", "PIP_INDEX_URL", "HTTPS_PROXY", "no_proxy", "SSL_CERT_FILE", "PIKU_UWSGI_PLUGIN_DIR"):
        assert env[key] == settings[key], key
    assert env["PATH"] == "/opt/py/bin:/usr/bin" and env["UV_SYSTEM_CERTS"] == "1" and env["LC_ALL"] == "C.UTF-8"
    assert "UV_PROJECT_ENVIRONMENT" not in env  # (each build names its own virtualenv)


@pytest.mark.parametrize("argv,env,text", [
    (["true"], {"X": "x" * 200000}, "Argument list too long"),
    (["true", "a\0b"], None, "null"),
    ([os.path.abspath(__file__)], None, "Permission denied"),
])
def test_a_tool_that_cannot_start_is_one_error_line(argv, env, text):
    with pytest.raises(PikuError, match=text) as e:
        piku.run(argv, env=env)
    assert str(e.value).startswith("cannot start ") and len(str(e.value).splitlines()) == 1


# --- item 6: no dynamic apps from uwsgi packets ----------------------------------------------

def test_wsgi_workers_load_no_app_but_the_apps_own():
    v = {"app": "demo", "kind": "wsgi", "index": 1, "paths": piku.paths_for("/srv/piku"), "settings": {},
         "port": 5000, "piku": ["/usr/bin/python3", "/srv/piku.py"], "python_plugin": "python3",
         "release": "r1", "socket": "/srv/piku/nginx/demo.1.sock"}
    assert "\nmax-apps = 1\n" in piku.render_vassal({**v, "mode": "native"})
    assert "\nmax-apps = 1\n" in piku.render_inner_ini({**v, "mode": "pyuwsgi"})


# --- item 10: smaller ------------------------------------------------------------------------

def test_a_procfile_has_at_most_50_process_kinds():
    kinds = "".join(f"w{i}: sleep 1\n" for i in range(50))
    assert len(piku.parse_procfile(kinds)[0]) == 50
    with_special = "release: x\npreflight: y\n# c\n\n" + "".join(f"w{i}: sleep 1\n" for i in range(48))
    assert len(piku.parse_procfile(with_special)[0]) == 50  # (release and preflight count)
    with pytest.raises(PikuError, match="Procfile line 51: more than 50 process kinds"):
        piku.parse_procfile(kinds + "one_more: sleep 1\n")
    with pytest.raises(PikuError, match="more than 50"):
        piku.parse_procfile("".join(f"w{i}: sleep 1\n" for i in range(500)))


def test_data_and_log_directories_are_private(tmp_path):
    new, old, tight, shared = (str(tmp_path / n) for n in ("new", "old", "tight", "shared"))
    os.mkdir(old, 0o755)
    os.chmod(old, 0o777)
    os.mkdir(tight, 0o700)
    os.mkdir(shared)
    os.chmod(shared, 0o2770)  # (an admin's setgid group for nginx: kept, without group write)
    piku.private_dirs(new, old, tight, shared)
    modes = [os.stat(d).st_mode & 0o7777 for d in (new, old, tight, shared)]
    assert modes == [0o750, 0o750, 0o700, 0o2750]


def test_the_static_kind_is_always_a_directory_of_the_app():
    """`static: /` served the server's root directory (the original piku: the app's own)."""
    for path, alias in (("/", "/srv/piku/apps/demo/"), (".", "/srv/piku/apps/demo/"),
                        ("/etc", "/srv/piku/apps/demo/etc/"), ("public/", "/srv/piku/apps/demo/public/")):
        text = piku.render_nginx({"app": "demo", "settings": {"NGINX_SERVER_NAME": "a.test"},
                                  "paths": piku.paths_for("/srv/piku"), "kinds": {"static": path}, "sockets": [],
                                  "port": 5000, "app_dir": "/srv/piku/apps/demo", "cert": False,
                                  "has_backend": False})
        assert f"alias {alias};" in text, text
        assert "alias /;" not in text and "alias /etc" not in text


def test_a_nul_in_a_procfile_command_is_refused():
    with pytest.raises(PikuError, match="Procfile line 2: the command holds a NUL character"):
        piku.parse_procfile("web: ok\nworker: a\0b\n")


def test_an_error_quoting_a_long_value_stays_short():
    with pytest.raises(PikuError, match=r"PORT: expected a whole number, got 'xxx.*\(shortened\)$") as e:
        piku.validate_settings({"PORT": "x" * 60000})
    assert len(str(e.value)) < 330


def test_local_packages_may_not_lead_outside_the_release(tmp_path, secret):
    rel = release(tmp_path, {"requirements.txt": "./lib\n-e ./editable\nflask\n/opt/wheels/x.whl\n",
                             "lib/setup.py": "", "uv.lock": 'source = { path = "pkgs/secret.txt" }\n'},
                  {"editable": os.path.dirname(secret)})
    with pytest.raises(PikuError, match="editable leads outside the repository .* commit the package itself"):
        piku.check_repo_links(rel)
    os.unlink(os.path.join(rel, "editable"))
    piku.check_repo_links(rel)
    os.symlink(os.path.dirname(secret), os.path.join(rel, "pkgs"))
    with pytest.raises(PikuError, match="pkgs/secret.txt leads outside"):
        piku.check_repo_links(rel)


def test_workers_are_this_users_processes_only():
    """Another local user could name a process `myapp:web.1 uWSGI master`: ps would call the
    app running, and stop and destroy wait for it."""
    import subprocess
    import time
    procs = [subprocess.Popen(["hardtest:web.1 uWSGI master", "30"], executable="/bin/sleep")]
    if os.getuid() == 0:
        procs.append(subprocess.Popen(["hardother:web.1 uWSGI master", "30"], executable="/bin/sleep",
                                      user=65534, group=65534, extra_groups=[]))
    try:
        deadline = time.monotonic() + 5
        while "hardtest:web.1" not in piku.running_workers() and time.monotonic() < deadline:
            time.sleep(0.01)
        running = piku.running_workers()
        assert "hardtest:web.1" in running and "hardother:web.1" not in running
    finally:
        for p in procs:
            p.kill()
            p.wait()
