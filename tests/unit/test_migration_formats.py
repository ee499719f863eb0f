"""Unit tests for issue 13 (switching from the original piku and back): its process titles, nginx
configs of any layout in the check, config values expanded as it did, and the files `downgrade`
writes in its formats."""
import os

import pytest

import piku
from piku import PikuError

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPrmTtF5AcG/fBZOW1kVdiTIna3ssiLQx0jqqG0oRSF2 alice@laptop"


# -- ps: the original's process titles ---------------------------------------------------------

def test_master_titles_of_both_pikus():
    assert piku.parse_master_title("shop:wsgi.1 uWSGI master") == ("shop:wsgi.1", True)
    assert piku.parse_master_title("my.app:web.12 uWSGI master") == ("my.app:web.12", True)
    assert piku.parse_master_title("shop:cron1:uWSGI master") == ("shop:cron1", False)  # the original's
    for other in ("shop:wsgi:uWSGI worker 1", "shop:wsgi.1 uWSGI worker 2", "uwsgi --ini x.ini", "sleep 1",
                  "shop uWSGI master", "a:b:c:uWSGI master", ""):
        assert piku.parse_master_title(other) == (None, False), other


# -- the nginx check copes with any config in nginx/ -------------------------------------------

def check_copy(text, stand_in=None):
    ports = {}
    return piku.relisten_for_check(text, ports, "/tmp/x/logs.log", stand_in), ports


def test_check_copy_finds_listen_however_it_is_written():
    text = ('server { listen 80; server_name a.test; }\nserver {\n\tlisten\n\t\t[::]:443 ssl;  # comment; listen 9\n'
            '  listen "10.0.0.1:8080" default_server; location / { return 200 "listen 1;"; }\n}\n')
    out, ports = check_copy(text)
    assert set(ports) == {"0.0.0.0:80", "[::]:443", "10.0.0.1:8080"}
    assert f"server {{ listen 127.0.0.1:{ports['0.0.0.0:80']}; server_name a.test; }}" in out
    assert f"listen\n\t\t127.0.0.1:{ports['[::]:443']} ssl;  # comment; listen 9" in out  # comments untouched
    assert f"listen 127.0.0.1:{ports['10.0.0.1:8080']} default_server;" in out
    assert 'return 200 "listen 1;";' in out  # a string is no directive


def test_check_copy_moves_logs_anywhere_and_keeps_the_special_ones():
    text = ("server { access_log /var/log/x.log combined; error_log logs/e.log warn;\n"
            "  location / { access_log\n /srv/a.log; } access_log off; error_log stderr; "
            "access_log syslog:server=127.0.0.1; }\n")
    out, _ = check_copy(text)
    assert out.count("/tmp/x/logs.log") == 3 and "/var/log" not in out and "/srv/a.log" not in out
    assert "access_log off;" in out and "error_log stderr;" in out and "syslog:server=127.0.0.1" in out


def test_check_copy_stands_in_for_certificates_piku_cannot_read():
    text = ("server { ssl_certificate /etc/secret/a.crt; ssl_certificate_key /etc/secret/a.key;\n"
            "  ssl_certificate /home/piku/.piku/nginx/b.crt; ssl_certificate_key $var_key; }\n")
    unreadable = {"/etc/secret/a.crt", "/etc/secret/a.key"}
    out, _ = check_copy(text, lambda path, i: ("/d.crt", "/d.key")[i] if path in unreadable else None)
    assert "ssl_certificate /d.crt;" in out and "ssl_certificate_key /d.key;" in out
    assert "/home/piku/.piku/nginx/b.crt" in out and "$var_key" in out


# -- config:set values expand piku's variables, as the original's did ---------------------------

BASE = {"APP": "shop", "DATA_ROOT": "/p/data/shop", "HOME": "/home/piku", "USER": "piku"}


def test_config_values_expand_pikus_own_values_and_earlier_settings():
    config = {"DB_URL": "sqlite:///$DATA_ROOT/app.db", "URL": "https://${APP}.example.com/$NAME",
              "NAME": "x", "BOTH": "$DB_URL|$URL|$UNKNOWN|$5|pa$$word"}
    out = piku.expand_config(config, {**BASE, "REPO": "r"})
    assert out["DB_URL"] == "sqlite:////p/data/shop/app.db"
    assert out["URL"] == "https://shop.example.com/$NAME"  # NAME comes later: not known yet
    assert out["BOTH"] == "sqlite:////p/data/shop/app.db|https://shop.example.com/$NAME|$UNKNOWN|$5|pa$$word"
    assert config["DB_URL"] == "sqlite:///$DATA_ROOT/app.db"  # what was set is not changed


