"""nginx-watch's reload on a real nginx: the old workers are stopped as soon as a new one is up
(nginx's master would wait 100 ms, during which the old workers take the connections), with
nothing refused, and nothing stopped when the new configuration is invalid."""
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

import piku

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answer(port, token):
    """Status nginx gives for /t/<token>: 204 under the config of that token, else 404."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET /t/{token} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        return int(s.recv(200).split()[1])


class Nginx:
    def __init__(self, d):
        assert os.path.exists(NGINX), "nginx is not installed (bash scripts/install-deps)"
        self.d, self.port = str(d), free_port()
        self.conf = os.path.join(self.d, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(f"daemon off; pid {self.d}/nginx.pid; error_log {self.d}/error.log; worker_processes 2;\n"
                    f"events {{}}\nhttp {{ access_log off; client_body_temp_path {self.d}/cb; "
                    f"proxy_temp_path {self.d}/p; fastcgi_temp_path {self.d}/f; uwsgi_temp_path {self.d}/u; "
                    f"scgi_temp_path {self.d}/s; include {self.d}/app.conf; }}\n")
        self.write(0)
        self.proc = subprocess.Popen([NGINX, "-p", self.d, "-c", self.conf, "-e", f"{self.d}/error.log"],
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while len(piku.nginx_master_workers(self.proc.pid)) < 2:
            assert time.monotonic() < deadline, open(f"{self.d}/error.log").read()
            time.sleep(0.01)

    def write(self, token, broken=False):
        text = (f"server {{ listen 127.0.0.1:{self.port}; location = /t/{token} {{ return 204; }} "
                f"location / {{ return 404; }} }}\n") + ("this is not nginx;\n" if broken else "")
        with open(os.path.join(self.d, "app.conf.tmp"), "w") as f:
            f.write(text)
        os.rename(os.path.join(self.d, "app.conf.tmp"), os.path.join(self.d, "app.conf"))

    def workers(self):
        return piku.nginx_master_workers(self.proc.pid)

    def stop(self):
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def nginx(tmp_path):
    n = Nginx(tmp_path)
    yield n
    n.stop()


def titles(pids):
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = f.read().split(b"\0")[0].decode()
        except OSError:
            out[pid] = "gone"
    return out


class Loop(threading.Thread):
    """New connections to nginx one after another; counts what was not an HTTP answer."""
    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.done, self.answers, self.failed = port, threading.Event(), 0, []

    def run(self):
        while not self.done.is_set():
            try:
                answer(self.port, "loop")
                self.answers += 1
            except OSError as e:
                self.failed.append(repr(e))

    def stop(self):
        self.done.set()
        self.join(10)


def test_the_old_workers_stop_as_soon_as_a_new_one_is_up(nginx):
    loop = Loop(nginx.port)
    loop.start()
    try:
        for token in range(1, 6):
            old = nginx.workers()
            nginx.write(token)
            assert piku.reload_nginx_master(nginx.proc.pid) is True
            # Freeze the master: from now on only what reload_nginx_master sent can stop the old
            # workers (the master's own signal would come 100 ms after the new ones started).
            os.kill(nginx.proc.pid, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 10
                while any(t.startswith("nginx: worker process") and "shutting down" not in t
                          for t in titles(old).values()):
                    assert time.monotonic() < deadline, f"old workers still take connections: {titles(old)}"
                    time.sleep(0.01)
                assert answer(nginx.port, token) == 204  # only the new workers accept now
            finally:
                os.kill(nginx.proc.pid, signal.SIGCONT)
            wait_workers(nginx, 2)  # (the master forks the rest of the new ones once it runs again)
        time.sleep(0.3)
    finally:
        loop.stop()
    assert loop.failed == [] and loop.answers > 50
    deadline = time.monotonic() + 10
    while len(nginx.workers()) != 2:  # the master respawned none of the old workers
        assert time.monotonic() < deadline, titles(nginx.workers())
        time.sleep(0.05)
    time.sleep(0.3)
    assert len(nginx.workers()) == 2


def wait_workers(nginx, count):
    """Until the master has `count` workers that are not shutting down."""
    deadline = time.monotonic() + 10
    while sum("shutting down" not in t for t in titles(nginx.workers()).values()) != count:
        assert time.monotonic() < deadline, titles(nginx.workers())
        time.sleep(0.01)


def test_an_invalid_config_stops_nothing(nginx):
    old = nginx.workers()
    nginx.write(1, broken=True)
    assert piku.reload_nginx_master(nginx.proc.pid, timeout=1.0) is False
    assert nginx.workers() == old
    assert all(t == "nginx: worker process" for t in titles(old).values())
    assert answer(nginx.port, 0) == 204  # the old config still serves


def test_workers_are_the_masters_own(nginx, tmp_path_factory):
    other = Nginx(tmp_path_factory.mktemp("other"))
    try:
        assert nginx.workers() and other.workers() and not nginx.workers() & other.workers()
        assert piku.nginx_master_workers(os.getpid()) == set()
    finally:
        other.stop()
