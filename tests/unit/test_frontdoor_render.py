"""Issue 12, the front door: nginx capabilities, the default server, per-app tuning settings,
access control, redirects, maintenance mode and per-app nginx logs (pure parts)."""
import os

import pytest

import piku
from piku import PikuError

PATHS = piku.paths_for("/srv/piku")
NEW = {"version": [1, 25, 3], "http2": True, "ssl": True, "conf_path": "/etc/nginx/nginx.conf"}
DEBIAN12 = {"version": [1, 22, 1], "http2": True, "ssl": True, "conf_path": "/etc/nginx/nginx.conf"}
OLD = {"version": [1, 18, 0], "http2": True, "ssl": True, "conf_path": "/etc/nginx/nginx.conf"}
NO_H2 = {"version": [1, 22, 1], "http2": False, "ssl": True, "conf_path": None}
APR1 = "$apr1$pikusalt$VJh.v2cwJGv1QJstKu9Th."  # openssl passwd -apr1 -salt pikusalt secret
BCRYPT = "$2y$05$" + "a" * 53
SHA512 = "$6$salt$" + "b" * 86


def nginx(settings=None, kinds=None, sockets=None, cert=False, backend=True, features=DEBIAN12, **extra):
    s = {"NGINX_SERVER_NAME": "example.test"}
    s.update(settings or {})
    n = {"app": "demo", "settings": s, "paths": PATHS, "kinds": kinds if kinds is not None else {"web": "x"},
         "sockets": sockets or [], "port": 5000, "app_dir": "/srv/piku/apps/demo", "cert": cert,
         "has_backend": backend, "nginx": features}
    n.update(extra)
    return piku.render_nginx(n)


def main_block(conf):
    """The app's own server block (the last one)."""
    return conf[conf.rindex("server {"):]


# --- what nginx supports ---------------------------------------------------------------------

V_OUTPUT = ("nginx version: nginx/1.22.1\nbuilt with OpenSSL 3.0.11\nTLS SNI support enabled\n"
            "configure arguments: --prefix=/usr/share/nginx --conf-path=/etc/nginx/nginx.conf "
            "--with-http_ssl_module --with-http_v2_module --with-http_realip_module\n")


def test_parse_nginx_v():
    assert piku.parse_nginx_v(V_OUTPUT) == DEBIAN12
    bare = piku.parse_nginx_v("nginx version: nginx/1.25.3\nconfigure arguments: --with-http_ssl_module\n")
    assert bare["version"] == [1, 25, 3] and not bare["http2"] and bare["conf_path"] is None
    assert piku.parse_nginx_v("") == {"version": None, "http2": False, "ssl": False, "conf_path": None}


@pytest.mark.parametrize("features,syntax", [(NEW, "directive"), (DEBIAN12, "flag"), (OLD, "flag"),
                                             (NO_H2, None), (None, None), ({"http2": True}, None)])
def test_http2_syntax(features, syntax):
    assert piku.http2_syntax(features) == syntax


def test_http2_on_https_in_the_right_syntax():
    old, new = nginx(cert=True, features=DEBIAN12), nginx(cert=True, features=NEW)
    assert "listen 0.0.0.0:443 ssl http2;" in old and "http2 on;" not in old
    assert "listen 0.0.0.0:443 ssl;" in new and "  http2 on;\n" in new
    assert "listen 0.0.0.0:80;" in old and "listen 0.0.0.0:80 http2" not in old  # HTTPS only
    for features in (NO_H2, None):
        assert "http2" not in nginx(cert=True, features=features)
    assert "http2" not in nginx(cert=False, features=NEW)  # no certificate, no HTTPS


# --- the default server ----------------------------------------------------------------------

LISTENS = {"0.0.0.0:80": set(), "0.0.0.0:443": {"ssl"}}


def test_default_server_refuses_the_handshake_on_new_nginx():
    conf = piku.render_default_server(LISTENS, DEBIAN12)
    assert "listen 0.0.0.0:80 default_server;" in conf and "listen 0.0.0.0:443 ssl http2 default_server;" in conf
    assert "ssl_reject_handshake on;" in conf and "ssl_certificate" not in conf and "return 404;" in conf
    assert "server_name" not in conf  # no name an app could claim too
    assert "http2" not in piku.render_default_server(LISTENS, NEW)


