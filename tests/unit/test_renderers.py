"""Unit tests for the pure renderers and planners of piku.py (sections 7 and 8)."""
import os

import pytest

import piku
from piku import PikuError

PATHS = piku.paths_for("/srv/piku")


def vassal(kind="wsgi", mode="native", settings=None, **kw):
    v = {"app": "demo", "kind": kind, "index": 1, "paths": PATHS, "settings": settings or {},
         "port": 5000, "piku": ["/usr/bin/python3", "/srv/piku.py"], "python_plugin": "python3",
         "mode": mode, "release": "r1", "socket": None}
    v.update(kw)
    return piku.render_vassal(v)


def test_wsgi_vassal_defaults():
    ini = vassal()
    assert "plugin = python3" in ini and "chdir = /srv/piku/apps/demo" in ini
    assert "http-socket = 127.0.0.1:5000" in ini and "logto = /srv/piku/logs/demo/wsgi.1.log" in ini
    assert "wsgi-file = /srv/piku/state/demo/wsgi_boot.py" in ini
    assert "threads = 4" in ini and "gevent" not in ini and "socket = " not in ini.replace("http-socket", "")
    # every worker enters the stable path before loading (issue 9: a master outlives releases)
    assert "hook-pre-app = chdir:/srv/piku/apps/demo" in ini
    assert "hook-pre-app = chdir:/srv/piku/apps/demo" in piku.render_inner_ini(
        {"app": "demo", "kind": "wsgi", "index": 1, "paths": PATHS, "settings": {}, "port": 5000})


@pytest.mark.parametrize("key,value,line", [
    ("UWSGI_PROCESSES", "3", "processes = 3"), ("UWSGI_THREADS", "8", "threads = 8"),
    ("UWSGI_MAX_REQUESTS", "10", "max-requests = 10"), ("UWSGI_LISTEN", "64", "listen = 64"),
    ("UWSGI_GEVENT", "true", "gevent = 100"), ("UWSGI_GEVENT", "250", "gevent = 250"), ("UWSGI_ASYNCIO", "50", "asyncio = 50"),
    ("UWSGI_LOG_X_FORWARDED_FOR", "true", "log-x-forwarded-for = true"),
    ("UWSGI_IDLE", "60", "idle = 60"), ("UWSGI_LOG_MAXSIZE", "99", "log-maxsize = 99"),
    ("BIND_ADDRESS", "0.0.0.0", "http-socket = 0.0.0.0:5000"),
    ("UWSGI_INCLUDE_FILE", "extra/uwsgi.ini", "ini = /srv/piku/apps/demo/extra/uwsgi.ini"),
    ("UWSGI_INCLUDE_FILE", "/etc/piku/u.ini", "ini = /etc/piku/u.ini")])
def test_wsgi_vassal_settings(key, value, line):
    assert line in vassal(settings={key: value})


def test_enable_threads_can_be_turned_off():
    assert "enable-threads" in vassal()
    assert "enable-threads" not in vassal(settings={"UWSGI_ENABLE_THREADS": "false"})


def test_wsgi_vassal_unix_socket_for_nginx():
    assert "socket = /srv/piku/nginx/demo.1.sock" in vassal(socket="/srv/piku/nginx/demo.1.sock")


def test_daemon_vassal_runs_exec_worker_not_the_command():
    ini = vassal(kind="web", mode="daemon")
    assert "attach-daemon2 = cmd=exec /usr/bin/python3 /srv/piku.py exec-worker demo web 1" in ini
    assert "plugin" not in ini and "wsgi-file" not in ini


def test_daemon_vassal_with_a_launch_file_starts_the_supervisor_straight_away():
    ini = vassal(kind="web", mode="daemon", launch="/srv/piku/state/demo/launch/0123456789abcdef")
    assert ("attach-daemon2 = cmd=exec /usr/bin/python3 -I -S /srv/piku/uwsgi/piku-supervise.py --launch "
            "/srv/piku/state/demo/launch/0123456789abcdef 5.0,stopsignal=15") in ini
    assert "exec-worker" not in ini


