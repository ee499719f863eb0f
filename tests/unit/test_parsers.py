"""Unit tests for the pure parsers of piku.py (section 5)."""
import os
import subprocess
import sys
import time

import pytest

import piku
from piku import PikuError


@pytest.mark.parametrize("raw,name", [("myapp", "myapp"), ("/myapp", "myapp"), ("myapp.git", "myapp"),
                                      ("/myapp.git", "myapp"), ("~/my_app-2.x", "my_app-2.x"),
                                      ("A1", "A1")])
def test_app_name_accepts_git_forms(raw, name):
    assert piku.parse_app_name(raw) == name


@pytest.mark.parametrize("raw", ["", "..", ".", "a/b", "../x", "-x", ".hidden", "a b", "a;b", "x" * 300,
                                 "a$b", "a\nb", "//a", "/", "a/", "é"])
def test_app_name_rejects_unsafe(raw):
    with pytest.raises(PikuError):
        piku.parse_app_name(raw)


def test_procfile_kinds_comments_and_blank_lines():
    workers, warnings = piku.parse_procfile(
        "# comment\n\nwsgi: app:application\nworker: python w.py --x=1\n"
        "cron1: */5 * * * * python job.py\nrelease: python migrate.py\n")
    assert list(workers) == ["wsgi", "worker", "cron1", "release"]
    assert workers["worker"] == "python w.py --x=1"
    assert warnings == []


def test_procfile_wsgi_beats_web_with_warning():
    workers, warnings = piku.parse_procfile("web: gunicorn app:app\nwsgi: app:application\n")
    assert "web" not in workers and "wsgi" in workers
    assert any("web is disabled" in w for w in warnings)


@pytest.mark.parametrize("text,where", [("web gunicorn", "line 1"), ("web:\n", "line 1"),
                                        ("ok: x\nb@d: y", "line 2"), ("web: a\nweb: b", "twice"),
                                        ("cron: * * * python x", "line 1"),
                                        ("cron: 61 * * * * x", "line 1"),
                                        ("wsgi: app:app; rm -rf /", "line 1")])
def test_procfile_errors_name_the_line(text, where):
    with pytest.raises(PikuError, match=where):
        piku.parse_procfile(text)


def test_env_expansion_quotes_and_comments():
    env = piku.parse_env("# c\nA=1\nB=$A-${A}\nexport C='lit $A'\nD=\"x\\ny\"\nE=$UNKNOWN\n",
                         base={"HOME": "/h"})
    assert env == {"A": "1", "B": "1-1", "C": "lit $A", "D": "x\ny", "E": "$UNKNOWN"}


def test_env_bad_line_raises_with_line_number():
    with pytest.raises(PikuError, match="line 2"):
        piku.parse_env("A=1\nnot a setting\n")


@pytest.mark.parametrize("value", ["plain", "with space", "a=b=c", "$HOME", "${X}", "new\nline",
                                   "'quoted'", '"dq"', "semi;colon", "# hash", "back\\slash",
                                   "@(exec://touch /tmp/x)", "%(foo)", " lead", "trail ", "tab\t", "é ü"])
def test_env_roundtrip_is_byte_exact(value):
    text = piku.render_env({"K": value})
    assert piku.parse_env(text) == {"K": value}


def test_assignments_join_unquoted_words_and_keep_equals():
    assert piku.parse_assignments(["A=1", "B=x=y", "C=a", "b"]) == {"A": "1", "B": "x=y", "C": "a b"}
    with pytest.raises(PikuError):
        piku.parse_assignments(["novalue"])
    with pytest.raises(PikuError):
        piku.parse_assignments(["1BAD=x"])