def test_default_server_on_old_nginx_has_a_certificate_of_its_own():
    conf = piku.render_default_server(LISTENS, OLD, ("/srv/piku/nginx/_default.crt", "/srv/piku/nginx/_default.key"))
    assert "ssl_reject_handshake" not in conf and "ssl_certificate /srv/piku/nginx/_default.crt;" in conf
    without = piku.render_default_server(LISTENS, OLD)  # no openssl: the HTTPS port is left out
    assert "443" not in without and "listen 0.0.0.0:80 default_server;" in without
    unknown = piku.render_default_server(LISTENS, None)  # nginx not installed: the cautious form
    assert "ssl_reject_handshake" not in unknown


def test_default_server_without_apps_listens_nowhere():
    conf = piku.render_default_server({}, DEBIAN12)
    assert "  listen" not in conf and "server {" not in conf


def test_plan_default_listens_covers_every_app_address():
    a = nginx({"NGINX_HTTP_PORT": "8080"}, cert=True)
    b = nginx({"NGINX_IPV4_ADDRESS": "127.0.0.1", "DISABLE_IPV6": "true"})
    underscore = "server {\n  listen 10.0.0.1:80 default_server;\n  server_name _;\n}\n"
    listens = piku.plan_default_listens([a, b, underscore], {"[::]:8080": "/etc/nginx/sites-enabled/default"})
    assert set(listens) == {"0.0.0.0:8080", "0.0.0.0:443", "[::]:443", "127.0.0.1:80"}
    assert "ssl" in listens["0.0.0.0:443"] and "ssl" not in listens["0.0.0.0:8080"]


@pytest.mark.parametrize("line,key,flags", [
    ("listen 0.0.0.0:80;", "0.0.0.0:80", set()), ("listen   [::]:443 ssl http2;", "[::]:443", {"ssl", "http2"}),
    ("\tlisten 80 default_server;", "0.0.0.0:80", {"default_server"}), ("listen *:8080;", "0.0.0.0:8080", set()),
    ("listen 127.0.0.1;", "127.0.0.1:80", set()), ("listen [::1];", "[::1]:80", set())])
def test_parse_listens(line, key, flags):
    assert piku.parse_listens("server {\n  " + line + "\n}\n") == {key: flags}
    assert piku.parse_listens("  # " + line + "\n") == {}


def test_parse_nginx_conf_refs_of_debians_config():
    main = "user www-data;\nhttp {\n  include /etc/nginx/conf.d/*.conf;\n  include sites-enabled/*;\n  #include x;\n}\n"
    site = "server {\n\tlisten 80 default_server;\n\tlisten [::]:80 default_server;\n\tserver_name _;\n}\n"
    assert piku.parse_nginx_conf_refs(main) == (["/etc/nginx/conf.d/*.conf", "sites-enabled/*"], set())
    assert piku.parse_nginx_conf_refs(site)[1] == {"0.0.0.0:80", "[::]:80"}
    assert piku.parse_nginx_user(main) == "www-data"
    assert piku.parse_nginx_user("user nginx web;\n") == "web" and piku.parse_nginx_user("events {}\n") is None


def test_foreign_default_listens_follows_includes(tmp_path):
    (tmp_path / "sites").mkdir()
    (tmp_path / "piku").mkdir()
    (tmp_path / "nginx.conf").write_text(f"http {{\n include sites/*;\n include {tmp_path}/piku/*.conf;\n}}\n")
    (tmp_path / "sites" / "default").write_text("server { listen 80 default_server; }\n".replace("{ ", "{\n"))
    (tmp_path / "piku" / "_default.conf").write_text("server {\n listen 0.0.0.0:8443 ssl default_server;\n}\n")
    paths = piku.paths_for(str(tmp_path))._replace(nginx=str(tmp_path / "piku"))
    found = piku.foreign_default_listens(paths, {"conf_path": str(tmp_path / "nginx.conf")})
    assert found == {"0.0.0.0:80": str(tmp_path / "sites" / "default")}  # piku's own excluded
    assert piku.foreign_default_listens(paths, None) == {}