def test_the_supervisor_file_is_written_with_the_launcher(tmp_path):
    paths = piku.paths_for(str(tmp_path))
    os.makedirs(paths.uwsgi)
    piku.ensure_launcher(paths)
    with open(piku.supervisor_path(paths)) as f:
        assert f.read() == piku.SUPERVISOR
    assert "INHERITED_ENV" not in piku.SUPERVISOR and repr(piku.INHERITED_ENV) in piku.SUPERVISOR


def test_cron_vassal_checks_schedule_every_minute():
    ini = vassal(kind="cron1", mode="daemon")
    assert "cron = -1 -1 -1 -1 -1 /usr/bin/python3 /srv/piku.py exec-worker --if-due demo cron1 1" in ini
    # @reboot jobs: a hook at every start of the master, which must never fail
    assert ("hook-master-start = exec:/usr/bin/python3 /srv/piku.py exec-worker --at-start demo cron1 1 || true"
            in ini)
    assert "hook-master-start" not in vassal(kind="web", mode="daemon")


def test_pyuwsgi_vassal_runs_the_venv_uwsgi():
    ini = vassal(mode="pyuwsgi")
    assert "attach-daemon2 = cmd=exec /usr/bin/python3 /srv/piku.py exec-worker demo wsgi 1" in ini
    assert "plugin = " not in ini


@pytest.mark.parametrize("value", ["@(exec://id)", "$(HOME)", "%(x)", "%d", "a\nb = c"])
def test_ini_refuses_uwsgi_magic(value):
    with pytest.raises(PikuError):
        piku.render_ini([("chdir", value)])


def test_wsgi_boot_sets_env_without_interpretation():
    import ast
    env = {"SECRET": "@(exec://touch /tmp/x)", "Q": "a'b\"c\n$(id)"}
    src = piku.render_wsgi_boot("/v", "/a", "pkg.mod:app", env, "3.11")
    calls = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", "") == "update"]
    assert ast.literal_eval(calls[0].args[0]) == env
    assert "site.addsitedir('/v/lib/python3.11/site-packages')" in src
    assert "import_module('pkg.mod')" in src and "'app'" in src


def test_git_hook_and_authorized_key_quote_paths():
    hook = piku.render_git_hook("/usr/bin/python3", "/home/piku/piku.py", "/home/piku/.piku", "my.app")
    assert hook.startswith("#!/bin/sh") and "git-hook my.app" in hook
    assert "git-hook my.app" in hook and " piku /home/piku/piku.py git-hook" in hook
    line = piku.render_authorized_key("/usr/bin/python3", "/p/piku.py", "/r", "ssh-ed25519 AAAA c")
    assert line.startswith('command="PIKU_ROOT=/r /usr/bin/python3 -c \'import sys,')
    assert line.endswith("\' piku /p/piku.py\",no-agent-forwarding,no-user-rc,no-X11-forwarding,"
                         "no-port-forwarding ssh-ed25519 AAAA c\n")
    assert "no-user-rc" in line and "no-X11-forwarding" in line and "no-port-forwarding" in line
    with pytest.raises(PikuError):
        piku.render_authorized_key("/usr/bin/python3", '/p/"x/piku.py', "/r", "ssh-ed25519 AAAA")


def test_emperor_ini():
    ini = piku.render_emperor_ini(PATHS)
    assert "emperor = /srv/piku/uwsgi-enabled" in ini and "daemonize" not in ini


def nginx(settings=None, kinds=None, sockets=None, cert=False, backend=True, standby=None, **extra):
    s = {"NGINX_SERVER_NAME": "example.test"}
    s.update(settings or {})
    return piku.render_nginx({"app": "demo", "settings": s, "paths": PATHS,
                              "kinds": kinds if kinds is not None else {"web": "x"},
                              "sockets": sockets or [], "port": 5000, "app_dir": "/srv/piku/apps/demo",
                              "cert": cert, "has_backend": backend, "standby": standby, **extra})


def test_nginx_defaults_web():
    conf = nginx()
    assert "server_name example.test;" in conf and "listen 0.0.0.0:80;" in conf
    assert "listen [::]:80;" in conf and "server 127.0.0.1:5000 max_fails=0;" in conf
    assert "proxy_pass http://piku-demo;" in conf and "Upgrade $http_upgrade" in conf
    assert "\\.git" in conf and "ssl_certificate" not in conf