@pytest.mark.parametrize("original,argv", [
    ("git-receive-pack 'myapp'", ["git-receive-pack", "myapp"]),
    ("git-receive-pack '/myapp'", ["git-receive-pack", "myapp"]),
    ("git-receive-pack 'myapp.git'", ["git-receive-pack", "myapp"]),
    ("git-upload-pack '/myapp.git'", ["git-upload-pack", "myapp"]),
    ("git receive-pack 'myapp'", ["git-receive-pack", "myapp"]),
    ("config:set app 'K=a b' X=\"c d\"", ["config:set", "app", "K=a b", "X=c d"]),
    ("apps", ["apps"]), ("", ["help"]),
])
def test_ssh_command_forms(original, argv):
    assert piku.parse_ssh_command(original) == argv


@pytest.mark.parametrize("original", ["git-receive-pack '../x'", "git-receive-pack 'a/b'",
                                      "git-receive-pack ''", "git-upload-pack 'a' 'b'",
                                      "config:set app 'unterminated", "apps\0"])
def test_ssh_command_refusals(original):
    with pytest.raises(PikuError):
        piku.parse_ssh_command(original)


def test_scaling_roundtrip_and_scale_args():
    assert piku.parse_scaling("web:2\nworker=1\n# x\nbad\n") == {"web": 2, "worker": 1}
    assert piku.parse_scaling(piku.render_scaling({"a": 3})) == {"a": 3}
    assert piku.parse_scale_args(["worker=3"], {"worker"}) == {"worker": 3}
    for bad in (["web=-1"], ["nope=1"], ["web"], ["web=x"]):
        with pytest.raises(PikuError):
            piku.parse_scale_args(bad, {"web", "worker"})


@pytest.mark.parametrize("value,req", [("3.12", "3.12"), ("3.12.1", "3.12.1"), ("3", "3"),
                                       (">=3.11", ">=3.11"), ("3.12\n3.11\n", "3.12"),
                                       ("cpython@3.12", "3.12"), (">=3.10, <3.13", ">=3.10,<3.13"),
                                       ("", None)])
def test_python_version_valid(value, req):
    assert piku.parse_python_version(value) == req


@pytest.mark.parametrize("value", ["banana", "3.x", "2.7", "python", "3.12; rm", "$(id)"])
def test_python_version_garbage_is_a_clear_error(value):
    with pytest.raises(PikuError, match="Python"):
        piku.parse_python_version(value)


def test_cron_fields_and_matching():
    sets, cmd = piku.parse_cron("*/15 9-17 * * 1-5 python job.py --x")
    assert cmd == "python job.py --x" and sets[0] == {0, 15, 30, 45} and sets[1] == set(range(9, 18))
    monday_10_15 = time.struct_time((2026, 11, 23, 10, 15, 0, 0, 327, 0))
    sunday = time.struct_time((2026, 11, 22, 10, 15, 0, 6, 326, 0))
    assert piku.cron_matches(sets, monday_10_15) and not piku.cron_matches(sets, sunday)
    sun_sets, _ = piku.parse_cron("0 0 * * 7 x")
    assert sun_sets[4] == {0}
    for bad in ("60 * * * * x", "* * 0 * * x", "a * * * * x", "*/0 * * * * x", "1,2,x * * * * x"):
        with pytest.raises(PikuError):
            piku.parse_cron(bad)


def test_plugin_python_and_pyvenv_cfg():
    assert piku.parse_plugin_python(b"\0libpython3.11.so.1.0\0") == "3.11"
    assert piku.parse_plugin_python(b"nothing") is None
    assert piku.parse_pyvenv_cfg("home = /usr\nversion_info = 3.12.1\n")["version_info"] == "3.12.1"


def test_uv_changes_and_pinned_requirements():
    assert piku.parse_uv_changes("Resolved\n + flask==3.0\n - six==1.0\n") == (["flask==3.0"], ["six==1.0"])
    assert piku.is_fully_pinned("flask==3.0.0\n# c\nsix==1.16 ; python_version>'3'\n")
    assert not piku.is_fully_pinned("flask>=3\n")
    assert not piku.is_fully_pinned("")


