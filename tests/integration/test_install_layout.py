"""The server as docs/INSTALL.md sets it up: nginx's workers run as www-data, a user the piku
user shares no group with, and root once gives nginx/ the group www-data and the setgid bit, so
that the app sockets (0660) are nginx's to use. Every push must keep that (a push used to clear
the setgid bit: the next sockets got the piku user's group and nginx answered 502)."""
import os
import stat

import pytest

from harness import USER2, Server


@pytest.fixture(scope="module")
def www_server():
    srv = Server(user=USER2, nginx_as="www-data")
    try:
        yield srv.start()
    finally:
        srv.stop()


def test_pushes_keep_the_sockets_reachable_by_nginx_as_www_data(www_server, tmp_path):
    srv = www_server
    nginx_dir = srv.path("nginx")
    group = os.stat(nginx_dir).st_gid
    host = "layout.piku.test"
    repo = srv.deployed("uv-wsgi", "layout", tmp_path, {"ENV": srv.nginx_env(host)})
    for i in range(3):  # each push runs `setup_tree` and switches to the other slot's new socket
        srv.wait_http(srv.nginx_port, host=host, contains="uv-wsgi v1")
        st = os.stat(nginx_dir)
        assert st.st_mode & stat.S_ISGID and st.st_gid == group, oct(st.st_mode)
        sock = os.path.join(nginx_dir, srv.read_link("nginx/layout.1.live.sock"))
        assert os.stat(sock).st_gid == group and os.stat(sock).st_mode & 0o777 == 0o660
        srv.git(repo, "commit", "-q", "--allow-empty", "-m", f"again {i}")
        r = srv.push(repo, "layout")
        assert r.returncode == 0, r.stdout + srv.logs()
    srv.wait_http(srv.nginx_port, host=host, contains="uv-wsgi v1")


def test_static_files_basic_auth_and_a_web_app_work_for_nginx_as_www_data(www_server, tmp_path):
    """What else nginx's workers read or reach themselves: static files in the release, the
    basic-auth password file (0640, nginx's group), and a web process's port."""
    import base64
    import subprocess
    srv = www_server
    host = "layoutweb.piku.test"
    apr1 = subprocess.run(["openssl", "passwd", "-apr1", "s3cret"], capture_output=True, text=True,
                          check=True).stdout.strip()
    env = srv.nginx_env(host, NGINX_STATIC_PATHS="/assets/:static", NGINX_BASIC_AUTH=f"ann:{apr1}")
    srv.deployed("kinds", "layoutweb", tmp_path, {"ENV": env, "static/hello.txt": "static hello\n"})
    auth = {"Authorization": "Basic " + base64.b64encode(b"ann:s3cret").decode()}
    pw = srv.path("nginx", "layoutweb.htpasswd")
    assert os.stat(pw).st_gid == os.stat(srv.path("nginx")).st_gid and os.stat(pw).st_mode & 0o777 == 0o640
    srv.wait_http(srv.nginx_port, "/assets/hello.txt", host=host, contains="static hello", headers=auth)
    status, _ = srv.http_get(srv.nginx_port, "/assets/hello.txt", host=host)
    assert status == 401
    status, body = srv.http_get(srv.nginx_port, "/", host=host, headers=auth)
    assert status == 200, body


def test_a_push_that_nginx_could_not_follow_is_refused_with_the_fix(www_server, tmp_path):
    """nginx/ without its setgid bit (as an earlier piku.py left it at every push): the new
    socket would get the piku user's group, and nginx could not connect (502 on every request).
    The push is refused before any traffic moves, saying what root must do; the live release
    serves on; once root has done it, the push goes through."""
    srv = www_server
    nginx_dir = srv.path("nginx")
    host = "layoutfix.piku.test"
    repo = srv.deployed("uv-wsgi", "layoutfix", tmp_path, {"ENV": srv.nginx_env(host)})
    srv.wait_http(srv.nginx_port, host=host, contains="uv-wsgi v1")
    link = srv.read_link("nginx/layoutfix.1.live.sock")
    os.chmod(nginx_dir, 0o755)
    try:
        srv.git(repo, "commit", "-q", "--allow-empty", "-m", "again")
        r = srv.push(repo, "layoutfix")
        assert r.returncode != 0, r.stdout
        assert "nginx (its workers run as www-data) could not connect to layoutfix.1." in r.stdout, r.stdout
        assert f"chgrp www-data {nginx_dir} && chmod 2755 {nginx_dir}" in r.stdout, r.stdout
        assert srv.read_link("nginx/layoutfix.1.live.sock") == link
        srv.wait_http(srv.nginx_port, host=host, contains="uv-wsgi v1")
    finally:
        os.chmod(nginx_dir, 0o2755)
    r = srv.push(repo, "layoutfix")
    assert r.returncode == 0, r.stdout
    assert srv.read_link("nginx/layoutfix.1.live.sock") != link
    srv.wait_http(srv.nginx_port, host=host, contains="uv-wsgi v1")