def test_nginx_web_standby_port_is_a_backup():
    assert "backup" not in nginx()
    conf = nginx(standby=5001)
    assert "  server 127.0.0.1:5000 max_fails=0;\n  server 127.0.0.1:5001 backup max_fails=0;\n}" in conf
    assert "5001" not in nginx(kinds={"wsgi": "a:b"}, sockets=["/s/demo.1.sock"], standby=5001)


@pytest.mark.parametrize("kind,settings,pinned,blue_green", [
    ("wsgi", {}, False, True),
    ("wsgi", {"NGINX_SERVER_NAME": "a.test"}, True, True),
    ("web", {"NGINX_SERVER_NAME": "a.test"}, False, True),
    ("web", {}, False, False),
    ("web", {"NGINX_SERVER_NAME": "a.test"}, True, False),
    ("web", {"NGINX_SERVER_NAME": "a.test", "PIKU_PREBOOT": "false"}, False, False),
    ("worker", {"NGINX_SERVER_NAME": "a.test"}, False, False),
    ("cron1", {}, False, False),
])
def test_plan_blue_green(kind, settings, pinned, blue_green):
    assert piku.plan_blue_green(kind, settings, pinned) is blue_green


def test_kinds_table_rows():
    assert piku.kind_name("cron7") == "cron" and piku.kind_name("queue") == "worker"
    assert piku.max_scale("web", False) == 1 and piku.max_scale("web", True) == 64
    assert piku.serving("wsgi") and piku.serving("web") and not piku.serving("worker")
    assert piku.parse_vassal_name("a_b", "a_b_web.2.b.ini") == ("web", 2, "b")
    assert piku.parse_vassal_name("a_b", "a_b_worker.1.ini") == ("worker", 1, None)
    assert piku.parse_vassal_name("a", "a_b_web.1.ini") == ("b_web", 1, None)
    assert piku.parse_vassal_name("a", "ab_web.1.ini") is None
    assert set(piku.plan_vassals("x", {"web": 2, "worker": 1}, "a", {"web"})) == \
        {"x_web.1.a.ini", "x_web.2.a.ini", "x_worker.1.ini"}


def test_slot_vassals_carry_a_generation_the_emperor_has_never_seen():
    """uWSGI's emperor delays the start of a vassal name that stopped before it served a request
    (a web daemon, a pyuwsgi wsgi) by one more second each time: each start gets a new name."""
    assert piku.vassal_name("x", "web", 2, "b", "0a1b2c") == "x_web.2.0a1b2c.b.ini"
    assert piku.vassal_name("x", "web", 2, "b") == "x_web.2.b.ini"  # (an older piku.py's)
    assert piku.vassal_name("x", "worker", 1, None, "0a1b2c") == "x_worker.1.ini"
    assert piku.parse_vassal_name("x", "x_web.2.0a1b2c.b.ini") == ("web", 2, "b")
    assert piku.parse_vassal_name("x", "x_web.2.0a1b2.b.ini") is None


def test_nginx_wsgi_uses_unix_sockets():
    conf = nginx(kinds={"wsgi": "app:app"}, sockets=["/srv/piku/nginx/demo.1.sock"])
    assert "server unix:/srv/piku/nginx/demo.1.sock max_fails=0;" in conf and "uwsgi_pass piku-demo;" in conf


def test_nginx_upstream_lists_both_slots_the_other_as_backup():
    conf = nginx(kinds={"wsgi": "app:app"}, sockets=["x"], upstream=[("unix:/n/demo.1.b.sock", False),
                                                                    ("unix:/n/demo.1.a.sock", True)])
    assert "  server unix:/n/demo.1.b.sock max_fails=0;\n  server unix:/n/demo.1.a.sock backup max_fails=0;\n}" in conf


def test_switch_probe_answers_only_its_token():
    conf = nginx(switch_token="abc123")
    assert "location = /.well-known/piku-switch/abc123 { return 204; }" in conf
    assert "location ^~ /.well-known/piku-switch/ { return 404; }" in conf
    assert "piku-switch" not in nginx()
    https_only = nginx({"NGINX_HTTPS_ONLY": "true"}, cert=True, switch_token="abc123")
    assert https_only.count("piku-switch/abc123") == 2  # the HTTP redirect block answers it too