def test_missing_requirements_from_uv_pip_check():
    out = ("Checked 1 package in 0.30ms\nFound 3 incompatibilities\n"
           "The package `flask` requires `werkzeug>=3.0.0`, but it's not installed\n"
           "The package `flask` requires `jinja2>=3.1.2`, but it's not installed\n"
           "The package `a` requires `b==1`, but `2` is installed\n")
    assert piku.parse_missing_requirements(out) == ["jinja2", "werkzeug"]
    assert piku.parse_missing_requirements("Checked 3 packages in 1ms\nAll installed packages are compatible\n") == []


def test_bool_and_int_parsers():
    assert piku.parse_bool("Yes") is True and piku.parse_bool("0") is False
    with pytest.raises(PikuError):
        piku.parse_bool("maybe")
    assert piku.parse_int("12", "X", 1, 20) == 12
    with pytest.raises(PikuError):
        piku.parse_int("3.12", "X")
    with pytest.raises(PikuError):
        piku.parse_int("0", "X", 1, 2)


@pytest.mark.parametrize("value,url,public", [
    ("letsencrypt.org", "https://acme-v02.api.letsencrypt.org/directory", True),
    ("letsencrypt", "https://acme-v02.api.letsencrypt.org/directory", True),
    ("zerossl.com", "https://acme.zerossl.com/v2/DV90", True),
    ("letsencrypt_test", "https://acme-staging-v02.api.letsencrypt.org/directory", True),
    ("https://127.0.0.1:14000/dir", "https://127.0.0.1:14000/dir", False)])
def test_acme_ca(value, url, public):
    assert piku.parse_acme_ca(value) == (url, public)


@pytest.mark.parametrize("value", ["", "http://ca.test/dir", "https://ca.test/dir;x", "$(id)", "nosuchca"])
def test_acme_ca_refuses(value):
    with pytest.raises(PikuError, match="ACME_ROOT_CA"):
        piku.parse_acme_ca(value)


def test_acme_names():
    assert piku.acme_names(["a.example.com", "www.a.example.com"], True) == ["a.example.com", "www.a.example.com"]
    assert piku.acme_names(["app.test"], True) == [] and piku.acme_names(["app.test"], False) == ["app.test"]
    for bad in (["*.example.com"], ["10.0.0.1"], ["localhost"], ["a.example.com", "b.localhost"]):
        assert piku.acme_names(bad, True) == []


def test_openssl_enddate():
    assert piku.parse_openssl_enddate("notAfter=Jan  2 03:04:05 2030 GMT\n") == 1893553445
    assert piku.parse_openssl_enddate("garbage") is None


@pytest.mark.parametrize("url,parsed", [
    ("piku@example.com:myapp", ("piku@example.com", None, "myapp")),
    ("piku@example.com:myapp.git", ("piku@example.com", None, "myapp")),
    ("piku@example.com:/myapp", ("piku@example.com", None, "myapp")),
    ("example.com:my.app", ("example.com", None, "my.app")),
    ("ssh://piku@example.com:2222/myapp", ("piku@example.com", "2222", "myapp")),
    ("ssh://piku@example.com/myapp.git", ("piku@example.com", None, "myapp")),
    ("ssh://piku@[::1]:22/app", ("piku@[::1]", "22", "app")),
    ("piku@[::1]:app", ("piku@[::1]", None, "app")),
])
def test_parse_remote_url(url, parsed):
    assert piku.parse_remote_url(url) == parsed


@pytest.mark.parametrize("url", ["", "https://github.com/a/b.git", "/srv/repo", "piku@host:a/b", "piku@host:..",
                                 "-oProxyCommand=x:app", "ssh://-oProxyCommand=x/app", "piku@host:", "a b:app",
                                 "ssh://piku@host:2222/a/b"])
def test_parse_remote_url_refuses(url):
    with pytest.raises(PikuError):
        piku.parse_remote_url(url)


