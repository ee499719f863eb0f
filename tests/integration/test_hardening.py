"""Issue 10 (hardening): values, keys, committed links and local users that must not get
through, against the real server (sshd, uWSGI emperor, nginx)."""
import json
import os
import shlex
import stat

import pytest

from harness import REPO

SERVER_PY = open(os.path.join(REPO, "tests", "apps", "kinds", "server.py")).read()
WEB = {"Procfile": "web: python3 server.py\n", "server.py": SERVER_PY}


def web_env(server, app):
    """The environment the app's web process runs with (the fixture server reports it)."""
    return json.loads(server.wait_http(server.app_port(app))[1])


def piku_file(server, name, text, mode=0o644):
    """A file in the test server's base directory, owned by the piku user."""
    path = os.path.join(server.base, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    server.chown(path)
    return path


def rejected(r, text):
    assert r.returncode != 0, r.stdout
    assert text in r.stdout, r.stdout
    assert "Traceback" not in r.stdout, r.stdout
    return r.stdout


def error_lines(out):
    return [l for l in out.splitlines() if l.startswith("remote:  !")]


@pytest.fixture(scope="module")
def webapp(server, tmp_path_factory):
    return server.deployed(None, "hardweb", tmp_path_factory.mktemp("hardweb"), WEB)


# --- item 1: no line separator splits a value ------------------------------------------------

@pytest.mark.parametrize("sep", ["\x0b", "\u2028", "\x1c", "\x85"])
def test_config_set_value_with_a_line_separator_stays_one_setting(server, webapp, sep):
    """`G=hi<VT>UWSGI_INCLUDE_FILE=x.ini` stored two settings, and the worker loaded the ini
    (an `exec-asap` in it ran as the piku user)."""
    marker = os.path.join(server.base, f"loaded-{ord(sep)}")
    ini = piku_file(server, f"sep-{ord(sep)}.ini", f"[uwsgi]\nexec-asap = touch {marker}\n")
    value = f"hi{sep}UWSGI_INCLUDE_FILE={ini}"
    r = server.ssh("config:set", "hardweb", shlex.quote(f"G={value}"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert server.ssh("config:get", "hardweb", "G").stdout == value + "\n"
    config = server.ssh("config", "hardweb").stdout
    assert "UWSGI_INCLUDE_FILE" not in server.ssh("config:get", "hardweb", "UWSGI_INCLUDE_FILE").stdout
    assert [l.split("=")[0] for l in config.splitlines()] == ["G"], config
    assert web_env(server, "hardweb")["G"] == value
    assert "UWSGI_INCLUDE_FILE" not in web_env(server, "hardweb")
    assert not any("ini =" in open(server.path("uwsgi-enabled", n)).read()
                   for n in os.listdir(server.path("uwsgi-enabled")) if n.startswith("hardweb_"))
    assert not os.path.exists(marker)
    assert server.ssh("config:unset", "hardweb", "G").returncode == 0


def test_committed_env_json_escape_of_a_line_separator_stays_one_setting(server, tmp_path):
    marker = os.path.join(server.base, "loaded-json")
    ini = piku_file(server, "json.ini", f"[uwsgi]\nexec-asap = touch {marker}\n")
    env = f'G="hi\\u000bUWSGI_INCLUDE_FILE={ini}"\nH="x\\u2028PORT=1"\n'
    server.deployed(None, "hardjson", tmp_path, {**WEB, "ENV": env})
    got = web_env(server, "hardjson")
    assert got["G"] == f"hi\x0bUWSGI_INCLUDE_FILE={ini}" and got["H"] == "x\u2028PORT=1"
    assert got["PORT"] == str(server.app_port("hardjson"))
    live = server.ssh("config:live", "hardjson").stdout
    assert not any(l.startswith("UWSGI_INCLUDE_FILE=") for l in live.splitlines())
    assert not os.path.exists(marker)


# --- item 1: include files are the app's, or the piku user's alone ---------------------------

def test_include_file_of_another_user_is_refused(server, webapp, tmp_path):
    """Root's (or any other user's) uWSGI ini could make the worker run commands as piku."""
    other = tmp_path / "others.ini"
    other.write_text("[uwsgi]\nexec-asap = touch /tmp/never\n")
    other.chmod(0o644)
    os.chmod(tmp_path, 0o755)
    before = server.read("envs/hardweb/ENV")
    for key in ("UWSGI_INCLUDE_FILE", "NGINX_INCLUDE_FILE"):
        r = server.ssh("config:set", "hardweb", f"{key}={other}")
        assert r.returncode != 0 and f"{key}: {other} is refused" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    open_ini = piku_file(server, "open.ini", "[uwsgi]\n", mode=0o666)
    r = server.ssh("config:set", "hardweb", f"UWSGI_INCLUDE_FILE={open_ini}")
    assert r.returncode != 0 and "only the piku user can write" in r.stderr, r.stderr
    assert server.read("envs/hardweb/ENV") == before


def test_include_file_the_piku_user_owns_is_loaded(server, webapp):
    marker = os.path.join(server.base, "loaded-own")
    ini = piku_file(server, "own.ini", f"[uwsgi]\nexec-asap = touch {marker}\n")
    r = server.ssh("config:set", "hardweb", f"UWSGI_INCLUDE_FILE={ini}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.path.exists(marker)
    assert server.ssh("config:unset", "hardweb", "UWSGI_INCLUDE_FILE").returncode == 0


def test_relative_include_file_is_the_apps_and_may_not_leave_the_release(server, tmp_path):
    marker = os.path.join(server.base, "loaded-relative")
    files = {**WEB, "deploy/uwsgi.ini": f"[uwsgi]\nexec-asap = touch {marker}\n",
             "ENV": "UWSGI_INCLUDE_FILE=deploy/extra.ini\n"}
    repo = server.make_app(None, tmp_path / "hardinc", files)
    os.symlink("uwsgi.ini", repo / "deploy" / "extra.ini")  # a link inside the repository: fine
    server.commit(repo, "link inside")
    r = server.push(repo, "hardinc")
    assert r.returncode == 0, r.stdout + server.logs()
    assert os.path.exists(marker)
    release = os.path.realpath(server.path("apps", "hardinc"))  # the worker's own release
    assert f"ini = {os.path.join(release, 'deploy', 'extra.ini')}" in server.read("uwsgi-enabled/hardinc_web.1.ini")
    os.unlink(repo / "deploy" / "extra.ini")
    os.symlink(server.path("uwsgi", "uwsgi.ini"), repo / "deploy" / "extra.ini")
    server.commit(repo, "link outside")
    out = rejected(server.push(repo, "hardinc"), "deploy/extra.ini leads outside the repository")
    assert len(error_lines(out)) == 1, out


# --- item 4: committed symbolic links --------------------------------------------------------

def test_env_linked_to_a_piku_file_is_refused_and_never_chmodded(server, tmp_path):
    target = server.path("uwsgi", "uwsgi.ini")
    mode = stat.S_IMODE(os.stat(target).st_mode)
    repo = server.make_app(None, tmp_path / "hardlink1", WEB)
    os.symlink(target, repo / "ENV")
    server.commit(repo, "ENV link")
    out = rejected(server.push(repo, "hardlink1"), "ENV leads outside the repository")
    assert len(error_lines(out)) == 1 and "emperor" not in out, out
    assert stat.S_IMODE(os.stat(target).st_mode) == mode


def test_env_linked_to_authorized_keys_never_becomes_settings(server, webapp, tmp_path):
    keys = os.path.join(server.home, ".ssh", "authorized_keys")
    repo = server.make_app(None, tmp_path / "hardweb-keys", WEB)
    server.git(repo, "remote", "add", "piku", server.remote_url("hardweb"))
    server.git(repo, "fetch", "-q", "piku")
    server.git(repo, "reset", "-q", "--hard", "piku/main")
    os.symlink(keys, repo / "ENV")
    server.commit(repo, "ENV -> authorized_keys")
    out = rejected(server.push(repo, "hardweb"), "ENV leads outside the repository")
    assert "ssh-ed25519" not in out and "command=" not in out, out
    live = server.ssh("config:live", "hardweb").stdout
    assert "ssh-" not in live and "command" not in live
    assert "ssh-" not in json.dumps(web_env(server, "hardweb"))


@pytest.mark.parametrize("name", ["ENV", "Procfile", "requirements.txt", ".python-version"])
def test_a_file_linked_to_etc_passwd_is_a_clear_error(server, tmp_path, name):
    files = dict(WEB)
    files.pop(name, None)
    repo = server.make_app(None, tmp_path / "hardpw", files)
    os.symlink("/etc/passwd", repo / name)
    server.commit(repo, "link to /etc/passwd")
    out = rejected(server.push(repo, "hardpw"), f"{name} leads outside the repository")
    assert "root:" not in out and "/etc/passwd" not in out and len(error_lines(out)) == 1, out
    assert not os.path.exists(server.path("apps", "hardpw"))


def test_links_inside_the_release_still_work(server, tmp_path):
    files = {"conf/Procfile": WEB["Procfile"], "server.py": SERVER_PY, "conf/env.prod": "FROM_LINK=yes\n"}
    repo = server.make_app(None, tmp_path / "hardin", files)
    os.symlink("conf/Procfile", repo / "Procfile")
    os.symlink("conf/env.prod", repo / "ENV")
    server.commit(repo, "links inside")
    r = server.push(repo, "hardin")
    assert r.returncode == 0, r.stdout + server.logs()
    assert web_env(server, "hardin")["FROM_LINK"] == "yes"


# --- item 5: big values ----------------------------------------------------------------------

def test_a_megabyte_value_in_the_repo_env_is_refused_without_a_traceback(server, tmp_path):
    files = {**WEB, "requirements.txt": "", "ENV": "BIG=" + "x" * 1024 * 1024 + "\n"}
    repo = server.make_app(None, tmp_path / "hardbig", files)
    out = rejected(server.push(repo, "hardbig"), "ENV (in the repo): BIG is 1048576 bytes long")
    assert len(error_lines(out)) == 1 and max(len(l) for l in out.splitlines()) < 400, out
    assert not os.path.exists(server.path("apps", "hardbig"))
    # just under the limit: built (uv and the Python tools never see it) and served
    server.commit(repo, "60 KiB", {"ENV": "BIG=" + "y" * 60000 + "\n"})
    r = server.push(repo, "hardbig")
    assert r.returncode == 0, r.stdout + server.logs()
    assert web_env(server, "hardbig")["BIG"] == "y" * 60000


def test_config_set_of_a_value_over_64_kib_is_refused(server, webapp):
    before = server.read("envs/hardweb/ENV")
    r = server.ssh("config:set", "hardweb", "BIG=" + "z" * 70000)
    assert r.returncode != 0 and "config:set: BIG is 70000 bytes long" in r.stderr, r.stderr[:500]
    assert len(r.stderr) < 400 and "Traceback" not in r.stderr
    assert server.read("envs/hardweb/ENV") == before


def test_repo_env_home_never_reaches_the_build(server, tmp_path):
    """Docs say HOME is computed: a repo ENV HOME was the build tools' home, so pip read the
    pip.conf found there (here: one that makes it write a report file)."""
    fake_home = os.path.join(server.base, "fake-home")
    report = os.path.join(server.base, "report-from-fake-home.json")
    os.makedirs(os.path.join(fake_home, ".config", "pip"))
    piku_file(server, "fake-home/.config/pip/pip.conf", f"[install]\nreport = {report}\n")
    for d in ("fake-home", "fake-home/.config", "fake-home/.config/pip"):
        server.chown(os.path.join(server.base, d))
    files = {**WEB, "requirements.txt": "", "ENV": f"HOME={fake_home}\nUSER=intruder\nPIKU_USE_UV=false\n"}
    repo = server.make_app(None, tmp_path / "hardhome", files)
    r = server.push(repo, "hardhome")
    assert r.returncode == 0, r.stdout + server.logs()
    assert "Installing requirements with pip" in r.stdout, r.stdout
    assert not os.path.exists(report)
    env = web_env(server, "hardhome")
    assert env["HOME"] == server.home and env["USER"] != "intruder"


# --- item 6: uwsgi packet variables ----------------------------------------------------------

SEND_PACKETS = r'''
import json, socket, struct, sys
def packet(pairs):
    body = b"".join(struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v
                    for k, v in ((k.encode(), v.encode()) for k, v in pairs))
    return struct.pack("<BHB", 0, len(body), 0) + body  # modifier1, size, modifier2
base = [("REQUEST_METHOD", "GET"), ("PATH_INFO", "/"), ("QUERY_STRING", ""), ("SERVER_NAME", "x"),
        ("SERVER_PORT", "80"), ("SERVER_PROTOCOL", "HTTP/1.1")]
out = []
for extra in json.loads(sys.argv[2]):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(sys.argv[1])
    s.sendall(packet(base + [tuple(p) for p in extra]))
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        data += b"<timeout>"
    out.append(data.decode("utf-8", "replace"))
print(json.dumps(out))
'''


def dynamic_app_packets(tmp_path):
    """uwsgi packet variables that make a uWSGI worker load another app, each pointing at code
    another local user wrote (it would create a marker file as the piku user)."""
    d = tmp_path / "evil"
    d.mkdir()
    marker = d / "ran"
    (d / "evilapp.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                  "def application(e, s):\n    s('200 OK', [])\n    return [b'evil']\n")
    for p in (tmp_path, d):
        os.chmod(p, 0o777)  # (the marker: writable by the piku user, as if it were an attacker's)
    os.chmod(d / "evilapp.py", 0o644)
    packets = [[["SCRIPT_NAME", "/x"], ["UWSGI_FILE", str(d / "evilapp.py")]],
               [["UWSGI_APPID", "other"], ["UWSGI_SCRIPT", "evilapp"], ["UWSGI_CHDIR", str(d)]],
               [["SCRIPT_NAME", "/y"], ["UWSGI_MODULE", "evilapp"], ["UWSGI_CALLABLE", "application"],
                ["UWSGI_PYHOME", str(d)], ["UWSGI_CHDIR", str(d)]],
               [["SCRIPT_NAME", "/z"], ["UWSGI_FILE", f"exec://touch {marker}"]],
               []]
    return packets, marker


def send_as_piku(server, sock, packets):
    from harness import SYSTEM_PY
    r = server.as_user([SYSTEM_PY, "-c", SEND_PACKETS, sock, json.dumps(packets)], timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("mode", ["native", "pyuwsgi"])
def test_a_uwsgi_packet_cannot_load_another_app(server, tmp_path, mode):
    """Whoever reaches an app's uwsgi socket could send UWSGI_FILE / UWSGI_SCRIPT /
    UWSGI_MODULE and make the worker import and run their code as the piku user (or hang it
    with exec://). Workers load no app but the app's own; the app keeps answering."""
    from harness import Reachable, find_other_python, system_uwsgi_python
    app = f"hardpkt-{mode}"
    env = server.nginx_env(f"{app}.piku.test")
    if mode == "pyuwsgi":
        bindir, minor = find_other_python(system_uwsgi_python())
        env += f"PATH={bindir}:/usr/local/bin:/usr/bin:/bin\nPYTHON_VERSION={minor}\n"
    packets, marker = dynamic_app_packets(tmp_path)
    with Reachable(bindir) if mode == "pyuwsgi" else Reachable("/"):
        server.deployed("uv-wsgi", app, tmp_path, {"ENV": env})
        assert ("--uwsgi" in server.vassal_text(app, "wsgi")) == (mode == "pyuwsgi")
        slot = server.vassal(app, "wsgi").rsplit(".", 2)[1]
        answers = send_as_piku(server, server.path("nginx", f"{app}.1.{slot}.sock"), packets)
        assert all("uv-wsgi v1" in a for a in answers), answers
        assert not any("evil" in a for a in answers)
        assert not marker.exists()
        assert "uv-wsgi v1" in server.wait_http(server.nginx_port, host=f"{app}.piku.test")[1]
        assert "cannot load more than 1 apps" in server.read(f"logs/{app}/wsgi.1.log")


# --- item 10: smaller ------------------------------------------------------------------------

def app_processes(server, app):
    """pids of the piku user's processes that belong to app: by uWSGI title, or working in
    one of its release directories (also once they are deleted)."""
    releases = server.path("releases", app)
    out = []
    for pid in os.listdir("/proc"):
        try:
            if not pid.isdigit() or os.stat(f"/proc/{pid}").st_uid != server.uid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode("utf-8", "replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if title.startswith(f"{app}:") or cwd.startswith(releases + "/"):
            out.append(pid)
    return out


def test_destroy_returns_once_the_apps_processes_have_stopped(server, tmp_path):
    files = {**WEB, "Procfile": WEB["Procfile"] + "worker: python3 -c 'import time; time.sleep(600)'\n"}
    server.deployed(None, "hardgone", tmp_path, files)
    port = server.app_port("hardgone")
    server.wait_http(port)
    assert app_processes(server, "hardgone")
    r = server.ssh("destroy", "hardgone", "--confirm", "hardgone")
    assert r.returncode == 0, r.stderr
    assert app_processes(server, "hardgone") == []
    assert server.http_get(port)[0] is None


def test_data_and_log_directories_are_not_readable_by_other_users(server, webapp):
    for d in (server.path("data", "hardweb"), server.path("logs", "hardweb")):
        os.chmod(d, 0o755)  # (as earlier versions made them)
    server.commit(webapp, "redeploy")
    r = server.push(webapp, "hardweb")
    assert r.returncode == 0, r.stdout
    for d in (server.path("data", "hardweb"), server.path("logs", "hardweb")):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o750, d
    import subprocess
    for d in ("data", "logs"):  # another local user (nobody)
        r = subprocess.run(["ls", server.path(d, "hardweb")], user=65534, group=65534, extra_groups=[],
                           cwd="/", capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (r.stdout, r.stderr)


def test_a_procfile_with_too_many_kinds_is_refused(server, tmp_path):
    procfile = "".join(f"w{i}: sleep 600\n" for i in range(500))
    repo = server.make_app(None, tmp_path / "hardkinds", {"Procfile": procfile})
    out = rejected(server.push(repo, "hardkinds"), "Procfile line 51: more than 50 process kinds")
    assert len(error_lines(out)) == 1, out
    assert not [n for n in os.listdir(server.path("uwsgi-enabled")) if n.startswith("hardkinds_")]


# --- repository content beyond the list ------------------------------------------------------

def test_static_root_is_the_apps_directory_never_the_servers(server, tmp_path):
    files = {"Procfile": "static: /\n", "index.html": "<h1>mine</h1>\n",
             "ENV": server.nginx_env("hardstatic.piku.test")}
    repo = server.deployed(None, "hardstatic", tmp_path, files)
    assert "mine" in server.wait_http(server.nginx_port, "/index.html", host="hardstatic.piku.test")[1]
    status, body = server.http_get(server.nginx_port, "/etc/passwd", host="hardstatic.piku.test")
    assert status == 404 and "root:" not in body, (status, body[:200])
    os.symlink("/etc", repo / "public")
    server.commit(repo, "static dir -> /etc", {"Procfile": "static: public\n"})
    out = rejected(server.push(repo, "hardstatic"), "public leads outside the repository")
    assert len(error_lines(out)) == 1, out