@pytest.mark.parametrize("settings,added,removed", [
    ({"DISABLE_IPV6": "true"}, None, "listen [::]:80;"),
    ({"NGINX_HTTP_PORT": "8080"}, "listen 0.0.0.0:8080;", "listen 0.0.0.0:80;"),
    ({"NGINX_IPV4_ADDRESS": "10.0.0.5"}, "listen 10.0.0.5:80;", "listen 0.0.0.0:80;"),
    ({"NGINX_ALLOW_GIT_FOLDERS": "true"}, None, "\\.git"),
    ({"NGINX_SERVER_NAME": "a.test,b.test"}, "server_name a.test b.test;", "server_name example.test;"),
    ({"NGINX_STATIC_PATHS": "/static:public"}, "alias /srv/piku/apps/demo/public;", None),
    ({"NGINX_STATIC_PATHS": "/:public"}, "try_files $uri $uri.html $uri/ @piku;", "location / {\n    proxy_pass"),
    ({"NGINX_INCLUDE_FILE": "nginx.inc"}, "include /srv/piku/apps/demo/nginx.inc;", None),
    ({"NGINX_STATIC_PATHS": "/s/:public", "NGINX_CATCH_ALL": "index.html"}, "try_files $uri $uri.html $uri/ /index.html;",
     None),
    ({"NGINX_CLOUDFLARE_ACL": "true"}, "allow 173.245.48.0/20;", None),
    ({"NGINX_CACHE_PREFIXES": "/api"}, "proxy_cache demo;", None),
    ({"NGINX_CACHE_PREFIXES": "/api"}, 'set $piku_cache_control "public, max-age=3600"; }', None),
    ({"NGINX_CACHE_PREFIXES": "/api", "NGINX_CACHE_TIME": "60"}, "proxy_cache_valid 200 304 60s;", None),
    ({"NGINX_CACHE_PREFIXES": "/api", "NGINX_CACHE_REDIRECTS": "600"},
     "proxy_cache_valid 301 302 307 308 600s;", None),
    ({"NGINX_CACHE_PREFIXES": "/api", "NGINX_CACHE_TIME": "90", "NGINX_CACHE_REDIRECTS": "true"},
     "proxy_cache_valid 301 302 307 308 90s;", None),
    ({"NGINX_CACHE_PREFIXES": "/api", "NGINX_CACHE_ANY": "120"}, "proxy_cache_valid any 120s;", None),
])
def test_nginx_flags(settings, added, removed):
    default, conf = nginx(), nginx(settings)
    if added:
        assert added not in default and added in conf
    if removed:
        assert removed in default and removed not in conf


def test_nginx_https_and_https_only():
    conf = nginx(cert=True)
    assert "listen 0.0.0.0:443 ssl;" in conf and "ssl_certificate /srv/piku/nginx/demo.crt;" in conf
    only = nginx({"NGINX_HTTPS_ONLY": "true"}, cert=True)
    assert "return 301 https://$host$request_uri;" in only


@pytest.mark.parametrize("settings", [{"NGINX_STATIC_PATHS": "/x:/etc;evil"}, {"NGINX_INCLUDE_FILE": "a b"},
                                      {"NGINX_CATCH_ALL": "x; evil"}, {"NGINX_IPV4_ADDRESS": "1.2.3.4; x"},
                                      {"NGINX_STATIC_PATHS": "/x:../../etc"}])
def test_nginx_refuses_hostile_values(settings):
    with pytest.raises(PikuError):
        nginx(settings)


def test_validate_settings():
    piku.validate_settings({"PORT": "8000", "NGINX_SERVER_NAME": "a.test b.test", "PYTHON_VERSION": "3.12"})
    for bad in ({"PORT": "x"}, {"PORT": "70000"}, {"UWSGI_PROCESSES": "0"}, {"NGINX_SERVER_NAME": "a;b"},
                {"PYTHON_VERSION": "banana"}, {"PIKU_PYUWSGI": "sometimes"}, {"BIND_ADDRESS": "x y"},
                {"DISABLE_IPV6": "maybe"}):
        with pytest.raises(PikuError):
            piku.validate_settings(bad)


