"""Session fixture: one real piku server (sshd, uWSGI emperor, nginx) for all integration tests."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import Server


@pytest.fixture(scope="session")
def server():
    srv = Server()
    try:
        yield srv.start()
    finally:
        srv.stop()
