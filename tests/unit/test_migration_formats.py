"""Unit tests for issue 13 (switching from the original piku and back): its process titles, nginx
configs of any layout in the check, config values expanded as it did, and the files `downgrade`
writes in its formats."""

import os

import piku


def test_master_titles_of_both_pikus():
    assert piku.parse_master_title("shop:wsgi.1 uWSGI master") == ("shop:wsgi.1", True)
    assert piku.parse_master_title("my.app:web.12 uWSGI master") == ("my.app:web.12", True)
    assert piku.parse_master_title("shop:cron1:uWSGI master") == ("shop:cron1", False)  # the original's
    for other in ("shop:wsgi:uWSGI worker 1", "shop:wsgi.1 uWSGI worker 2", "uwsgi --ini x.ini", "sleep 1",
                  "shop uWSGI master", "a:b:c:uWSGI master", ""):
        assert piku.parse_master_title(other) == (None, False), other


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