def test_an_app_named_underscore_is_the_default():
    conf = nginx({"NGINX_SERVER_NAME": "_"}, cert=True)
    assert "listen 0.0.0.0:80 default_server;" in conf and "listen 0.0.0.0:443 ssl http2 default_server;" in conf
    assert "default_server" not in nginx()
    both = nginx({"NGINX_SERVER_NAME": "_ www.a.test", "NGINX_REDIRECT": "www.a.test:a.test"})
    assert both.count("default_server") == 2  # (IPv4 and IPv6 of the app's block, not the redirect's)


def test_check_relistens_any_spacing_and_moves_logs():
    ports = {}
    original = ("server {\n    listen              80;\n    listen              [::]:80;\n"
                "  listen 0.0.0.0:443 ssl http2 default_server;\n  access_log /srv/piku/logs/a/nginx.access.log;\n"
                "  access_log off;\n}\n")
    out = piku.relisten_for_check(original, ports, "/tmp/x/logs.log")
    assert set(ports) == {"0.0.0.0:80", "[::]:80", "0.0.0.0:443"}
    assert f"listen              127.0.0.1:{ports['0.0.0.0:80']};" in out
    assert f"listen 127.0.0.1:{ports['0.0.0.0:443']} ssl http2 default_server;" in out
    assert "access_log /tmp/x/logs.log;" in out and "access_log off;" in out
    again = piku.relisten_for_check("listen *:80;\n", ports, "/tmp/x/logs.log")
    assert again == f"listen 127.0.0.1:{ports['0.0.0.0:80']};\n"  # the same address, the same port


# --- include files win ------------------------------------------------------------------------

def test_parse_nginx_directive_names_top_level_only():
    text = ("# client_max_body_size 1m;\nclient_max_body_size 200m;  gzip off;\n"
            "location /x { proxy_read_timeout 5s; if ($a) { return 403; } }\n"
            "add_header X-Thing \"a;b { c\";\nset $x '}';\nproxy_buffering\n  off;\n")
    assert piku.parse_nginx_directive_names(text) == {"client_max_body_size", "gzip", "location", "add_header",
                                                      "set", "proxy_buffering"}
    assert piku.parse_nginx_directive_names(None) == set()


def test_directives_the_include_sets_are_left_out():
    skip = {"client_max_body_size", "gzip", "access_log", "proxy_read_timeout", "add_header", "allow"}
    conf = nginx({"NGINX_PROXY_READ_TIMEOUT": "30", "NGINX_HSTS": "60", "NGINX_ALLOW": "10.0.0.0/8"}, cert=True,
                 include_directives=skip, logs="/srv/piku/logs/demo")
    assert "client_max_body_size" not in conf and "  gzip on;" not in conf and "access_log" not in conf
    assert "gzip_types" in conf and "error_log /srv/piku/logs/demo/nginx.error.log;" in conf
    assert "proxy_read_timeout" not in conf
    # directives nginx takes more than once stay: the include's add to piku's
    assert "Strict-Transport-Security" in conf and "allow 10.0.0.0/8;" in conf


# --- settings: defaults, then each one on and off --------------------------------------------

def test_front_door_defaults():
    conf = main_block(nginx(cert=True, logs="/srv/piku/logs/demo"))
    assert "  client_max_body_size 64m;" in conf and "  gzip on;" in conf and "gzip_proxied any;" in conf
    assert "access_log /srv/piku/logs/demo/nginx.access.log;" in conf
    for absent in ("Strict-Transport-Security", "auth_basic", "allow ", "\n  deny all", "_timeout", "_buffering",
                   "websocket", "error_page", "default_server"):
        assert absent not in conf, absent
    assert "access_log" not in nginx()  # no log folder given: nginx's own