@pytest.mark.parametrize("value,parsed", [("piku@host", ("piku@host", None)), ("piku@host:2222", ("piku@host", "2222")),
                                          ("ssh://piku@10.0.0.1:22", ("piku@10.0.0.1", "22")), ("host", ("host", None))])
def test_parse_server_address(value, parsed):
    assert piku.parse_server_address(value) == parsed


@pytest.mark.parametrize("value", ["", "-oProxyCommand=id", "piku@host:app", "a;b", "piku@host:99999999"])
def test_parse_server_address_refuses(value):
    with pytest.raises(PikuError):
        piku.parse_server_address(value)


@pytest.mark.parametrize("args,parsed", [(["-t", "app/"], (["-t"], "app/")),
                                         (["-r", "-p", "-f", "app/x"], (["-r", "-p", "-f"], "app/x"))])
def test_parse_scp_args(args, parsed):
    assert piku.parse_scp_args(args) == parsed


@pytest.mark.parametrize("args", [[], ["-t"], ["app/"], ["-t", "-f", "a"], ["-t", "a", "b"], ["-S", "x", "-t", "a"],
                                  ["-oProxyCommand=x", "-t", "a"]])
def test_parse_scp_args_refuses(args):
    with pytest.raises(PikuError, match="refused"):
        piku.parse_scp_args(args)


@pytest.mark.parametrize("version,request_,ok", [
    ("3.11.2", "3", True), ("3.11.2", "3.11", True), ("3.11.2", "3.12", False), ("3.11.2", "3.11.2", True),
    ("3.11.2", "3.11.1", False), ("3.11.2", ">=3.11", True), ("3.10.1", ">=3.11", False),
    ("3.12.0", ">=3.11,<3.13", True), ("3.13.0", ">=3.11,<3.13", False), ("3.11.2", "==3.11.*", True),
    ("3.12.0", "==3.11.*", False), ("3.11.2", "~=3.10", True), ("3.11.2", "!=3.11.*", False),
    ("3.11.9", ">3.11", True), ("3.11.0", ">3.11", False), ("3.11.5", "<=3.11", False)])
def test_python_satisfies(version, request_, ok):
    assert piku.python_satisfies(version, request_) is ok


@pytest.mark.parametrize("args,msg", [(["web=2"], "same PORT"), (["cron1=2"], "once per schedule")])
def test_scale_limits(args, msg):
    with pytest.raises(PikuError, match=msg):
        piku.parse_scale_args(args, {"web", "cron1", "worker"})
    assert piku.parse_scale_args(["web=0", "cron1=1", "worker=5"], {"web", "cron1", "worker"}) == \
        {"web": 0, "cron1": 1, "worker": 5}
    assert piku.parse_scale_args(["web=3"], {"web"}, behind_nginx=True) == {"web": 3}  # one port each


def test_requirement_includes():
    text = "-r base.txt\n--requirement=dev.txt\n-c constraints.txt\n--constraint more.txt\n-rfoo.txt\nflask\n# -r no\n"
    assert piku.parse_requirement_includes(text) == ["base.txt", "dev.txt", "constraints.txt", "more.txt", "foo.txt"]


def test_requirements_fingerprint_follows_includes(tmp_path):
    (tmp_path / "requirements.txt").write_text("-r base.txt\n")
    (tmp_path / "base.txt").write_text("flask==3.0.0\n-r requirements.txt\n")  # a cycle is fine
    before = piku.requirements_with_includes(str(tmp_path))
    (tmp_path / "base.txt").write_text("flask==3.0.1\n")
    assert piku.requirements_with_includes(str(tmp_path)) != before


def test_procfile_crlf_and_wsgi_trailing_comment():
    workers, _ = piku.parse_procfile("wsgi: app:app   # served by uWSGI\r\nworker: python w.py # kept\r\n")
    assert workers == {"wsgi": "app:app", "worker": "python w.py # kept"}


