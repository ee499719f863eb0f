"""Fixtures: one real piku server (sshd, uWSGI emperor, nginx) for all integration tests, and a
second one, as another user, for the tests that move an app between servers."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import USER2, Server


@pytest.fixture(scope="session")
def server():
    # PIKU_TEST_NGINX_AS=www-data: the shared server's nginx workers run as www-data, as on a real
    # install (test_install_layout.py always has such a server; this runs every test that way)
    srv = Server(nginx_as=os.environ.get("PIKU_TEST_NGINX_AS") or None)
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def second_server():
    """Another piku server on this machine (its own user PIKU_TEST_USER2, sshd, emperor and
    nginx): where `restore` puts an app backed up on `server`."""
    srv = Server(user=USER2)
    try:
        yield srv.start()
    finally:
        srv.stop()