def test_plan_runtime_order():
    rt = piku.RUNTIMES
    assert piku.plan_runtime({"requirements.txt", "pyproject.toml"}, {"wsgi": "a:b"}, rt)[0] == "python-requirements"
    assert piku.plan_runtime({"pyproject.toml"}, {"wsgi": "a:b"}, rt)[0] == "python-uv"
    assert piku.plan_runtime({"Procfile"}, {"web": "x"}, rt)[0] == "generic"
    assert piku.plan_runtime({"Procfile"}, {"static": "public"}, rt)[0] == "static"
    with pytest.raises(PikuError):
        piku.plan_runtime({"Procfile"}, {"release": "x"}, rt)


def test_plan_scaling_and_vassal_names():
    workers = {"wsgi": "a:b", "worker": "x", "release": "y", "static": "s", "cron1": "* * * * * z"}
    assert piku.plan_scaling(workers, {"worker": 2}) == {"wsgi": 1, "worker": 2, "cron1": 1}
    assert set(piku.plan_vassals("a_b", {"web": 2})) == {"a_b_web.1.ini", "a_b_web.2.ini"}


def test_fingerprint_separates_its_parts():
    fp = piku.fingerprint("a", b"b", 3)
    assert fp == piku.fingerprint("a", b"b", 3) and fp != piku.fingerprint("ab", b"", 3)


def test_plan_wsgi_mode():
    assert piku.plan_wsgi_mode("auto", "3.11.2", "3.11") == ("native", None)
    mode, notice = piku.plan_wsgi_mode("auto", "3.12.1", "3.11")
    assert mode == "pyuwsgi" and "3.11" in notice and "3.12" in notice
    with pytest.raises(PikuError, match="PYTHON_VERSION=3.11"):
        piku.plan_wsgi_mode("never", "3.12.1", "3.11")
    assert piku.plan_wsgi_mode("always", "3.11.2", "3.11")[0] == "pyuwsgi"


def test_plan_push_deploys_one_branch():
    z = "0" * 40
    a, b = "a" * 40, "b" * 40
    main, dev = "refs/heads/main", "refs/heads/dev"
    assert piku.plan_push([(z, a, main)], None) == (a, main)
    assert piku.plan_push([(z, a, dev), (z, b, main)], None) == (b, main)
    assert piku.plan_push([(z, a, dev)], main) is None
    assert piku.plan_push([(z, a, "refs/tags/v1")], main) is None
    with pytest.raises(PikuError):
        piku.plan_push([(a, z, main)], main)
    with pytest.raises(PikuError):
        piku.plan_push([(z, a, dev), (z, b, "refs/heads/other")], None)


def test_vassal_ownership_is_exact():
    ini_pfx = vassal().replace("demo", "pfx")
    assert piku.vassal_belongs(ini_pfx, PATHS, "pfx")
    assert not piku.vassal_belongs(ini_pfx.replace("apps/pfx", "apps/pfx2"), PATHS, "pfx")


def test_dehydrated_config_is_shell_quoted():
    conf = piku.render_dehydrated_config("https://ca.test/dir", "/srv/b", "/srv/acme/x/.well-known/acme-challenge",
                                         "ops@example.org")
    assert "CA=https://ca.test/dir\n" in conf and "WELLKNOWN=/srv/acme/x/.well-known/acme-challenge\n" in conf
    assert "CONTACT_EMAIL=ops@example.org" in conf
    assert "CONTACT_EMAIL" not in piku.render_dehydrated_config("https://ca.test/dir", "/b", "/w", None)
    assert "BASEDIR='/srv/a b$(id)'" in piku.render_dehydrated_config("https://c.test/d", "/srv/a b$(id)", "/w", None)