def test_lock_local_sources():
    lock = ('[[package]]\nname = "app"\nsource = { editable = "." }\n'
            '[[package]]\nname = "a"\nsource = { directory = "libs/a" }\n'
            '[[package]]\nname = "b"\nsource = { editable = "libs/b" }\n'
            '[[package]]\nname = "c"\nsource = { path = "wheels/c-1.0-py3-none-any.whl" }\n'
            '[[package]]\nname = "d"\nsource = { registry = "https://pypi.org/simple" }\n'
            '[[package]]\nname = "e"\nsource = { git = "https://example.org/e.git" }\n')
    assert piku.parse_lock_local_sources(lock) == ["libs/a", "libs/b", "wheels/c-1.0-py3-none-any.whl"]
    assert piku.parse_lock_local_sources("") == []


def test_requirement_local_paths():
    text = ("flask==3.0\n-e .\n./libs/a\n--editable ../b  # a comment\nfoo @ file:///opt/x.whl\n"
            "https://example.org/y.whl\n/abs/pkg\n-r other.txt\n# ./not-this\n")
    assert piku.parse_requirement_local_paths(text) == [".", "./libs/a", "../b", "/opt/x.whl", "/abs/pkg"]


def test_local_sources_digest_follows_content_not_build_output(tmp_path):
    lib = tmp_path / "libs" / "a"
    lib.mkdir(parents=True)
    (lib / "a.py").write_text("V = 1\n")
    first = piku.local_sources_digest(str(tmp_path), ["libs/a"])
    for junk in ("build/lib/a.py", "a.egg-info/PKG-INFO", "__pycache__/a.pyc", ".cache/x"):
        (lib / junk).parent.mkdir(parents=True, exist_ok=True)
        (lib / junk).write_text("junk")
    assert piku.local_sources_digest(str(tmp_path), ["libs/a"]) == first
    (lib / "a.py").write_text("V = 2\n")
    assert piku.local_sources_digest(str(tmp_path), ["libs/a"]) != first
    assert piku.local_sources_digest(str(tmp_path), []) == ""


def test_clean_env_drops_git_hook_variables_and_exec_path():
    env = piku.clean_env({"GIT_DIR": "/r", "GIT_QUARANTINE_PATH": "/q", "HOME": "/h", "SSH_ORIGINAL_COMMAND": "x",
                          "PATH": "/usr/lib/git-core:/usr/lib/git-core:/usr/local/bin:/usr/bin:/usr/bin"})
    assert env == {"HOME": "/h", "PATH": "/usr/local/bin:/usr/bin"}


def test_crash_loop_from_uwsgi_daemon_lines():
    spawn = '[uwsgi-daemons] spawning "gunicorn app" (uid: 1000 gid: 1000)\n'
    again = '/bin/sh: 1: gunicorn: not found\n[uwsgi-daemons] respawning "gunicorn app" (uid: 1000 gid: 1000)\n'
    assert not piku.crash_looping(spawn + "listening\n")
    assert not piku.crash_looping(spawn + again)  # one restart can be a fluke
    assert piku.crash_looping(spawn + again * 2)
    assert piku.crash_looping('[uwsgi-daemons] throttling "x" for 4 seconds\n')
    assert piku.daemon_restarts(spawn + again * 3) == (3, False)


def test_requires_python_and_the_missing_interpreter_error():
    assert piku.parse_requires_python('[project]\nname = "x"\nrequires-python = ">=3.15"\n') == ">=3.15"
    assert piku.parse_requires_python("[project]\nrequires-python='~=3.11'\n") == "~=3.11"
    assert piku.parse_requires_python('[project]\nname = "x"\n') is None
    e = str(piku.no_interpreter_error(None, ">=3.15"))
    assert 'requires-python = ">=3.15"' in e and "uv python install '>=3.15'" in e and "(uv default)" not in e
    e = str(piku.no_interpreter_error("3.14", ">=3.9", "Failed to download https://example.org/cpython.tar.gz"))
    assert e.startswith("No interpreter found for Python 3.14 (uv could not download it: Failed to download")
    assert "uv python install 3.14" in e


