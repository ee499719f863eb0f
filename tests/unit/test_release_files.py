"""Golden files: what a switch writes for a few typical targets (render_release_files is pure).
The expected files are under tests/unit/golden/<case>/, readable in the repository; after an
intended change, regenerate them with PIKU_UPDATE_GOLDEN=1 and read the diff."""
import os
import sys

import pytest

import piku

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
PATHS = piku.paths_for("/srv/piku")


def target(case):
    settings, workers, scaling, mode = {}, {}, {}, None
    if case == "wsgi-nginx":
        settings = {"NGINX_SERVER_NAME": "demo.example.com", "UWSGI_PROCESSES": "2"}
        workers, scaling, mode = {"wsgi": "app:application", "release": "python manage.py migrate"}, {"wsgi": 1}, "native"
    elif case == "wsgi-port-pyuwsgi":
        settings = {"PYTHON_VERSION": "3.13"}
        workers, scaling, mode = {"wsgi": "app:application"}, {"wsgi": 1}, "pyuwsgi"
    elif case == "web-nginx-2-worker-cron":
        settings = {"NGINX_SERVER_NAME": "shop.example.com,www.shop.example.com", "NGINX_HTTPS_ONLY": "true"}
        workers = {"web": "gunicorn -b $BIND_ADDRESS:$PORT app:app", "worker": "python worker.py",
                   "cron1": "*/5 * * * * python tasks.py"}
        scaling = {"web": 2, "worker": 1, "cron1": 1}
    release = piku.Release(**dict.fromkeys(piku.Release._fields))._replace(
        id="20261130-120000-abcdef0123", dir="/srv/piku/releases/demo/20261130-120000-abcdef0123",
        venv="/srv/piku/venvs/demo/0123456789abcdef", python="3.13.0" if mode == "pyuwsgi" else "3.11.2",
        rev="abcdef0123456789", ref="main")
    names = piku.split_names(settings.get("NGINX_SERVER_NAME", ""))
    env = {**settings, "APP": "demo", "DATA_ROOT": "/srv/piku/data/demo", "PORT": "5000",
           "VIRTUAL_ENV": release.venv, "PATH": release.venv + "/bin:/usr/bin:/bin", "PIKU_APP_DIR": release.dir}
    front = {"nginx": {"version": [1, 22, 1], "http2": True, "ssl": True}, "include_directives": set(),
             "maintenance": None, "logs": "/srv/piku/logs/demo", "htpasswd": None} if names else {}
    return piku.Target(PATHS, "demo", piku.OPERATIONS["deploy"], release, workers, settings, scaling,
                       {"release": "20261129-000000-0000000000", "slot": "a"}, "b" if names or mode else None,
                       set(scaling), {"port": 5000, "web": {"a": [5101, 5102], "b": [5201, 5202]}}, env, mode,
                       "python3" if mode == "native" else None, [], names, bool(names), "r1 deploy 0", front,
                       "0a1b2c" if names or mode else None, "web" in scaling)


def normalise(text):
    return text.replace(sys.executable, "PYTHON").replace(os.path.abspath(piku.__file__), "PIKU_PY")


def golden_path(case, path):
    return os.path.join(GOLDEN, case, os.path.relpath(path, PATHS.root))


@pytest.mark.parametrize("case", ["wsgi-nginx", "wsgi-port-pyuwsgi", "web-nginx-2-worker-cron"])
def test_release_files_match_the_golden_files(case):
    files = piku.render_release_files(target(case))
    got = {golden_path(case, p): normalise(text) for p, (text, mode) in files.items()}
    if os.environ.get("PIKU_UPDATE_GOLDEN"):
        for path, text in got.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    want = {}
    for d, _, names in os.walk(os.path.join(GOLDEN, case)):
        for n in names:
            with open(os.path.join(d, n)) as f:
                want[os.path.join(d, n)] = f.read()
    assert sorted(got) == sorted(want)
    for path in want:
        assert got[path] == want[path], path


def test_release_files_modes_and_slots():
    files = piku.render_release_files(target("wsgi-nginx"))
    modes = {os.path.relpath(p, PATHS.root): mode for p, (_, mode) in files.items()}
    assert modes["envs/demo/LIVE_ENV"] == 0o600 and modes["nginx/demo.conf"] == 0o644
    assert [p for p in modes if p.startswith("state/demo/boot/")] and all(
        modes[p] == 0o600 for p in modes if p.startswith(("state/demo/env/", "state/demo/boot/")))
    conf = files[os.path.join(PATHS.nginx, "demo.conf")][0]
    # nginx connects through the link to the live slot's socket; either slot's socket is a backup
    assert "server unix:/srv/piku/nginx/demo.1.live.sock max_fails=0;" in conf
    assert "server unix:/srv/piku/nginx/demo.1.a.sock backup max_fails=0;" in conf
    assert "server unix:/srv/piku/nginx/demo.1.b.sock backup max_fails=0;" in conf
    # the same conf whichever slot goes live: a wsgi switch needs no nginx reload
    other = piku.render_release_files(target("wsgi-nginx")._replace(slot="a"))
    assert other[os.path.join(PATHS.nginx, "demo.conf")][0] == conf
    # web: through each instance's router, like wsgi: the link to the live slot's, both slots' as
    # backups, with proxy_pass (HTTP), the same conf for either slot
    web_files = piku.render_release_files(target("web-nginx-2-worker-cron"))
    web = web_files[os.path.join(PATHS.nginx, "demo.conf")][0]
    for n in (1, 2):
        assert f"server unix:/srv/piku/nginx/demo.web{n}.live.sock max_fails=0;" in web
        assert f"server unix:/srv/piku/nginx/demo.web{n}.a.sock backup max_fails=0;" in web
    assert "proxy_pass http://piku-demo;" in web and "uwsgi_pass" not in web and "127.0.0.1:5" not in web
    other = piku.render_release_files(target("web-nginx-2-worker-cron")._replace(slot="a"))
    assert other[os.path.join(PATHS.nginx, "demo.conf")][0] == web
    vassal = web_files[os.path.join(PATHS.uwsgi_enabled, "demo_web.2.0a1b2c.b.ini")][0]
    assert "plugin = rawrouter\nrawrouter = /srv/piku/nginx/demo.web2.b.sock\n" in vassal
    assert "rawrouter-to = 127.0.0.1:5202\n" in vassal and "chmod-socket = 660\n" in vassal
    # PIKU_WEB_ROUTER=false (or no rawrouter plugin): the ports of the slot going live, the other
    # slot's as backups (a reload per switch), and no router
    plain = piku.render_release_files(target("web-nginx-2-worker-cron")._replace(router=False))
    web = plain[os.path.join(PATHS.nginx, "demo.conf")][0]
    assert "server 127.0.0.1:5201 max_fails=0;" in web and "server 127.0.0.1:5101 backup max_fails=0;" in web
    assert "rawrouter" not in plain[os.path.join(PATHS.uwsgi_enabled, "demo_web.2.0a1b2c.b.ini")][0]
    # for the original piku (`downgrade`), which keeps no links: the sockets themselves
    direct = piku.render_release_files(target("wsgi-nginx"), links=False)[os.path.join(PATHS.nginx, "demo.conf")][0]
    assert "live.sock" not in direct and "server unix:/srv/piku/nginx/demo.1.b.sock max_fails=0;" in direct
    vassal = files[os.path.join(PATHS.uwsgi_enabled, "demo_wsgi.1.0a1b2c.b.ini")][0]
    assert "http-socket" not in vassal and "socket = /srv/piku/nginx/demo.1.b.sock" in vassal

