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
