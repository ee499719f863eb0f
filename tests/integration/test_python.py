"""Issue 3: uv and Python environments: locks, change detection, versions, the uWSGI trap."""
import os
import subprocess

import pytest

from harness import Reachable, find_other_python, system_uwsgi_python

SYSTEM_MINOR = None


@pytest.fixture(scope="module")
def other(server):
    """(bin dir, 'X.Y') of a Python the system uWSGI cannot load, reachable by the piku user."""
    global SYSTEM_MINOR
    SYSTEM_MINOR = system_uwsgi_python()
    bindir, minor = find_other_python(SYSTEM_MINOR)
    with Reachable(bindir):
        yield bindir, minor


def env_file(bindir, **settings):
    lines = [f"PATH={bindir}:/usr/local/bin:/usr/bin:/bin"] + [f"{k}={v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def venv_state(server, app):
    """mtimes of the live venv's files (envs/<app> links to it), piku's own files left out."""
    out = {}
    for d, dirs, files in os.walk(os.path.realpath(server.path("envs", app, ".live"))):
        for n in files:
            if n not in ("ENV", "LIVE_ENV", "SCALING"):
                p = os.path.join(d, n)
                out[p] = os.lstat(p).st_mtime_ns
    return out


def push_ok(server, repo, app):
    r = server.push(repo, app)
    assert r.returncode == 0, r.stdout + server.logs()
    return r.stdout


def test_no_version_asked_prints_none_and_serves_native(server, tmp_path):
    repo = server.make_app("uv-wsgi", tmp_path / "pynone")
    out = push_ok(server, repo, "pynone")
    assert "Using Python" not in out and "pyuwsgi" not in out
    _, body = server.wait_http(server.app_port("pynone"), contains="uv-wsgi v1")
    assert f"python={system_uwsgi_python()}" in body
    assert "plugin = python3" in server.vassal_text("pynone", "wsgi")


def test_version_from_env_other_python_served_by_pyuwsgi(server, other, tmp_path):
    bindir, minor = other
    repo = server.make_app("uv-wsgi", tmp_path / "pyenvv", {"ENV": env_file(bindir, PYTHON_VERSION=minor)})
    out = push_ok(server, repo, "pyenvv")
    assert f"-----> Using Python {minor} (from ENV)" in out
    assert "pyuwsgi" in out
    _, body = server.wait_http(server.app_port("pyenvv"), contains="uv-wsgi v1")
    assert f"python={minor}" in body and "markupsafe=" in body  # venv-only package on the other Python


def test_python_version_file_and_env_priority(server, other, tmp_path):
    bindir, minor = other
    system = system_uwsgi_python()
    repo = server.make_app("uv-wsgi", tmp_path / "pyfile", {".python-version": f"{minor}\n",
                                                            "ENV": env_file(bindir)})
    out = push_ok(server, repo, "pyfile")
    assert f"-----> Using Python {minor} (from .python-version)" in out
    server.wait_http(server.app_port("pyfile"), contains=f"python={minor}")
    # PYTHON_VERSION beats .python-version; the change recreates the venv by itself.
    server.commit(repo, "env wins", {"ENV": env_file(bindir, PYTHON_VERSION=system)})
    out = push_ok(server, repo, "pyfile")
    assert f"-----> Using Python {system} (from ENV)" in out
    assert f"Building a virtualenv with Python {system}" in out
    server.wait_http(server.app_port("pyfile"), contains=f"python={system}")
    assert "plugin = python3" in server.vassal_text("pyfile", "wsgi")


def test_version_change_by_config_set_keeps_config(server, other, tmp_path):
    bindir, minor = other
    system = system_uwsgi_python()
    repo = server.make_app("uv-wsgi", tmp_path / "pyswitch", {"ENV": env_file(bindir, PYTHON_VERSION=system)})
    push_ok(server, repo, "pyswitch")
    server.wait_http(server.app_port("pyswitch"), contains=f"python={system}")
    # The repo has no uv.lock: the server's lock (here one pinning an older markupsafe) is what
    # the rebuilt virtualenv must follow.
    import shutil
    shutil.copytree(repo, tmp_path / "pinned")
    make_lock(tmp_path / "pinned", "markupsafe==2.1.5")
    with open(server.path("apps", "pyswitch", "uv.lock"), "w") as f:  # the lock the live release has
        f.write(open(tmp_path / "pinned" / "uv.lock").read())
    r = server.ssh("config:set", "pyswitch", f"PYTHON_VERSION={minor}", "KEEP=me")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Building a virtualenv with Python {minor}" in r.stdout and "+ markupsafe==2.1.5" in r.stdout, r.stdout
    server.wait_http(server.app_port("pyswitch"), contains=f"python={minor}")
    assert "KEEP=me" in server.read("envs/pyswitch/ENV")


def test_uwsgi_trap_refused_when_pyuwsgi_disabled(server, other, tmp_path):
    bindir, minor = other
    repo = server.make_app("uv-wsgi", tmp_path / "pynever",
                           {"ENV": env_file(bindir, PYTHON_VERSION=minor, PIKU_PYUWSGI="never")})
    r = server.push(repo, "pynever")
    assert r.returncode != 0
    assert f"PYTHON_VERSION={system_uwsgi_python()}" in r.stdout and "gunicorn" in r.stdout
    assert not server.vassal("pynever", "wsgi")


@pytest.mark.parametrize("value", ["banana", "3.x", "2.7"])
def test_garbage_python_version_is_a_clear_error(server, tmp_path, value):
    repo = server.make_app("uv-wsgi", tmp_path / "pybad", {"ENV": f"PYTHON_VERSION={value}\n"})
    r = server.push(repo, "pybad")
    assert r.returncode != 0 and ("Python version" in r.stdout or "PYTHON_VERSION" in r.stdout), r.stdout
    assert "Traceback" not in r.stdout


def test_missing_interpreter_gives_three_fixes(server, tmp_path):
    repo = server.make_app("uv-wsgi", tmp_path / "pymissing", {"ENV": "PYTHON_VERSION=3.99\n"})
    r = server.push(repo, "pymissing")
    assert r.returncode != 0
    assert "No interpreter found for Python 3.99" in r.stdout
    assert "uv python install 3.99" in r.stdout and "PYTHON_VERSION" in r.stdout and "managed" in r.stdout


def test_requires_python_nothing_satisfies_names_it(server, tmp_path):
    pyproject = open(os.path.join(os.path.dirname(__file__), "..", "apps", "uv-wsgi", "pyproject.toml")).read()
    repo = server.make_app("uv-wsgi", tmp_path / "toonew",
                           {"pyproject.toml": pyproject.replace('">=3.9"', '">=3.99"')})
    r = server.push(repo, "toonew")
    assert r.returncode != 0, r.stdout
    assert 'No installed Python satisfies requires-python = ">=3.99" of pyproject.toml' in r.stdout, r.stdout


def make_lock(repo, pin=None):
    env = dict(os.environ, UV_SYSTEM_CERTS="1")
    subprocess.run(["uv", "lock", "-q"], cwd=repo, env=env, check=True)
    if pin:
        subprocess.run(["uv", "lock", "-q", "--upgrade-package", pin], cwd=repo, env=env, check=True)


def test_committed_lock_is_honoured_and_stale_lock_rejected(server, tmp_path):
    repo = tmp_path / "locked"
    server.make_app("uv-wsgi", repo)
    make_lock(repo, "markupsafe==2.1.5")  # older than what a fresh resolve picks
    server.commit(repo, "lock", {})
    out = push_ok(server, repo, "locked")
    assert "(uv.lock)" in out and "+ markupsafe==2.1.5" in out
    server.wait_http(server.app_port("locked"), contains="markupsafe=2.1.5")
    lock_before = open(repo / "uv.lock").read()
    # pyproject changes without `uv lock`: the push is refused with the fix; nothing changes.
    old = server.rev(repo)
    text = open(repo / "pyproject.toml").read().replace('"markupsafe"', '"markupsafe", "six"')
    server.commit(repo, "stale", {"pyproject.toml": text})
    r = server.push(repo, "locked")
    assert r.returncode != 0 and "uv lock" in r.stdout and "commit" in r.stdout, r.stdout
    assert server.remote_rev("locked") == old
    server.wait_http(server.app_port("locked"), contains="markupsafe=2.1.5")
    assert open(repo / "uv.lock").read() == lock_before


def test_uv_setting_that_invalidates_a_committed_lock_is_undone_and_named(server, tmp_path):
    repo = tmp_path / "lockset"
    server.make_app("uv-wsgi", repo)
    make_lock(repo)
    server.commit(repo, "lock", {})
    push_ok(server, repo, "lockset")
    before = server.read("envs/lockset/ENV")
    r = server.ssh("config:set", "lockset", "UV_EXCLUDE_NEWER=2024-01-01T00:00:00Z")
    assert r.returncode != 0, r.stdout
    assert "uv.lock does not match pyproject.toml with this app's uv settings (UV_EXCLUDE_NEWER)" in r.stderr, \
        r.stdout + r.stderr
    assert server.read("envs/lockset/ENV") == before
    server.wait_http(server.app_port("lockset"), contains="uv-wsgi v1")


def test_no_lock_keeps_server_lock_and_skips_unchanged_sync(server, tmp_path):
    repo = server.make_app("uv-wsgi", tmp_path / "nolock")
    out = push_ok(server, repo, "nolock")
    assert "commit one" in out
    assert "markupsafe" in server.read("apps/nolock/uv.lock")
    before = venv_state(server, "nolock")
    server.commit(repo, "touch code", {"app.py": open(repo / "app.py").read().replace("v1", "v2")})
    out = push_ok(server, repo, "nolock")
    assert "-----> Dependencies unchanged: using the live virtualenv" in out and "Syncing" not in out
    assert venv_state(server, "nolock") == before
    server.wait_http(server.app_port("nolock"), contains="uv-wsgi v2")


def test_added_and_removed_dependency(server, tmp_path):
    repo = server.make_app("uv-wsgi", tmp_path / "deps")
    push_ok(server, repo, "deps")
    base = open(repo / "pyproject.toml").read()
    server.commit(repo, "add six", {"pyproject.toml": base.replace('"markupsafe"', '"markupsafe", "six"')})
    out = push_ok(server, repo, "deps")
    assert "+ six==" in out
    assert server.ssh("run", "deps", "python", "-c", "'import six'").returncode == 0
    server.commit(repo, "drop six", {"pyproject.toml": base})
    out = push_ok(server, repo, "deps")
    assert "- six==" in out
    assert server.ssh("run", "deps", "python", "-c", "'import six'").returncode != 0


def test_broken_venv_is_repaired(server, tmp_path):
    repo = server.make_app("uv-wsgi", tmp_path / "broken")
    push_ok(server, repo, "broken")
    os.unlink(server.path("envs", "broken", "bin", "python"))
    server.commit(repo, "redeploy")
    out = push_ok(server, repo, "broken")
    assert "the live virtualenv is broken" in out and "Building a virtualenv" in out
    server.wait_http(server.app_port("broken"), contains="uv-wsgi v1")


@pytest.mark.parametrize("use_uv", ["true", "false"])
def test_requirements_app_with_uv_and_with_virtualenv(server, tmp_path, use_uv):
    app = f"req{'uv' if use_uv == 'true' else 'pip'}"
    repo = server.make_app("req-web", tmp_path / app, {"ENV": f"PIKU_USE_UV={use_uv}\n"})
    out = push_ok(server, repo, app)
    assert ("with uv" in out) == (use_uv == "true") and ("with pip" in out) == (use_uv == "false")
    server.wait_http(server.app_port(app), contains="req-web v1")
    server.commit(repo, "again")
    assert "Dependencies unchanged: using the live virtualenv" in push_ok(server, repo, app)


def test_hand_pinned_requirements_get_their_dependencies(server, tmp_path):
    """A requirements.txt that pins only what the app imports (gunicorn needs packaging) gets
    the dependencies too; a package dropped from the file leaves the virtualenv."""
    repo = server.make_app("req-web", tmp_path / "pinned",
                           {"requirements.txt": "gunicorn==23.0.0\nsix==1.16.0\n"})
    out = push_ok(server, repo, "pinned")
    assert "exact sync, fully pinned" in out and "without their dependencies (packaging)" in out, out
    server.wait_http(server.app_port("pinned"), contains="req-web v1")
    check = "'import packaging, six, gunicorn; print(gunicorn.__version__)'"
    assert server.ssh("run", "pinned", "python", "-c", check).stdout.strip() == "23.0.0"
    server.commit(repo, "drop six", {"requirements.txt": "gunicorn==23.0.0\n"})
    out = push_ok(server, repo, "pinned")
    assert "- six==1.16.0" in out, out
    assert server.ssh("run", "pinned", "python", "-c", "'import six'").returncode != 0
    assert server.ssh("run", "pinned", "python", "-c", "'import packaging'").returncode == 0
    # a complete lock (as pip freeze writes it) is installed as it is, nothing resolved
    server.commit(repo, "frozen", {"requirements.txt": "gunicorn==23.0.0\npackaging==24.1\n"})
    out = push_ok(server, repo, "pinned")
    assert "exact sync, fully pinned" in out and "without their dependencies" not in out, out
    assert "packaging==24.1" in out, out


def test_switching_from_uv_to_pip_recreates_the_venv(server, tmp_path):
    repo = server.make_app("req-web", tmp_path / "touv")
    assert "with uv" in push_ok(server, repo, "touv")
    server.commit(repo, "pip now", {"ENV": "PIKU_USE_UV=false\n"})
    out = push_ok(server, repo, "touv")
    assert "Building a virtualenv" in out and "with pip" in out, out
    assert server.ssh("run", "touv", "python", "-m", "pip", "--version").returncode == 0
    server.wait_http(server.app_port("touv"), contains="req-web v1")


def local_lib(name, version):
    return {f"libs/{name}/pyproject.toml": (
                f'[project]\nname = "{name}"\nversion = "1.0"\n[build-system]\n'
                'requires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
                f'[tool.setuptools]\npy-modules = ["{name}"]\n'),
            f"libs/{name}/{name}.py": f"V = {version!r}\n"}


@pytest.mark.parametrize("committed_lock", [True, False])
def test_local_path_dependencies_follow_the_repo(server, tmp_path, committed_lock):
    """Libraries kept in the repo ([tool.uv.sources] path, one of them editable): a change to
    their code re-syncs them even though pyproject.toml and uv.lock did not change, and the
    venv never points into a release directory (those are pruned)."""
    app = "monolock" if committed_lock else "mononolock"
    files = {"pyproject.toml": ('[project]\nname = "mono"\nversion = "0.1.0"\nrequires-python = ">=3.9"\n'
                                'dependencies = ["mylib", "edlib"]\n[tool.uv.sources]\n'
                                'mylib = { path = "libs/mylib" }\n'
                                'edlib = { path = "libs/edlib", editable = true }\n'),
             "app.py": ("import edlib, mylib\n"
                        "def application(environ, start_response):\n"
                        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
                        "    return [f'mylib={mylib.V} edlib={edlib.V}'.encode()]\n"),
             "Procfile": "wsgi: app:application\n", "ENV": "PIKU_RELEASES_KEPT=1\n",
             **local_lib("mylib", "1"), **local_lib("edlib", "1")}
    repo = server.make_app(None, tmp_path / app, files)
    if committed_lock:
        subprocess.run(["uv", "lock", "--quiet"], cwd=repo, check=True, env={**os.environ, "UV_SYSTEM_CERTS": "1"})
        server.commit(repo, "lock")
    push_ok(server, repo, app)
    server.wait_http(server.app_port(app), contains="mylib=1 edlib=1")
    server.commit(repo, "libs v2", {**local_lib("mylib", "2"), **local_lib("edlib", "2")})
    out = push_ok(server, repo, app)
    assert "Dependencies unchanged" not in out, out
    server.wait_http(server.app_port(app), contains="mylib=2 edlib=2")
    server.commit(repo, "nothing")
    assert "Dependencies unchanged" in push_ok(server, repo, app)  # the release that built the libs is pruned now
    assert server.ssh("restart", app).returncode == 0
    server.wait_http(server.app_port(app), contains="mylib=2 edlib=2")
    links = subprocess.run(["grep", "-rl", "--include=*.pth", "releases/", server.path("envs", app, ".live/")],
                           capture_output=True, text=True).stdout
    assert links == "", links


def test_project_scripts_can_be_named_in_the_procfile(server, tmp_path):
    """The project is not installed, but its [project.scripts] exist in the venv (the original
    piku's `uv sync` installed them): a Procfile may run one; a dropped one disappears."""
    files = {"pyproject.toml": ('[project]\nname = "scr"\nversion = "0.1.0"\nrequires-python = ">=3.9"\n'
                                'dependencies = []\n[project.scripts]\nscr-web = "scr.web:main"\n'
                                'scr-old = "scr.web:main"\n'),
             "src/scr/__init__.py": "",
             "src/scr/web.py": ("import http.server, os\n"
                                "class H(http.server.BaseHTTPRequestHandler):\n"
                                "    def do_GET(self):\n"
                                "        self.send_response(200); self.end_headers(); self.wfile.write(b'scripted')\n"
                                "def main():\n"
                                "    http.server.HTTPServer((os.environ['BIND_ADDRESS'], int(os.environ['PORT'])), H)"
                                ".serve_forever()\n"),
             "Procfile": "web: scr-web\n"}
    repo = server.make_app(None, tmp_path / "scripted", files)
    out = push_ok(server, repo, "scripted")
    assert "script scr-web -> scr.web:main" in out, out
    server.wait_http(server.app_port("scripted"), contains="scripted")
    server.commit(repo, "drop one", {"pyproject.toml": files["pyproject.toml"].replace('scr-old = "scr.web:main"\n', "")})
    out = push_ok(server, repo, "scripted")
    assert not os.path.exists(server.path("envs", "scripted", "bin", "scr-old"))
    assert os.access(server.path("envs", "scripted", "bin", "scr-web"), os.X_OK)
    # a lost script comes back without a sync, and the next deploy still skips the sync
    os.unlink(server.path("envs", "scripted", "bin", "scr-web"))
    server.commit(repo, "again")
    out = push_ok(server, repo, "scripted")
    assert "Dependencies unchanged" in out and "script scr-web" in out, out
    server.commit(repo, "and again")
    out = push_ok(server, repo, "scripted")
    assert "Dependencies unchanged" in out and "script scr-web" not in out, out
    server.wait_http(server.app_port("scripted"), contains="scripted")


def test_dev_dependencies_are_not_installed(server, tmp_path):
    pyproject = open(os.path.join(os.path.dirname(__file__), "..", "apps", "uv-wsgi", "pyproject.toml")).read()
    repo = server.make_app("uv-wsgi", tmp_path / "devdeps",
                           {"pyproject.toml": pyproject + '\n[dependency-groups]\ndev = ["six"]\n'})
    out = push_ok(server, repo, "devdeps")
    assert "+ markupsafe==" in out and "six" not in out
    assert server.ssh("run", "devdeps", "python", "-c", "'import markupsafe'").returncode == 0
    assert server.ssh("run", "devdeps", "python", "-c", "'import six'").returncode != 0


def test_pyproject_app_without_uv_is_rejected_with_the_fix(server, tmp_path):
    repo = server.make_app("uv-wsgi", tmp_path / "nouv", {"ENV": "PIKU_USE_UV=false\n"})
    r = server.push(repo, "nouv")
    assert r.returncode != 0 and "PIKU_USE_UV=false" in r.stdout and "requirements.txt" in r.stdout, r.stdout
    assert server.remote_rev("nouv") is None and not os.path.exists(server.path("apps", "nouv"))


def test_pyuwsgi_redeploy_loses_no_request(server, other, tmp_path):
    """The venv's own uWSGI of the new release starts beside the live one (same port, SO_REUSEPORT),
    answers, and the old one shuts down gracefully: a redeploy loses no request."""
    from test_zero_downtime import Hammer
    bindir, minor = other
    repo = server.make_app("uv-wsgi", tmp_path / "pyzd", {"ENV": env_file(bindir, PYTHON_VERSION=minor)})
    push_ok(server, repo, "pyzd")
    port = server.app_port("pyzd")
    server.wait_http(port, contains="uv-wsgi v1")
    for version in ("v2", "v3"):
        text = open(repo / "app.py").read().replace("uv-wsgi v", "uv-wsgi v" + version[1] + "#")
        server.commit(repo, version, {"app.py": text})
        with Hammer(server, port=port) as h:
            push_ok(server, repo, "pyzd")
        assert not h.failures, f"{len(h.failures)} of {h.ok + len(h.failures)} failed: {h.failures[:5]}"
        assert h.ok > 50
        server.wait_http(port, contains=f"uv-wsgi v{version[1]}#")
    assert "graceful shutdown triggered" in server.read("logs/pyzd/wsgi.1.log")


def test_project_uv_settings_apply_beside_the_server_uv_toml(server, tmp_path):
    """The server's uv settings (~/.config/uv/uv.toml: system-certs here) and the project's own
    [tool.uv] settings both apply (a uv config file given as UV_CONFIG_FILE would hide the
    project's): the project's exclude-newer picks the last markupsafe of 2022."""
    pyproject = open(os.path.join(os.path.dirname(__file__), "..", "apps", "uv-wsgi", "pyproject.toml")).read()
    repo = server.make_app("uv-wsgi", tmp_path / "uvcfg", {
        "pyproject.toml": pyproject + '\n[tool.uv]\nexclude-newer = "2023-01-01T00:00:00Z"\n'})
    out = push_ok(server, repo, "uvcfg")
    assert "+ markupsafe==2.1.1" in out, out
    assert os.path.exists(os.path.join(server.home, ".config", "uv", "uv.toml"))


def test_src_layout_app(server, tmp_path):
    """Packages in src/ import in wsgi workers and in commands (the project is not installed)."""
    pyproject = open(os.path.join(os.path.dirname(__file__), "..", "apps", "uv-wsgi", "pyproject.toml")).read()
    files = {"pyproject.toml": pyproject, "Procfile": "wsgi: shop.web:application\n",
             "src/shop/__init__.py": "NAME = 'shop from src'\n",
             "src/shop/web.py": "import markupsafe\nfrom shop import NAME\n"
                                "def application(environ, start_response):\n"
                                "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
                                "    return [NAME.encode()]\n"}
    server.make_app(None, tmp_path / "srcapp", files)
    push_ok(server, tmp_path / "srcapp", "srcapp")
    server.wait_http(server.app_port("srcapp"), contains="shop from src")
    r = server.ssh("run", "srcapp", "python", "-c", "'import shop; print(shop.NAME)'")
    assert r.returncode == 0 and r.stdout.strip() == "shop from src", r.stdout + r.stderr