def test_double_dollar_keeps_a_name_piku_would_expand():
    out = piku.expand_config({"A": "$$APP and $${HOME} and $$OTHER and $APP", "B": "$$$APP"}, BASE)
    assert out == {"A": "$APP and ${HOME} and $$OTHER and shop", "B": "$$APP"}


def test_settings_merge_repo_env_under_expanded_config():
    merged = piku.merge_settings({"PORT": "5000", "GREETING": "hi"}, {"URL": "http://localhost:$PORT/$GREETING"}, BASE)
    assert merged == {"PORT": "5000", "GREETING": "hi", "URL": "http://localhost:5000/hi"}


def test_stored_config_is_read_as_written(tmp_path):
    paths = piku.paths_for(str(tmp_path))
    os.makedirs(os.path.join(paths.envs, "shop"))
    with open(os.path.join(paths.envs, "shop", "ENV"), "w") as f:  # as the original piku writes it
        f.write("A=one\nB=$A/two\nDB=sqlite:///$DATA_ROOT/x.db\n")
    assert piku.load_config(paths, "shop") == {"A": "one", "B": "$A/two", "DB": "sqlite:///$DATA_ROOT/x.db"}


# -- the original's formats, for downgrade ------------------------------------------------------

def test_values_the_original_cannot_carry():
    assert piku.original_value_problem("sqlite:///x%40y $HOME") is None
    for bad in ("$(touch /tmp/x)", "@(/etc/passwd)", "a\nb", "a\u2028b", " padded", "tail "):
        assert piku.original_value_problem(bad), bad
    assert piku.original_ini_value("K", "p%40ss") == "p%%40ss"  # uWSGI reads %% as %
    with pytest.raises(PikuError, match="K: it holds"):
        piku.original_ini_value("K", "x$(id)")


def test_cron_specs_for_uwsgis_cron():
    assert piku.plan_original_cron("* * * * * python3 job.py --all") == ("-1 -1 -1 -1 -1", "python3 job.py --all")
    assert piku.plan_original_cron("*/5 2 1 12 0 run") == ("-5 2 1 12 0", "run")
    assert piku.plan_original_cron("@hourly  run it") == ("0 -1 -1 -1 -1", "run it")
    for bad, why in (("@reboot run", "no such schedule"), ("1,31 * * * * run", "minute `1,31`"),
                     ("* * * jan * run", "month `jan`"), ("60 * * * * run", "minute `60`"),
                     ("* 1-5 * * * run", "hour `1-5`"), ("*/0 * * * * run", r"minute `\*/0`"), ("* * *", "is not")):
        with pytest.raises(PikuError, match=why):
            piku.plan_original_cron(bad)


def vassal(kind, command, **extra):
    paths = piku.paths_for("/p")
    v = {"app": "shop", "kind": kind, "index": 1, "paths": paths, "settings": {}, "chdir": "/p/apps/shop",
         "command": command, "env": {"APP": "shop", "DB": "x%40y"}, "venv": "/p/envs/shop",
         "python_plugin": "python3", "extra_plugins": None, "port": "5000"}
    v.update(extra)
    return piku.render_original_vassal(v)