def test_launcher_runs_main_from_the_file(tmp_path):
    """The forced command's launcher imports piku.py by path and exits with main()'s code."""
    import subprocess
    import sys
    fake = tmp_path / "piku.py"
    fake.write_text("import sys\ndef main():\n    print('args', sys.argv[1:])\n    return 3\n")
    r = subprocess.run(piku.launcher_argv(sys.executable, str(fake)) + ["apps", "x y"],
                       capture_output=True, text=True)
    assert r.returncode == 3 and r.stdout == "args ['apps', 'x y']\n"
    assert '"' not in piku.LAUNCHER and "'" not in piku.LAUNCHER and "\\" not in piku.LAUNCHER
    as_file = tmp_path / "launch.py"  # (what ensure_launcher writes: a line for each statement)
    as_file.write_text(piku.LAUNCHER.replace(";", "\n") + "\n")
    r = subprocess.run([sys.executable, str(as_file), "piku", str(fake), "exec-worker"], capture_output=True, text=True)
    assert r.returncode == 3 and r.stdout == "args ['exec-worker']\n"


def test_systemd_units():
    units = piku.render_systemd_units("/usr/bin/python3", "/home/piku/piku.py", PATHS, "piku")
    assert set(units) == {"piku-uwsgi.service", "piku-nginx.path", "piku-nginx.service",
                          "piku-certs.service", "piku-certs.timer"}
    assert 'ExecStart=/usr/bin/uwsgi --ini "/srv/piku/uwsgi/uwsgi.ini"' in units["piku-uwsgi.service"]
    assert "User=piku" in units["piku-uwsgi.service"] and "User=" not in units["piku-nginx.service"]
    assert "PathChanged=/srv/piku/nginx" in units["piku-nginx.path"]
    assert 'ExecStart="/usr/bin/python3" "/home/piku/piku.py" "certs:renew"' in units["piku-certs.service"]
    assert "OnCalendar=daily" in units["piku-certs.timer"]
    assert 'Environment="PIKU_ROOT=/srv/piku"' in units["piku-certs.service"]


@pytest.mark.parametrize("files,line", [
    ({}, "wsgi: app:application"),
    ({"app.py": "from flask import Flask\napp = Flask(__name__)\n"}, "wsgi: app:app"),
    ({"app.py": "def application(e, s):\n    pass\n"}, "wsgi: app:application"),
    ({"wsgi.py": "application = make()\n"}, "wsgi: wsgi:application"),
    ({"wsgi.py": "app = make()\n"}, "wsgi: wsgi:app"),
    ({"manage.py": "", "site/wsgi.py": ""}, "wsgi: site.wsgi:application"),
])
def test_starter_procfile(files, line):
    text = piku.render_starter_procfile(files)
    workers, warnings = piku.parse_procfile(text)  # what init writes deploys as it is
    assert line + "\n" in text and not warnings
    assert list(workers)[0] == "wsgi"
    if "manage.py" in files:
        assert workers["release"] == "python manage.py migrate --noinput"


def test_starter_env_is_all_comments():
    assert piku.parse_env(piku.render_starter_env("shop")) == {}
    assert "NGINX_SERVER_NAME=shop.example.com" in piku.render_starter_env("shop")


@pytest.mark.parametrize("command,args,sent", [
    ("apps", [], ["apps"]),
    ("logs", ["-n", "5", "worker"], ["logs", "demo", "-n", "5", "worker"]),
    ("config:set", ["A=1 2", "B=$x"], ["config:set", "demo", "A=1 2", "B=$x"]),
    ("run", ["--", "python", "-c", "print(1)"], ["run", "demo", "python", "-c", "print(1)"]),
    ("run", ["ls", "--", "x"], ["run", "demo", "ls", "--", "x"]),
    ("help", [], ["help"]),
])
def test_plan_client_call(command, args, sent):
    assert piku.plan_client_call(command, args, "demo") == sent


def test_plan_client_call_needs_an_app():
    assert piku.plan_client_call("apps", [], None) == ["apps"]
    with pytest.raises(PikuError, match="needs an app"):
        piku.plan_client_call("logs", [], None)


def test_pyproject_app_without_uv_gets_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.local/bin/uv either
    b = piku.Build(piku.paths_for(str(tmp_path / "root")), "demo", str(tmp_path), {}, {"wsgi": "a:b"},
                   {"PATH": str(tmp_path / "nothing")})
    assert b.uv is None
    with pytest.raises(PikuError, match=r"uv is not installed .*pip install --user uv"):
        piku.build_uv(b)