@pytest.mark.parametrize("settings,added,removed", [
    ({"NGINX_CLIENT_MAX_BODY_SIZE": "200m"}, "client_max_body_size 200m;", "client_max_body_size 64m;"),
    ({"NGINX_CLIENT_MAX_BODY_SIZE": "0"}, "client_max_body_size 0;", "client_max_body_size 64m;"),
    ({"NGINX_GZIP": "false"}, None, "gzip"),
    ({"NGINX_PROXY_READ_TIMEOUT": "300"}, "    proxy_read_timeout 300s;", None),
    ({"NGINX_PROXY_SEND_TIMEOUT": "90"}, "    proxy_send_timeout 90s;", None),
    ({"NGINX_PROXY_BUFFERING": "false"}, "    proxy_buffering off;", None),
    ({"NGINX_WEBSOCKET_TIMEOUT": "3600"}, "location @piku-websocket {", None),
    ({"NGINX_ALLOW": "127.0.0.1, 2001:db8::/32"}, "  allow 127.0.0.1/32;\n  allow 2001:db8::/32;\n  deny all;", None),
    ({"NGINX_HSTS": "true"}, None, None),  # (no certificate: no HSTS; see below)
])
def test_front_door_settings(settings, added, removed):
    default, conf = nginx(), nginx(settings)
    if added:
        assert added not in default and added in conf
    if removed:
        assert removed in default and removed not in conf


def test_wsgi_apps_get_uwsgi_timeouts_and_no_websocket_location():
    conf = nginx({"NGINX_PROXY_READ_TIMEOUT": "300", "NGINX_PROXY_BUFFERING": "false", "NGINX_WEBSOCKET_TIMEOUT": "60"},
                 kinds={"wsgi": "a:b"}, sockets=["/s/demo.1.sock"])
    assert "    uwsgi_read_timeout 300s;" in conf and "    uwsgi_buffering off;" in conf
    assert "proxy_read_timeout" not in conf and "websocket" not in conf and "418" not in conf


def test_websocket_timeout_hands_upgrades_to_their_own_location():
    conf = nginx({"NGINX_WEBSOCKET_TIMEOUT": "3600", "NGINX_PROXY_READ_TIMEOUT": "30"})
    ws = conf[conf.index("location @piku-websocket {"):]
    assert "proxy_read_timeout 3600s;" in ws and "proxy_send_timeout 3600s;" in ws and "30s" not in ws
    assert "proxy_pass http://piku-demo;" in ws and "Upgrade $http_upgrade" in ws
    assert "  error_page 418 = @piku-websocket;" in conf
    root = conf[conf.index("  location / {"):conf.index("  location @piku {")]
    assert 'if ($http_upgrade ~* "^websocket$") { return 418; }' in root and "proxy_read_timeout 30s;" in root


def test_hsts_only_over_https_and_opt_in():
    assert "Strict-Transport-Security" not in nginx(cert=True)
    assert "Strict-Transport-Security" not in nginx({"NGINX_HSTS": "true"}, cert=False)
    assert 'add_header Strict-Transport-Security "max-age=31536000" always;' in nginx({"NGINX_HSTS": "true"}, cert=True)
    assert '"max-age=600"' in nginx({"NGINX_HSTS": "600"}, cert=True)
    assert "Strict-Transport-Security" not in nginx({"NGINX_HSTS": "0"}, cert=True)
    # locations with add_header lines of their own repeat it (nginx would not add the server's)
    cached = nginx({"NGINX_HSTS": "600", "NGINX_CACHE_PREFIXES": "/api"}, cert=True)
    assert cached.count('add_header Strict-Transport-Security "max-age=600" always;') == 3  # server, /, @piku
    down = nginx({"NGINX_HSTS": "600"}, cert=True, maintenance={"page": None})
    assert down.count("Strict-Transport-Security") == 2


def test_basic_auth_and_allow_list_spare_acme_challenges():
    conf = nginx({"NGINX_ALLOW": "10.0.0.0/8"}, htpasswd="/srv/piku/nginx/demo.htpasswd")
    assert '  auth_basic "demo";\n  auth_basic_user_file /srv/piku/nginx/demo.htpasswd;' in conf
    assert "location ^~ /.well-known/acme-challenge/ { allow all; auth_basic off; root /srv/piku/acme/demo; }" in conf
    assert "location ^~ /.well-known/acme-challenge/ { root /srv/piku/acme/demo; }" in nginx()