def test_original_vassals_run_without_piku_py():
    wsgi = vassal("wsgi", "app:application", socket="/p/nginx/shop.1.b.sock")
    for line in ("chdir = /p/apps/shop", "procname-prefix = shop:wsgi:", "virtualenv = /p/envs/shop",
                 "plugin = python3", "module = app:application", "threads = 4",
                 "socket = /p/nginx/shop.1.b.sock", "chmod-socket = 660", "logto = /p/logs/shop/wsgi.1.log",
                 "env = APP=shop", "env = DB=x%%40y"):
        assert line + "\n" in wsgi, line
    assert "piku" not in wsgi.replace("/p/", "")  # no exec-worker, no piku.py
    plain = vassal("wsgi", "app:app", check_socket="/p/state/shop/slot-a/wsgi.1.sock")
    assert "http-socket = 127.0.0.1:5000\nreuse-port = true\nsocket = /p/state/shop/slot-a/wsgi.1.sock\n" in plain
    assert "attach-daemon = gunicorn -b $BIND_ADDRESS:$PORT app:app\n" in vassal("web", "gunicorn -b $BIND_ADDRESS:$PORT app:app")
    assert "cron = -1 -5 -1 -1 -1 python3 job.py\n" in vassal("cron1", "python3 job.py", cron="-1 -5 -1 -1 -1")
    with pytest.raises(PikuError, match="worker: it holds"):
        vassal("worker", "echo $(id)")


def test_original_env_files_are_plain():
    assert piku.render_original_env({"A": "x y", "B": 'say "hi" $APP', "C": ""}) == 'A=x y\nB=say "hi" $APP\nC=\n'
    with pytest.raises(PikuError, match="B: it holds"):
        piku.render_original_env({"A": "x", "B": "two\nlines"})


def test_original_hook_deploys_after_the_push():
    hook = piku.render_original_hook("/home/piku/piku.py", "/home/piku/.piku", "shop")
    assert hook.startswith("#!/bin/sh\n")
    assert "exec env PIKU_ROOT=/home/piku/.piku /home/piku/piku.py git-hook shop\n" in hook


def test_key_lines_of_piku_py_become_the_originals():
    ours = piku.render_authorized_key("/usr/bin/python3", "/home/piku/piku.py", "/home/piku/.piku", PUB)
    original = ('command="FINGERPRINT=SHA256:x NAME=default /home/piku/piku.py $SSH_ORIGINAL_COMMAND",'
                "no-agent-forwarding,no-user-rc,no-X11-forwarding,no-port-forwarding " + PUB + "\n")
    text = "# keys\n" + original + ours + "ssh-rsa AAAAB3NzaC1yc2E other\n"
    out, changed = piku.render_original_keys(text, "/home/piku/piku.py", "/home/piku/.piku")
    fp = piku.key_fingerprint(PUB.split()[1])
    assert changed == 1
    assert out == ("# keys\n" + original + f'command="PIKU_ROOT=/home/piku/.piku FINGERPRINT={fp} NAME=default '
                   '/home/piku/piku.py $SSH_ORIGINAL_COMMAND",no-agent-forwarding,no-user-rc,no-X11-forwarding,'
                   f"no-port-forwarding {PUB}\n" + "ssh-rsa AAAAB3NzaC1yc2E other\n")
    assert piku.render_original_keys(out, "/home/piku/piku.py", "/home/piku/.piku") == (out, 0)


# -- the original's checkout becomes a release, in one step -------------------------------------

def test_a_checkout_of_the_original_becomes_a_legacy_release(tmp_path, capsys):
    paths = piku.paths_for(str(tmp_path))
    checkout = os.path.join(paths.apps, "shop")
    os.makedirs(os.path.join(checkout, "public"))
    with open(os.path.join(checkout, "public", "index.html"), "w") as f:
        f.write("hi")
    legacy = piku.adopt_legacy_checkout(paths, "shop")
    assert os.path.islink(checkout) and os.readlink(checkout) == legacy
    assert os.path.basename(legacy).startswith("legacy-") and os.path.dirname(legacy) == os.path.join(paths.releases, "shop")
    assert open(os.path.join(checkout, "public", "index.html")).read() == "hi"
    assert piku.adopt_legacy_checkout(paths, "shop") is None  # (once)
    assert "was a checkout of the original piku" in capsys.readouterr().out


def test_downgrade_is_no_ssh_command_and_wants_the_original(tmp_path, monkeypatch, capsys):
    assert "downgrade" not in piku.SSH_ALLOWED
    monkeypatch.setenv("PIKU_ROOT", str(tmp_path / "piku"))
    monkeypatch.delenv("SSH_ORIGINAL_COMMAND", raising=False)
    code = piku.main(["downgrade", str(tmp_path / "nothing.py")])
    assert code != 0 and "no such file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "piku" / "state" / piku.DOWNGRADED)