def test_static_kind_beside_an_app_has_one_root_location():
    conf = nginx(kinds={"web": "x", "static": "public"})
    assert conf.count("location / {") == 1 and "try_files $uri $uri.html $uri/ @piku;" in conf
    assert "location @piku {" in conf and "alias /srv/piku/apps/demo/public/;" in conf
    conf = nginx({"NGINX_STATIC_PATHS": "/:www"}, kinds={"web": "x", "static": "public"})
    assert conf.count("location / {") == 1 and "alias /srv/piku/apps/demo/www/;" in conf


def test_catch_all_is_the_static_fallback():
    conf = nginx({"NGINX_CATCH_ALL": "/index.html"}, kinds={"static": "public"}, backend=False)
    assert "try_files $uri $uri.html $uri/ /index.html;" in conf and "error_page" not in conf


def test_cache_for_wsgi_uses_the_uwsgi_module():
    conf = nginx({"NGINX_CACHE_PREFIXES": "/api,/feed"}, kinds={"wsgi": "a:b"}, sockets=["/s/demo.1.sock"])
    assert "uwsgi_cache_path /srv/piku/cache/demo levels=1:2 keys_zone=demo:20m" in conf
    assert "uwsgi_cache demo;" in conf and "uwsgi_cache_key $scheme$host$request_uri;" in conf
    assert "proxy_cache" not in conf and "if ($uri ~ ^(/api|/feed))" in conf
    assert 'add_header Cache-Control "public' not in conf  # only cached prefixes are marked public
    web = nginx({"NGINX_CACHE_PREFIXES": "/api"})
    assert "proxy_cache_path /srv/piku/cache/demo" in web and "uwsgi_cache" not in web


def test_loop_plugins_are_required_and_loaded(tmp_path):
    assert piku.native_loop_plugins({}, [str(tmp_path)]) == []
    with pytest.raises(PikuError, match="apt-get install uwsgi-plugin-gevent-python3"):
        piku.native_loop_plugins({"UWSGI_GEVENT": "true"}, [str(tmp_path)])
    (tmp_path / "gevent_python3_plugin.so").write_bytes(b"")
    assert piku.native_loop_plugins({"UWSGI_GEVENT": "true"}, [str(tmp_path)]) == ["gevent_python3"]
    with pytest.raises(PikuError, match="uwsgi-plugin-asyncio-python3"):
        piku.native_loop_plugins({"UWSGI_ASYNCIO": "10"}, [str(tmp_path)])
    ini = vassal(extra_plugins=["gevent_python3"], settings={"UWSGI_GEVENT": "true"})
    assert "plugin = python3,gevent_python3" in ini and "gevent = 100" in ini


@pytest.mark.parametrize("host,port,out", [("127.0.0.1", 80, "127.0.0.1:80"), ("::1", 80, "[::1]:80"),
                                           ("[::1]", 80, "[::1]:80")])
def test_host_port(host, port, out):
    assert piku.host_port(host, port) == out


def test_ipv6_bind_address():
    piku.validate_settings({"BIND_ADDRESS": "::1"})
    piku.validate_settings({"BIND_ADDRESS": "[::1]"})
    with pytest.raises(PikuError, match="BIND_ADDRESS"):
        piku.validate_settings({"BIND_ADDRESS": "1.2.3"})
    assert "http-socket = [::1]:5000" in vassal(settings={"BIND_ADDRESS": "::1"})
    assert "server [::1]:5000 max_fails=0;" in nginx({"BIND_ADDRESS": "::1"})
    assert "server 127.0.0.1:5000 max_fails=0;" in nginx({"BIND_ADDRESS": "0.0.0.0"})


def test_cloudflare_acl_covers_ipv6():
    conf = nginx({"NGINX_CLOUDFLARE_ACL": "true"})
    assert "allow 2606:4700::/32;" in conf and "allow ::1;" in conf
    assert conf.index("allow 2606:4700") < conf.index("  deny all;\n")


def test_catch_all_never_hides_the_app():
    conf = nginx({"NGINX_CATCH_ALL": "/index.html", "NGINX_STATIC_PATHS": "/assets/:static"},
                 kinds={"web": "x", "static": "public"})
    assert "try_files $uri $uri.html $uri/ @piku;" in conf  # "/" hands what it lacks to the app
    assert "try_files $uri $uri.html $uri/ /index.html;" in conf  # the static prefix gets the page


