"""nginx-watch's wake-up: inotify on nginx/ (a deploy must not wait a polling interval)."""
import os
import threading
import time

import piku


def test_the_waiter_wakes_when_a_file_of_the_directory_is_written(tmp_path):
    wait = piku.directory_waiter(str(tmp_path))
    assert wait is not None, "inotify through libc should work on Linux"
    writer = threading.Timer(0.1, lambda: (tmp_path / "app.conf").write_text("x"))
    writer.start()
    t0 = time.monotonic()
    wait(30)
    writer.join()
    assert time.monotonic() - t0 < 15  # woken by the write, not by the 30 s timeout


def test_the_waiter_returns_at_its_timeout_when_nothing_changes(tmp_path):
    wait = piku.directory_waiter(str(tmp_path))
    t0 = time.monotonic()
    wait(0.05)
    assert time.monotonic() - t0 >= 0.05


def test_no_waiter_for_a_missing_directory(tmp_path):
    assert piku.directory_waiter(os.path.join(str(tmp_path), "nope")) is None


def test_only_an_nginx_master_named_in_the_pid_file_is_signalled(tmp_path):
    """nginx-watch sends SIGHUP itself (no second read of every certificate by `nginx -s reload`),
    but never to a process that is not an nginx master (a stale or foreign pid file)."""
    pid_file = tmp_path / "nginx.pid"
    assert piku.nginx_master_pid(str(pid_file)) is None  # missing
    pid_file.write_text(f"{os.getpid()}\n")
    assert piku.nginx_master_pid(str(pid_file)) is None  # this test is no nginx master
    pid_file.write_text("garbage\n")
    assert piku.nginx_master_pid(str(pid_file)) is None
    import subprocess
    proc = subprocess.Popen(["bash", "-c", 'exec -a "nginx: master process /usr/sbin/nginx" sleep 30'])
    try:
        pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 5
        while piku.nginx_master_pid(str(pid_file)) is None and time.monotonic() < deadline:
            time.sleep(0.01)  # (until bash has exec-ed)
        assert piku.nginx_master_pid(str(pid_file)) == proc.pid
    finally:
        proc.kill()
        proc.wait()