def original_target(workers, scaling, names=(), slot=None, port="None"):
    paths = piku.paths_for("/p")
    release = piku.release_from({"id": "r1", "dir": "/p/releases/shop/r1", "venv": "/p/venvs/shop/abc",
                                 "python": "3.11.2", "rev": "0" * 40})
    env = {"APP": "shop", "PORT": port, "VIRTUAL_ENV": release.venv, "PATH": release.venv + "/bin:/usr/bin",
           "PIKU_APP_DIR": release.dir, "BIND_ADDRESS": "127.0.0.1"}
    return piku.Target(**dict.fromkeys(piku.Target._fields))._replace(
        paths=paths, app="shop", op=piku.OPERATIONS["restart"], release=release, workers=workers,
        settings={"NGINX_SERVER_NAME": " ".join(names)} if names else {}, scaling=scaling, live={}, slot=slot,
        restart=set(scaling), ports={"port": 5000, "web": {"a": [5001], "b": [5002]}}, env=env,
        wsgi_mode="native" if "wsgi" in workers else None, python_plugin="python3", names=list(names),
        cert=False, stamp="r1 restart 0")


def test_an_app_in_the_originals_files():
    t = original_target({"worker": "python3 w.py", "cron1": "*/5 * * * * python3 c.py", "static": "public"},
                        {"worker": 1, "cron1": 1})
    files = piku.render_original_files(t, {"DB": "sqlite:///$DATA_ROOT/x.db"})
    assert sorted(p.replace("/p/", "") for p in files) == [
        "envs/shop/ENV", "envs/shop/LIVE_ENV", "envs/shop/SCALING", "uwsgi-available/shop_cron1.1.ini",
        "uwsgi-available/shop_worker.1.ini", "uwsgi-enabled/shop_cron1.1.ini", "uwsgi-enabled/shop_worker.1.ini"]
    worker = files["/p/uwsgi-enabled/shop_worker.1.ini"][0]
    assert "chdir = /p/apps/shop\n" in worker and "virtualenv = /p/envs/shop\n" in worker
    assert "env = PATH=/p/envs/shop/bin:/usr/bin\n" in worker and "env = PIKU_APP_DIR=/p/apps/shop\n" in worker
    assert "env = PROC_TYPE=worker\n" in worker and "PORT" not in worker  # (it listens nowhere)
    assert "cron = -5 -1 -1 -1 -1 python3 c.py\n" in files["/p/uwsgi-enabled/shop_cron1.1.ini"][0]
    assert files["/p/envs/shop/ENV"] == ("DB=sqlite:///$DATA_ROOT/x.db\n", 0o600)
    assert "PROC_TYPE" not in files["/p/envs/shop/LIVE_ENV"][0]


def test_serving_workers_of_the_original_take_the_other_slot():
    wsgi = piku.render_original_files(original_target({"wsgi": "app:app"}, {"wsgi": 1}, ["shop.test"], "b", "5000"), {})
    text = wsgi["/p/uwsgi-enabled/shop_wsgi.1.ini"][0]
    assert "socket = /p/nginx/shop.1.b.sock\n" in text and "module = app:app\n" in text
    assert "upstream" in wsgi["/p/nginx/shop.conf"][0] and "unix:/p/nginx/shop.1.b.sock max_fails=0" in wsgi["/p/nginx/shop.conf"][0]
    web = piku.render_original_files(original_target({"web": "gunicorn x"}, {"web": 1}, ["shop.test"], "a", "5001"), {})
    assert "env = PORT=5001\n" in web["/p/uwsgi-enabled/shop_web.1.ini"][0]


def test_piku_py_takes_no_push_or_change_after_a_downgrade(tmp_path, monkeypatch, capsys):
    paths = piku.paths_for(str(tmp_path / "piku"))
    piku.ensure_dirs(paths.state)
    open(os.path.join(paths.state, piku.DOWNGRADED), "w").close()
    with pytest.raises(PikuError, match="went back to the original piku"):
        piku.recover(paths, "shop")
    monkeypatch.setenv("PIKU_ROOT", paths.root)
    monkeypatch.delenv("SSH_ORIGINAL_COMMAND", raising=False)
    assert piku.main(["git-receive-pack", "shop"]) != 0 and "went back" in capsys.readouterr().err
    assert not os.path.exists(paths.repos + "/shop")