def test_plan_scaling_runs_web_and_cron_once():
    workers = {"web": "x", "cron1": "* * * * * x", "worker": "y", "release": "z", "static": "s"}
    assert piku.plan_scaling(workers, {"web": 2, "cron1": 3, "worker": 4}) == {"web": 1, "cron1": 1, "worker": 4}
    assert piku.plan_scaling(workers, {"web": 3}, behind_nginx=True)["web"] == 3
    assert piku.plan_scaling(workers, {"web": 0}) == {"web": 0, "cron1": 1, "worker": 1}


def test_computed_env_src_layout():
    env = piku.computed_env(PATHS, "demo", {}, 5000, "/home/piku", "piku", "/usr/bin")
    assert "PYTHONPATH" not in env and env["PATH"] == "/srv/piku/envs/demo/bin:/usr/bin"
    env = piku.computed_env(PATHS, "demo", {"PYTHONPATH": "/opt/lib"}, 5000, "/h", "piku", "/usr/bin", True)
    assert env["PYTHONPATH"] == "/srv/piku/apps/demo/src:/opt/lib"
    boot = piku.render_wsgi_boot("/v", "/srv/piku/apps/demo", "a:b", env, "3.11")
    assert "os.environ.get('PYTHONPATH', '')" in boot


@pytest.mark.parametrize("name,host", [("app.example.com", "app.example.com"),
                                       ("*.example.com", "piku-probe.example.com"), ("_", "_")])
def test_probe_host_is_routed_to_the_server_name(name, host):
    assert piku.probe_host(name) == host
    assert piku.HOSTNAME_RE.fullmatch(piku.probe_host(name))


def test_server_name_owners_from_rendered_confs():
    def conf(app, names, **extra):
        settings = {"NGINX_SERVER_NAME": names, **extra}
        return piku.render_nginx({"app": app, "settings": settings, "paths": PATHS, "kinds": {"web": "x"},
                                  "sockets": [], "port": 5000, "app_dir": "/a", "cert": True,
                                  "has_backend": True})
    owners = piku.server_name_owners({"one": conf("one", "A.example.com www.a.example.com",
                                                  NGINX_HTTPS_ONLY="true"),
                                      "two": conf("two", "*.example.org")})
    assert owners == {"a.example.com": "one", "www.a.example.com": "one", "*.example.org": "two"}


def test_cache_times_are_seconds_as_in_the_original_piku():
    cached = {"NGINX_CACHE_PREFIXES": "/api"}
    conf = nginx(cached)
    assert "proxy_cache_valid 301 302 307 308 3600s;" in conf and "proxy_cache_valid any" not in conf
    assert "301 302 307 308" not in nginx({**cached, "NGINX_CACHE_REDIRECTS": "0"})
    assert "301 302 307 308" not in nginx({**cached, "NGINX_CACHE_REDIRECTS": "false"})
    for key in ("NGINX_CACHE_REDIRECTS", "NGINX_CACHE_ANY", "UWSGI_GEVENT"):
        with pytest.raises(PikuError, match=key):
            piku.validate_settings({key: "soon"})
        with pytest.raises(PikuError, match=key):
            piku.validate_settings({key: "-5"})
        piku.validate_settings({key: "3600"})


def test_switch_probe_path_is_read_back_from_what_render_switch_probe_wrote():
    conf = "server {\n" + "\n".join(piku.render_switch_probe("0123abcd")) + "\n}\n"
    assert piku.switch_probe_path(conf) == "/.well-known/piku-switch/0123abcd"
    assert piku.switch_probe_path("server {\n}\n") is None and piku.switch_probe_path(None) is None


def test_a_web_master_in_a_slot_has_a_fifo_of_its_generation():
    """The slot may start again while its last web master still stops (uWSGI's one-second wait
    after a daemon stop): the two must not share a FIFO. Other kinds keep one name."""
    assert piku.master_fifo_name("web", 1, "0a1b2c") == "web.1.0a1b2c.master.fifo"
    assert piku.master_fifo_name("web", 2, None) == "web.2.master.fifo"
    assert piku.master_fifo_name("wsgi", 1, "0a1b2c") == "wsgi.1.master.fifo"