def test_allow_list_beside_the_cloudflare_acl_is_one_list():
    conf = nginx({"NGINX_ALLOW": "192.0.2.7", "NGINX_CLOUDFLARE_ACL": "true"})
    assert conf.count("deny all;\n") == 1 and conf.index("allow 192.0.2.7/32;") < conf.index("  deny all;\n")
    assert "allow 173.245.48.0/20;" in conf


def test_redirect_server_keeps_scheme_path_and_query():
    s = {"NGINX_SERVER_NAME": "example.test, www.example.test", "NGINX_REDIRECT": "www.example.test:example.test"}
    conf = nginx(s, cert=True)
    redirect = conf[conf.index("server_name www.example.test;"):conf.index("server_name example.test;")]
    assert "return 301 https://example.test$request_uri;" in redirect and "return 301 http://example.test$request_uri;" in redirect
    assert "if ($scheme = https)" in redirect and "ssl_certificate /srv/piku/nginx/demo.crt;" in redirect
    assert "acme-challenge" in redirect
    assert "server_name example.test;" in conf and "server_name example.test www.example.test;" not in conf
    plain = nginx({**s, "NGINX_HTTP_PORT": "8080"})
    assert "location / { return 301 http://example.test:8080$request_uri; }" in plain
    only = nginx({**s, "NGINX_HTTPS_ONLY": "true"}, cert=True)
    assert "location / { return 301 https://example.test$request_uri; }" in only
    assert "server_name example.test www.example.test;" in only  # the HTTP block redirects every name


@pytest.mark.parametrize("settings,message", [
    ({"NGINX_SERVER_NAME": "a.test", "NGINX_REDIRECT": "www.a.test:a.test"}, "www.a.test is not one of NGINX_SERVER_NAME"),
    ({"NGINX_SERVER_NAME": "a.test", "NGINX_REDIRECT": "a.test:b.test"}, "every name"),
    ({"NGINX_REDIRECT": "a.test"}, "expected from.example.com:to.example.com"),
    ({"NGINX_REDIRECT": "a.test:b.test;evil"}, "NGINX_REDIRECT"),
    ({"NGINX_REDIRECT": "*.a.test:a.test"}, "NGINX_REDIRECT"),
])
def test_redirects_are_validated_with_the_names(settings, message):
    with pytest.raises(PikuError, match=message):
        piku.validate_settings(settings)
        piku.served_names(settings)  # (config:set checks with the repo's ENV, a deploy when rendering)


def test_maintenance_answers_503_and_keeps_acme():
    conf = nginx({"NGINX_BASIC_AUTH": f"ann:{APR1}", "NGINX_INCLUDE_FILE": "x.conf", "NGINX_STATIC_PATHS": "/s:s"},
                 maintenance={"page": None, "by": "maintenance:on"})
    assert "  error_page 503 @piku-maintenance;\n  location / { return 503; }" in conf
    assert "add_header Retry-After 120 always;" in conf and "return 503 '<!doctype html>" in conf
    assert "add_header X-Piku-Maintenance on always; root /srv/piku/acme/demo;" in conf
    assert "include " not in conf and "proxy_pass" not in conf and "alias" not in conf
    page = nginx(maintenance={"page": "pages/down.html"})
    assert "    root /srv/piku/apps/demo;\n    try_files /pages/down.html =503;" in page
    assert "X-Piku-Maintenance" not in nginx()
    with pytest.raises(PikuError):
        nginx(maintenance={"page": "../../etc/passwd"})


# --- validation: values that would break or extend the config are refused by name --------------