def test_app_names_whose_worker_files_could_clash():
    assert piku.name_clash("au-v_y", ["au-v", "other"]) == "au-v"
    assert piku.name_clash("au-v", ["au-v_y"]) == "au-v_y"
    assert piku.name_clash("au-v", ["au-v", "au-vx", "au-v-y", "au-v.y"]) is None


def test_project_scripts_and_their_wrappers(tmp_path):
    text = ('[project]\nname = "x"\n[project.scripts]\nserve = "mypkg.web:main"\n'
            "'tool-2' = 'mypkg.cli:App.run'  # a comment\nbad = \"not a target\"\n"
            '[tool.uv]\nother = "a:b"\n')
    scripts, problems = piku.parse_project_scripts(text)
    assert scripts == {"serve": "mypkg.web:main", "tool-2": "mypkg.cli:App.run"}
    assert len(problems) == 1 and "bad" in problems[0]
    assert piku.parse_project_scripts('[project]\nname = "x"\n') == ({}, [])
    pkg = tmp_path / "app" / "src" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("import sys\nclass App:\n    @staticmethod\n    def run():\n"
                                "        print('ran', sys.argv[1:])\n        return 3\n")
    script = tmp_path / "tool-2"
    script.write_text(piku.render_entry_point(sys.executable, str(tmp_path / "app"), "mypkg.cli:App.run"))
    script.chmod(0o755)
    r = subprocess.run([str(script), "a", "b"], capture_output=True, text=True, cwd="/")
    assert r.returncode == 3 and r.stdout == "ran ['a', 'b']\n", r


def test_a_cron_job_runs_once_per_minute_across_restarts(tmp_path):
    paths = piku.paths_for(str(tmp_path))
    now, later = time.localtime(1_800_000_000), time.localtime(1_800_000_060)
    assert piku.claim_cron_minute(paths, "app", "cron1.1", now)
    assert not piku.claim_cron_minute(paths, "app", "cron1.1", now)  # a restarted master asks again
    assert piku.claim_cron_minute(paths, "app", "cron1.10", now)  # another job
    assert piku.claim_cron_minute(paths, "app", "cron1.1", later)
    assert sorted(os.listdir(tmp_path / "state" / "app" / "cron")) == [
        "cron1.1." + time.strftime("%Y%m%d%H%M", later), "cron1.10." + time.strftime("%Y%m%d%H%M", now)]


def documented_settings():
    """Setting names in docs/ENV.md's reference tables (the `Not app settings` table excluded)."""
    import os
    import re
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "ENV.md")).read()
    ref = text.split("## Reference", 1)[1].split("### Not app settings", 1)[0]
    return {m for m in re.findall(r"^\| `([A-Z][A-Z0-9_]*)`", ref, re.M)}


def test_settings_table_matches_the_docs():
    table = {s.name for s in piku.SETTINGS}
    documented = documented_settings()
    assert table - documented == set(), f"settings missing from docs/ENV.md: {sorted(table - documented)}"
    assert documented - table == set(), f"documented but not in SETTINGS: {sorted(documented - table)}"


def test_every_setting_has_a_doc_line_and_its_default_passes_its_check():
    for s in piku.SETTINGS:
        assert s.doc and len(s.doc) < 100, s.name
        if s.default not in (None, "") and s.check:
            s.check(s.default, s.name)


@pytest.mark.parametrize("value", ["٥٠٠٠", "1_0000", "+5", "5.0", "0x10", " "])
def test_integers_are_ascii_digits_only(value):
    with pytest.raises(PikuError):
        piku.validate_settings({"PORT": value} if value.strip() else {"UWSGI_PROCESSES": value + "x"})
