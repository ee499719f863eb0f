"""Fixtures: one real piku server (sshd, uWSGI emperor, nginx) for all integration tests, and a
second one, as another user, for the tests that move an app between servers."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import USER2, Server


@pytest.fixture(scope="session")
def server():
    # nginx's workers run as www-data, as on a real install: a user the piku user shares no group
    # with, reaching the sockets through the group root gives nginx/ (docs/INSTALL.md, section 5).
    # PIKU_TEST_NGINX_AS= (empty) runs them as the test user instead.
    srv = Server(nginx_as=os.environ.get("PIKU_TEST_NGINX_AS", "www-data") or None)
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