@pytest.mark.parametrize("key,value", [
    ("NGINX_CLIENT_MAX_BODY_SIZE", "64m; include /etc/passwd"), ("NGINX_CLIENT_MAX_BODY_SIZE", "1t"),
    ("NGINX_CLIENT_MAX_BODY_SIZE", "-1"), ("NGINX_PROXY_READ_TIMEOUT", "10s"), ("NGINX_PROXY_READ_TIMEOUT", "0"),
    ("NGINX_PROXY_SEND_TIMEOUT", "1;"), ("NGINX_WEBSOCKET_TIMEOUT", "forever"), ("NGINX_PROXY_BUFFERING", "maybe"),
    ("NGINX_GZIP", "x"), ("NGINX_HSTS", "-1"), ("NGINX_HSTS", "1y"), ("NGINX_ALLOW", "10.0.0.0/8;deny"),
    ("NGINX_ALLOW", "example.com"), ("NGINX_ALLOW", "all"), ("NGINX_BASIC_AUTH", "ann:secret"),
    ("NGINX_BASIC_AUTH", f"ann ;:{APR1}"), ("NGINX_BASIC_AUTH", "/etc/htpasswd"),
    ("NGINX_BASIC_AUTH", "../outside/htpasswd"), ("NGINX_BASIC_AUTH", f"ann:{APR1};"),
    ("NGINX_LOG_MAXSIZE", "10M"), ("PIKU_MAINTENANCE_DURING_RELEASE", "sometimes")])
def test_bad_front_door_values_are_refused_by_name(key, value):
    with pytest.raises(PikuError, match=key):
        piku.validate_settings({key: value})


def test_good_front_door_values_pass():
    piku.validate_settings({"NGINX_CLIENT_MAX_BODY_SIZE": "512k", "NGINX_PROXY_READ_TIMEOUT": "600",
                            "NGINX_HSTS": "true", "NGINX_ALLOW": "127.0.0.1 10.0.0.0/8,[::1]",
                            "NGINX_BASIC_AUTH": f"ann:{APR1},bob:{BCRYPT},cy:{SHA512}",
                            "NGINX_SERVER_NAME": "a.test www.a.test", "NGINX_REDIRECT": "WWW.a.test:a.test"})
    assert piku.served_names({"NGINX_SERVER_NAME": "a.test www.a.test", "NGINX_REDIRECT": "WWW.a.test:a.test"}) \
        == (["a.test"], [("www.a.test", "a.test")])
    piku.validate_settings({"NGINX_BASIC_AUTH": "deploy/htpasswd"})


def test_parse_htpasswd():
    text = piku.parse_htpasswd(f"# users\nann:{APR1}\n\nbob:{BCRYPT}\n", "K")
    assert text == f"ann:{APR1}\nbob:{BCRYPT}\n"
    assert piku.parse_htpasswd(f"ann:{APR1},bob:{SHA512}", "K").count("\n") == 2
    for bad in ("", "# nothing\n", "ann:{SHA}abc=", "ann:$1$salt$hash", f"a b:{APR1}", f"ann:{APR1}\nbob:plain"):
        with pytest.raises(PikuError, match="K"):
            piku.parse_htpasswd(bad, "K")


def test_htpasswd_file_must_stay_in_the_release(tmp_path):
    release = tmp_path / "release"
    (release / "deploy").mkdir(parents=True)
    (release / "deploy" / "users").write_text(f"ann:{APR1}\n")
    os.symlink("/etc/passwd", release / "escape")
    plan = {"release_dir": str(release), "settings": {"NGINX_BASIC_AUTH": "deploy/users"}}
    assert piku.htpasswd_text(plan) == f"ann:{APR1}\n"
    for value in ("escape", "missing"):
        with pytest.raises(PikuError, match="not a file of the app's repository"):
            piku.htpasswd_text({**plan, "settings": {"NGINX_BASIC_AUTH": value}})
    assert piku.htpasswd_text({**plan, "settings": {}}) is None


# --- sockets and logs ----------------------------------------------------------------------------

def test_wsgi_socket_is_not_for_everyone():
    v = {"app": "demo", "kind": "wsgi", "index": 1, "paths": PATHS, "settings": {}, "port": 5000,
         "piku": ["/usr/bin/python3", "/srv/piku.py"], "python_plugin": "python3", "mode": "native",
         "release": "r1", "socket": "/srv/piku/nginx/demo.1.sock"}
    ini = piku.render_vassal(v)
    assert "chmod-socket = 660" in ini and "666" not in ini


def test_nginx_logs_are_capped(tmp_path):
    paths = piku.paths_for(str(tmp_path))
    piku.cap_nginx_logs(paths, "demo", 100)
    log = tmp_path / "logs" / "demo" / "nginx.access.log"
    assert log.exists() and (tmp_path / "logs" / "demo" / "nginx.error.log").exists()
    with open(log, "a") as f:  # nginx appends (O_APPEND): it goes on at the start once emptied
        f.write("x" * 150)
        f.flush()
        piku.cap_nginx_logs(paths, "demo", 100)
        f.write("new\n")
    assert log.read_text() == "new\n" and (tmp_path / "logs" / "demo" / "nginx.access.log.old").read_text() == "x" * 150
    piku.cap_nginx_logs(paths, "demo", 0)  # 0: no cap
    assert log.read_text() == "new\n"


def test_logs_show_nginx_logs_on_request(tmp_path):
    paths = piku.paths_for(str(tmp_path))
    d = tmp_path / "logs" / "demo"
    d.mkdir(parents=True)
    for name in ("web.1.log", "nginx.access.log", "nginx.error.log"):
        (d / name).write_text("x\n")
    names = lambda process: [os.path.basename(p) for p in piku.log_files(paths, "demo", process)]  # noqa: E731
    assert names(None) == ["web.1.log"]
    assert names("nginx") == ["nginx.access.log", "nginx.error.log"]
    assert names("nginx.error") == ["nginx.error.log"]


def test_maintenance_during_release_is_off_by_default(tmp_path):
    paths = piku.paths_for(str(tmp_path))
    target = piku.Target(**dict.fromkeys(piku.Target._fields))._replace(
        paths=paths, app="demo", settings={"NGINX_SERVER_NAME": "a.test"}, workers={"release": "true"},
        names=["a.test"])
    with piku.MaintenanceDuringRelease(target):
        assert piku.read_maintenance(paths, "demo") is None
    assert not os.path.exists(tmp_path / "state")


def test_maintenance_record_round_trip(tmp_path):
    paths = piku.paths_for(str(tmp_path))
    assert piku.read_maintenance(paths, "demo") is None
    piku.write_maintenance(paths, "demo", {"page": None, "since": 1, "by": "maintenance:on"})
    assert piku.read_maintenance(paths, "demo")["by"] == "maintenance:on"
    piku.write_maintenance(paths, "demo", None)
    assert piku.read_maintenance(paths, "demo") is None


def test_sockets_of_earlier_versions_are_closed_once_nginx_has_its_group(tmp_path):
    import socket
    import stat
    paths = piku.paths_for(str(tmp_path))
    os.makedirs(paths.nginx)
    socks = []
    for name in ("demo.1.sock", "demo2.1.sock"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(paths.nginx, name))
        os.chmod(os.path.join(paths.nginx, name), 0o666)
        socks.append(s)
    try:
        piku.close_app_sockets(paths, "demo")  # nginx/ without its group: left alone
        assert stat.S_IMODE(os.stat(os.path.join(paths.nginx, "demo.1.sock")).st_mode) == 0o666
        os.chmod(paths.nginx, 0o2755)
        piku.close_app_sockets(paths, "demo")
        assert stat.S_IMODE(os.stat(os.path.join(paths.nginx, "demo.1.sock")).st_mode) == 0o660
        assert stat.S_IMODE(os.stat(os.path.join(paths.nginx, "demo2.1.sock")).st_mode) == 0o666  # not demo's
    finally:
        for s in socks:
            s.close()


def test_client_puts_the_app_into_maintenance_commands():
    assert piku.plan_client_call("maintenance:on", ["--page", "down.html"], "demo") == \
        ["maintenance:on", "demo", "--page", "down.html"]
    assert piku.plan_client_call("maintenance:off", [], "demo") == ["maintenance:off", "demo"]


def test_maintenance_commands_are_allowed_over_ssh_and_need_an_app(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIKU_ROOT", str(tmp_path))
    assert {"maintenance:on", "maintenance:off"} <= piku.SSH_ALLOWED
    assert piku.main(["maintenance:on", "nope"]) == 1
    assert "no such app: nope" in capsys.readouterr().err
    assert piku.main(["maintenance:on", "../x"]) == 1
