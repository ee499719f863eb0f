"""Orchestration on a temporary PIKU_ROOT (no sshd, no uWSGI): what deploys leave on disk."""
import os
import subprocess
import sys
import time

import pytest

import piku


def make_releases(root, app, n):
    paths = piku.paths_for(str(root))
    base = os.path.join(paths.releases, app)
    dirs = []
    for i in range(n):
        d = os.path.join(base, f"r{i}")
        os.makedirs(d)
        os.utime(d, (time.time() - 100 + i, time.time() - 100 + i))
        dirs.append(d)
    os.makedirs(paths.apps, exist_ok=True)
    os.symlink(dirs[-1], os.path.join(paths.apps, app))
    return paths, dirs


def test_prune_keeps_the_newest_and_the_live_release(tmp_path):
    paths, dirs = make_releases(tmp_path, "demo", 5)
    piku.prune_releases(paths, "demo", 2)
    assert sorted(os.listdir(os.path.join(paths.releases, "demo"))) == ["r3", "r4"]


def test_prune_never_removes_a_release_a_process_works_in(tmp_path):
    """Issue 9: a uWSGI master kept by chain reloads (or a worker that was not restarted) sits in
    the release it started in; removing that directory breaks every worker it forks later."""
    paths, dirs = make_releases(tmp_path, "demo", 4)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=dirs[0])
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{proc.pid}/cwd") != os.path.realpath(dirs[0]) and time.monotonic() < deadline:
            time.sleep(0.01)
        piku.prune_releases(paths, "demo", 1)
        assert sorted(os.listdir(os.path.join(paths.releases, "demo"))) == ["r0", "r3"]
    finally:
        proc.kill()
        proc.wait()
    piku.prune_releases(paths, "demo", 1)  # once nothing runs there, it goes
    assert sorted(os.listdir(os.path.join(paths.releases, "demo"))) == ["r3"]


def test_an_asgi_app_called_as_wsgi_is_recognised_in_the_log():
    assert piku.looks_asgi("TypeError: application() missing 1 required positional argument: 'send'")
    assert piku.looks_asgi("TypeError: app() missing 2 required positional arguments: 'receive' and 'send'")
    assert not piku.looks_asgi("TypeError: f() missing 1 required positional argument: 'x'")


def snapshot(root):
    """{relative path: ('file', bytes, mode) | ('link', target) | ('dir',)} of a tree."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir",)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read(), os.stat(p).st_mode & 0o7777)
    return out


def populated(tmp_path):
    paths = piku.paths_for(str(tmp_path / "root"))
    for d in (paths.uwsgi_enabled, paths.nginx, os.path.join(paths.state, "demo"), paths.apps,
              os.path.join(paths.envs, "demo"), os.path.join(paths.releases, "demo", "r1"),
              os.path.join(paths.releases, "demo", "r2")):
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(paths.nginx, "demo.conf"), "w") as f:
        f.write("old conf\n")
    with open(os.path.join(paths.uwsgi_enabled, "demo_wsgi.1.a.ini"), "w") as f:
        f.write("[uwsgi]\nold\n")
    with open(os.path.join(paths.envs, "demo", "LIVE_ENV"), "w") as f:
        f.write("A=1\n")
    os.chmod(os.path.join(paths.envs, "demo", "LIVE_ENV"), 0o600)
    os.symlink(os.path.join(paths.releases, "demo", "r1"), os.path.join(paths.apps, "demo"))
    return paths


def apply_changes(paths, tx):
    tx.write(os.path.join(paths.nginx, "demo.conf"), "new conf\n")
    tx.write(os.path.join(paths.uwsgi_enabled, "demo_wsgi.1.b.ini"), "[uwsgi]\nnew\n")
    tx.remove(os.path.join(paths.uwsgi_enabled, "demo_wsgi.1.a.ini"))
    tx.write(os.path.join(paths.envs, "demo", "LIVE_ENV"), "A=2\n", 0o600)
    tx.link(os.path.join(paths.apps, "demo"), os.path.join(paths.releases, "demo", "r2"))
    tx.link(os.path.join(paths.envs, "demo", "bin"), ".live/bin")


def test_a_transaction_rolled_back_restores_every_file_byte_for_byte(tmp_path):
    paths = populated(tmp_path)
    before = snapshot(paths.root)
    tx = piku.Transaction(paths, "demo")
    apply_changes(paths, tx)
    assert snapshot(paths.root) != before
    assert os.path.exists(os.path.join(paths.state, "demo", "switch.journal"))
    tx.rollback()
    assert snapshot(paths.root) == before


def test_a_transaction_cut_off_by_a_kill_is_undone_by_the_next_operation(tmp_path):
    """Only the journal on disk survives a kill -9: recover() replays it."""
    paths = populated(tmp_path)
    before = snapshot(paths.root)
    apply_changes(paths, piku.Transaction(paths, "demo"))  # (never committed nor rolled back)
    piku.recover(paths, "demo")
    assert snapshot(paths.root) == before


def test_a_committed_transaction_keeps_its_changes_and_drops_its_journal(tmp_path):
    paths = populated(tmp_path)
    tx = piku.Transaction(paths, "demo")
    apply_changes(paths, tx)
    after = snapshot(paths.root)
    tx.commit()
    after.pop(os.path.join("state", "demo", "switch.journal"))
    assert snapshot(paths.root) == after
    piku.recover(paths, "demo")  # nothing to undo
    assert snapshot(paths.root) == after


def test_recover_stops_the_workers_of_a_slot_that_never_went_live(tmp_path):
    paths = populated(tmp_path)
    with open(os.path.join(paths.state, "demo", "live.json"), "w") as f:
        f.write('{"release": "r1", "slot": "a"}\n')
    for name in ("demo_wsgi.1.b.ini", "demo_worker.1.ini"):
        with open(os.path.join(paths.uwsgi_enabled, name), "w") as f:
            f.write(f"[uwsgi]\nchdir = {paths.releases}/demo/r2\n")
    with open(os.path.join(paths.uwsgi_enabled, "demo_wsgi.1.a.ini"), "w") as f:
        f.write(f"[uwsgi]\nchdir = {paths.releases}/demo/r1\n")
    piku.recover(paths, "demo")
    assert sorted(os.listdir(paths.uwsgi_enabled)) == ["demo_worker.1.ini", "demo_wsgi.1.a.ini"]


def test_operations_and_kinds_tables_cover_every_recipe_and_kind():
    assert set(piku.OPERATIONS) >= {"deploy", "rollback", "reconfigure", "restart", "scale"}
    assert piku.OPERATIONS["deploy"].build and not piku.OPERATIONS["rollback"].build
    assert piku.OPERATIONS["rollback"].new_code and not piku.OPERATIONS["reconfigure"].new_code
    for kind in ("wsgi", "web", "worker", "cron1", "static", "release"):
        assert piku.kind_of(kind) in piku.KINDS.values()


def serve_status(status):
    """A loopback HTTP server answering every GET with `status`: (port, stop)."""
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"Traceback: boom\n")

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True).start()
    return srv.server_address[1], srv.shutdown


def health_target(tmp_path, **settings):
    settings = {"PIKU_HEALTH_TIMEOUT": "30", **settings}
    return piku.Target(*[None] * 20)._replace(settings=settings, names=[], env={"PORT": "1"})


def test_an_app_that_raises_on_every_request_fails_its_check_before_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(piku, "FAILING_500_SECONDS", 0.05)
    port, stop = serve_status(500)
    log = tmp_path / "web.1.log"
    log.write_text("")
    try:
        check = piku.Check("web.1", "web", str(log), 0, ("http", "127.0.0.1", port), False)
        why = piku.health_check(health_target(tmp_path), [check])
    finally:
        stop()
    assert why.startswith("web.1: GET / answered 500") and "in a row" in why, why
    assert "Traceback: boom" in why  # the body's first lines


def test_a_timeout_reports_the_last_answer_not_a_later_connection_error(tmp_path, monkeypatch):
    port, stop = serve_status(503)
    log = tmp_path / "web.1.log"
    log.write_text("")
    check = piku.Check("web.1", "web", str(log), 0, ("http", "127.0.0.1", port), False)
    t = health_target(tmp_path, PIKU_HEALTH_TIMEOUT="1")
    calls = []
    real = piku.probe

    def probe(t, c, fresh):  # the app answers once, then stops listening
        calls.append(1)
        if len(calls) == 2:
            stop()
        return real(t, c, fresh) if len(calls) < 2 else (False, "no answer yet (Connection refused)")
    monkeypatch.setattr(piku, "probe", probe)
    import time
    clock = iter(range(0, 10**6, 400))  # ms: each look at the clock is 0.4 s later; no real waiting
    monkeypatch.setattr(time, "monotonic", lambda: next(clock) / 1000)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    why = piku.health_check(t, [check])
    monkeypatch.undo()
    assert why == "web.1: GET / answered 503: Traceback: boom, after 1s (PIKU_HEALTH_TIMEOUT)", why


def test_a_switch_moves_wsgi_traffic_by_replacing_the_links_nginx_connects_to(tmp_path):
    """The links nginx's (unchanged) conf names point at the target slot's sockets; instances
    beyond the target's count lose theirs; a rollback puts every link back."""
    import socket
    paths = populated(tmp_path)
    socks = []
    for slot in ("a", "b"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(paths.nginx, f"demo.1.{slot}.sock"))
        s.listen(1)
        socks.append(s)
    os.symlink("demo.1.a.sock", piku.live_socket_link(paths, "demo", 1))
    os.symlink("demo.2.a.sock", piku.live_socket_link(paths, "demo", 2))
    links = lambda: sorted((n, os.readlink(os.path.join(paths.nginx, n)))  # noqa: E731
                           for n in os.listdir(paths.nginx) if os.path.islink(os.path.join(paths.nginx, n)))
    before = links()
    t = piku.Target(paths, "demo", *[None] * 5, None, "b", *[None] * 11)._replace(scaling={"wsgi": 1})
    tx = piku.Transaction(paths, "demo")
    piku.point_live_links(t, tx)
    assert os.readlink(os.path.join(paths.nginx, "demo.1.live.sock")) == "demo.1.b.sock"
    assert not os.path.lexists(os.path.join(paths.nginx, "demo.2.live.sock"))
    with socket.socket(socket.AF_UNIX) as c:  # a connection through the link reaches slot b
        c.connect(piku.live_socket_link(paths, "demo", 1))
        conn, _ = socks[1].accept()
        conn.close()
    tx.rollback()
    assert links() == before == [("demo.1.live.sock", "demo.1.a.sock"), ("demo.2.live.sock", "demo.2.a.sock")]
    for s in socks:
        s.close()


def test_a_failed_switch_shows_why_the_new_workers_failed_not_the_live_ones_requests(tmp_path):
    paths = piku.paths_for(str(tmp_path))
    os.makedirs(os.path.join(paths.logs, "demo"))
    request = ("[pid: 41|app: 0|req: {n}/{n}] 127.0.0.1 () {{34 vars in 430 bytes}} [Mon Nov 30 21:57:50 2026] "
               "GET / => generated 19 bytes in 1 msecs (HTTP/1.1 200) 1 headers in 45 bytes (1 switches on core 0)")
    lines = ["*** Operational MODE: preforking ***", "Traceback (most recent call last):",
             "RuntimeError: broken on purpose"]
    with open(os.path.join(paths.logs, "demo", "wsgi.1.log"), "w") as f:
        for i, line in enumerate(lines):
            f.write("\n".join(request.format(n=i * 10 + k) for k in range(10)) + "\n" + line + "\n")
        f.write(request.format(n=99) + "\n")
    assert piku.worker_log_tail(paths, "demo") == [f"wsgi.1: {l}" for l in lines[1:]]  # (uWSGI's banner goes too)


def test_setup_and_every_push_keep_the_setgid_bit_root_gave_nginx_dir(tmp_path):
    """docs/INSTALL.md has root run `chgrp www-data nginx && chmod 2755 nginx` once, so that app
    sockets get nginx's group. setup_tree runs at every push: it must not clear that bit (it did,
    and nginx then answered 502: Permission denied on the sockets)."""
    import pwd
    import tempfile
    nobody = pwd.getpwnam("nobody")
    base = tempfile.mkdtemp(prefix="piku-setgid-")  # (tmp_path is root's, 0700: nobody could not enter)
    try:
        os.chmod(base, 0o755)
        paths = piku.paths_for(os.path.join(base, "root"))
        piku.setup_tree(paths)
        for d, _, names in os.walk(paths.root):
            for path in [d] + [os.path.join(d, n) for n in names]:
                os.lchown(path, nobody.pw_uid, 0)  # (group root: a group the piku user is not in)
        os.chmod(paths.nginx, 0o2755)
        os.chmod(paths.apps, 0o700)
        pid = os.fork()
        if pid == 0:  # as the piku user (here: nobody), as at every push; Linux clears S_ISGID at its chmod
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                piku.setup_tree(paths)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.stat(paths.nginx).st_mode & 0o7777 == 0o2755
        assert os.stat(paths.apps).st_mode & 0o7777 == 0o755  # (what needs a chmod still gets it)
    finally:
        import shutil
        shutil.rmtree(base, ignore_errors=True)


def test_who_may_connect_to_a_socket():
    st = os.stat_result((0o140660, 0, 0, 1, 1000, 33, 0, 0, 0, 0))  # a socket 0660, owner 1000, group 33
    assert piku.socket_reachable_by(st, 1000, {1000})  # its owner
    assert piku.socket_reachable_by(st, 33, {33})  # in its group (www-data)
    assert piku.socket_reachable_by(st, 0, set())  # root
    assert not piku.socket_reachable_by(st, 1001, {1001})  # another user
    world = os.stat_result((0o140666, 0, 0, 1, 1000, 1000, 0, 0, 0, 0))  # (0666: older piku.py versions)
    assert piku.socket_reachable_by(world, 33, {33})


def test_the_sockets_listening_on_a_port_are_counted():
    """stop_old waits on this until only the new masters listen on a shared PORT."""
    import socket
    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    first.bind(("127.0.0.1", 0))
    first.listen()
    port = first.getsockname()[1]
    second = socket.socket()
    second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    second.bind(("127.0.0.1", port))
    assert len(piku.listen_sockets(port)) == 1  # (bound, not listening yet)
    second.listen()
    assert len(piku.listen_sockets(port)) == 2
    first.close()
    assert len(piku.listen_sockets(port)) == 1
    second.close()
    assert len(piku.listen_sockets(port)) == 0


def test_unix_queued_counts_connections_no_worker_has_accepted(tmp_path):
    """stop_old lets old wsgi workers take what waits in their sockets' queues before they stop:
    the count comes from /proc/net/unix, on real sockets."""
    import socket
    path, other = str(tmp_path / "app.1.a.sock"), str(tmp_path / "app.1.b.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    quiet = socket.socket(socket.AF_UNIX)
    quiet.bind(other)
    quiet.listen(8)
    clients = []
    try:
        assert piku.unix_queued(piku.read_text("/proc/net/unix"), {path}) == 0
        for _ in range(3):
            c = socket.socket(socket.AF_UNIX)
            c.connect(path)
            clients.append(c)
        text = piku.read_text("/proc/net/unix")
        assert piku.unix_queued(text, {path}) == 3
        assert piku.unix_queued(text, {other}) == 0
        accepted, _ = listener.accept()
        assert piku.unix_queued(piku.read_text("/proc/net/unix"), {path}) == 2
        accepted.close()
    finally:
        for s in clients + [listener, quiet]:
            s.close()


def test_web_router_links_move_to_the_target_slot_and_extra_ones_go(tmp_path):
    """A routed web app (Target.router): its links, web<n>.live.sock, point at the target slot's
    routers; a link of an instance the target does not have is removed; wsgi links of the same
    app, and the links of an app whose name starts alike, are left alone; rollback restores them."""
    paths = populated(tmp_path)
    for name, target in (("demo.web1.live.sock", "demo.web1.a.sock"), ("demo.web2.live.sock", "demo.web2.a.sock"),
                         ("demo.web3.live.sock", "demo.web3.a.sock"), ("demo.web.1.live.sock", "x")):
        os.symlink(target, os.path.join(paths.nginx, name))
    t = piku.Target(**dict.fromkeys(piku.Target._fields))._replace(
        paths=paths, app="demo", slot="b", scaling={"web": 2}, router=True)
    tx = piku.Transaction(paths, "demo")
    piku.point_live_links(t, tx)
    assert os.readlink(os.path.join(paths.nginx, "demo.web1.live.sock")) == "demo.web1.b.sock"
    assert os.readlink(os.path.join(paths.nginx, "demo.web2.live.sock")) == "demo.web2.b.sock"
    assert not os.path.lexists(os.path.join(paths.nginx, "demo.web3.live.sock"))
    assert os.readlink(os.path.join(paths.nginx, "demo.web.1.live.sock")) == "x"  # (app "demo.web", wsgi)
    tx.rollback()
    assert os.readlink(os.path.join(paths.nginx, "demo.web3.live.sock")) == "demo.web3.a.sock"
    assert os.readlink(os.path.join(paths.nginx, "demo.web1.live.sock")) == "demo.web1.a.sock"
    piku.point_live_links(t._replace(router=False), tx)  # (PIKU_WEB_ROUTER=false: no web link stays)
    assert not [n for n in os.listdir(paths.nginx) if n.startswith("demo.web") and n[8].isdigit()]


def test_router_sockets_never_take_a_wsgi_sockets_name():
    paths = piku.paths_for("/r")
    web = {os.path.basename(piku.router_socket(paths, app, n, s)) for app in ("a", "a.1", "a.web1")
           for n in (1, 2) for s in ("a", "b", "live")}
    wsgi = {os.path.basename(piku.live_socket_link(paths, app, n)) for app in ("a", "a.1", "a.web1", "a.web")
            for n in (1, 2)}
    assert not web & wsgi and len(web) == 18


def test_unix_connections_count_accepted_and_waiting_ones_not_the_listener(tmp_path):
    import socket
    text = ("Num       RefCount Protocol Flags    Type St Inode Path\n"
            "0000000000000001: 00000003 00000000 00000000 0001 02     0 /r/nginx/a.web1.a.sock\n"
            "0000000000000002: 00000002 00000000 00010000 0001 01 8243139 /r/nginx/a.web1.a.sock\n"
            "0000000000000003: 00000003 00000000 00000000 0001 03 8243145 /r/nginx/a.web1.a.sock\n"
            "0000000000000004: 00000003 00000000 00000000 0001 03 8243146 /r/nginx/a.web1.b.sock\n"
            "0000000000000005: 00000002 00000000 00000000 0002 01 1234\n")
    assert piku.unix_connections(text, {"/r/nginx/a.web1.a.sock"}) == 2
    assert piku.unix_connections(text, {"/r/nginx/a.web1.a.sock", "/r/nginx/a.web1.b.sock"}) == 3
    assert piku.unix_connections(text, set()) == 0
    path = os.path.join(str(tmp_path), "r.sock")  # and on the real table
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(4)
        assert piku.unix_connections(piku.read_text("/proc/net/unix"), {path}) == 0
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            assert piku.unix_connections(piku.read_text("/proc/net/unix"), {path}) == 1
            conn, _ = listener.accept()
            assert piku.unix_connections(piku.read_text("/proc/net/unix"), {path}) == 1
            conn.close()
        assert piku.unix_connections(piku.read_text("/proc/net/unix"), {path}) == 0


def test_unix_queued_parses_the_proc_table():
    text = ("Num       RefCount Protocol Flags    Type St Inode Path\n"
            "0000000000000001: 00000003 00000000 00000000 0001 02     0 /r/nginx/a.1.a.sock\n"
            "0000000000000002: 00000002 00000000 00010000 0001 01 8243139 /r/nginx/a.1.a.sock\n"
            "0000000000000003: 00000003 00000000 00000000 0001 03 8243145 /r/nginx/a.1.a.sock\n"
            "0000000000000004: 00000003 00000000 00000000 0001 02     0 /r/nginx/b.1.a.sock\n"
            "0000000000000005: 00000002 00000000 00000000 0002 01 1234\n")
    assert piku.unix_queued(text, {"/r/nginx/a.1.a.sock"}) == 1
    assert piku.unix_queued(text, set()) == 0


def test_listen_queues_count_connections_not_yet_accepted():
    """stop_old lets an old web command take what waits in its port's queue before it stops:
    netlink and /proc/net/tcp give the same figures, on real sockets."""
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    clients = []
    try:
        assert piku.listen_queues(port) == [0]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        assert [q for _, q in piku.diag_listen_sockets(port)] == [2]
        assert [q for _, q in piku.parse_listen_sockets(piku.read_text("/proc/net/tcp"), port)] == [2]
        listener.accept()[0].close()
        assert piku.listen_queues(port) == [1]
    finally:
        for s in clients + [listener]:
            s.close()
    assert piku.listen_queues(port) == []


def test_parse_listen_sockets_reads_listening_sockets_of_the_port():
    text = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
            "   0: 0100007F:BB53 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 1\n"
            "   1: 0100007F:BB53 0100007F:D000 06 00000000:00000000 03:00000100 00000000     0        0 0\n"
            "   2: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2\n")
    assert [q for _, q in piku.parse_listen_sockets(text, 0xBB53)] == [3]
    assert [q for _, q in piku.parse_listen_sockets(text, 80)] == [0]
    assert [q for _, q in piku.parse_listen_sockets(text, 81)] == []


def test_nginx_drained_waits_for_old_workers_and_quiesced_for_shutting_down_ones(monkeypatch):
    """The wait before an old web command stops: an nginx worker started before the conf was
    written still takes requests until it is shutting down (quiesced), or has exited."""
    now = time.time()
    table = {"workers": []}
    monkeypatch.setattr(piku, "nginx_workers", lambda: list(table["workers"]))
    new = (11, 10, now + 0.5, b"nginx: worker process")
    old = (9, 10, now - 60, b"nginx: worker process")
    old_quitting = (9, 10, now - 60, b"nginx: worker process is shutting down")
    other_nginx = (20, 19, now - 60, b"nginx: worker process")  # (another nginx, not reloaded)

    def took(**kw):
        t0 = time.monotonic()
        piku.nginx_drained(now, 0.3, **kw)
        return time.monotonic() - t0

    table["workers"] = [new, old, other_nginx]
    assert took(quiesced=True) >= 0.25 and took() >= 0.25  # an old worker takes requests
    table["workers"] = [new, old_quitting, other_nginx]
    assert took(quiesced=True) < 0.1  # it takes no new connection
    assert took() >= 0.25  # drained (not quiesced) waits until it has exited
    table["workers"] = [new, other_nginx]
    assert took() < 0.1


def test_a_failed_health_check_shows_the_cause_not_uwsgis_banner():
    """gunicorn's own traceback as it gives up fills the tail: the exception line that says why
    comes first; uWSGI's start-up banner and request lines are left out."""
    log = ["*** Starting uWSGI 2.0.21 (64bit) on [Tue Dec  1 01:15:39 2026] ***",
           "detected binary path: /usr/bin/uwsgi-core", "your memory page size is 4096 bytes",
           "!!!!!!!!!!!!!! WARNING !!!!!!!!!!!!!!", "no request plugin is loaded, you will not be able to manage requests.",
           "spawned uWSGI master process (pid: 14414)", "uWSGI rawrouter bound on /r/nginx/app.web1.a.sock fd 6",
           "spawned uWSGI rawrouter 1 (pid: 14415)",
           '[uwsgi-daemons] spawning "exec python3 piku-launch.py piku piku.py exec-worker app web 1" (uid: 1 gid: 1)',
           "[2026-12-01 01:15:40 +0000] [14560] [ERROR] Exception in worker process", "Traceback (most recent call last):",
           '  File "<frozen importlib._bootstrap>", line 1140, in _find_and_load_unlocked',
           "ModuleNotFoundError: No module named 'nosuchmodule'",
           "[pid: 9|app: 0|req: 1/1] 127.0.0.1 () {30 vars in 300 bytes} [Tue Dec  1] GET / => generated 20 bytes in 0 msecs",
           ] + [f'  File "arbiter.py", line {n}, in run' for n in range(20)] + [
           "gunicorn.errors.HaltServer: <HaltServer 'Worker failed to boot.' 3>",
           "*** no app loaded. GAME OVER ***"]
    shown = piku.pick_log_lines(log, 5)
    assert shown[:2] == ["ModuleNotFoundError: No module named 'nosuchmodule'", "..."]
    assert shown[-2:] == ["gunicorn.errors.HaltServer: <HaltServer 'Worker failed to boot.' 3>",
                          "*** no app loaded. GAME OVER ***"]
    assert len(shown) == 7
    assert not any("uWSGI" in l or "uwsgi-daemons" in l or "generated" in l for l in shown)
    # nothing earlier to add when the cause is in the tail already
    assert piku.pick_log_lines(["x", "ValueError: bad", "y"], 5) == ["x", "ValueError: bad", "y"]


def test_a_failed_switch_shows_only_the_new_workers_logs_from_when_they_started(tmp_path):
    """With the health check's checks, the tail reads each started worker's log from where it
    ended at the start: not an instance scaled away earlier (web.2), not the same instance's
    earlier failures; a log rotated meanwhile is read from its start."""
    paths = piku.paths_for(str(tmp_path))
    d = os.path.join(paths.logs, "demo")
    os.makedirs(d)
    with open(os.path.join(d, "web.2.log"), "w") as f:
        f.write("[INFO] Shutting down: Master\n")
    old = "ImportError: an earlier release's failure\n"
    with open(os.path.join(d, "web.1.log"), "w") as f:
        f.write(old)
    check = piku.Check("web.1", "web", os.path.join(d, "web.1.log"), len(old), None, False)
    with open(check.log, "a") as f:
        f.write("Traceback (most recent call last):\nModuleNotFoundError: No module named 'nosuchmodule'\n")
    assert piku.worker_log_tail(paths, "demo", checks=[check]) == [
        "web.1: Traceback (most recent call last):", "web.1: ModuleNotFoundError: No module named 'nosuchmodule'"]
    assert any(l.startswith("web.2:") for l in piku.worker_log_tail(paths, "demo"))  # (without checks: every log)
    with open(check.log, "w") as f:  # rotated: shorter than the offset
        f.write("OSError: new\n")
    assert piku.worker_log_tail(paths, "demo", checks=[check]) == ["web.1: OSError: new"]


def test_listen_sockets_name_each_listener_by_its_inode():
    """A switch on a shared PORT waits until the sockets that listened before the new masters
    started are gone, whatever the new ones hold (a pyuwsgi and a native master hold different
    counts): netlink and /proc/net/tcp name them by the same inode."""
    import socket
    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    first.bind(("127.0.0.1", 0))
    first.listen()
    port = first.getsockname()[1]
    held = {inode for inode, _ in piku.listen_sockets(port)}
    assert held == {os.fstat(first.fileno()).st_ino}
    second = socket.socket()
    second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    second.bind(("127.0.0.1", port))
    second.listen()
    both = piku.diag_listen_sockets(port)
    assert sorted(both) == sorted(piku.parse_listen_sockets(piku.read_text("/proc/net/tcp"), port))
    assert {inode for inode, _ in both} == held | {os.fstat(second.fileno()).st_ino}
    first.close()
    assert not held & {inode for inode, _ in piku.listen_sockets(port)}
    second.close()


def test_a_socket_from_before_the_switch_that_outlives_the_graceful_stop_is_killed_with_its_process(capsys):
    """A process of the app that still listens on the shared PORT with an old socket after the
    graceful stop is found by the socket's inode and killed, and the push says so; another
    app's process that holds one is left alone."""
    import socket
    import types
    code = ("import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1);"
            "s.bind(('127.0.0.1',int(sys.argv[1])));s.listen();import os;print(os.fstat(s.fileno()).st_ino,flush=True);"
            "import time;time.sleep(60)")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    old = subprocess.Popen(["shop:wsgi.1 uWSGI worker 1", "-c", code, str(port)], executable=sys.executable,
                           stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen(["cafe:wsgi.1 uWSGI worker 1", "-c", code, str(port)], executable=sys.executable,
                             stdout=subprocess.PIPE, text=True)
    try:
        old_inode, other_inode = int(old.stdout.readline()), int(other.stdout.readline())
        assert piku.socket_holders({old_inode}) == {old.pid: (f"shop:wsgi.1 uWSGI worker 1 -c {code} {port}", {old_inode: 3})}
        piku.stop_stale_listeners(types.SimpleNamespace(app="shop"), port, {old_inode, other_inode})
        assert old.wait(5) == -9
        assert other.poll() is None
        assert {inode for inode, _ in piku.listen_sockets(port)} == {other_inode}
        err = capsys.readouterr().err
        assert f"still listened on PORT {port}" in err and f"(pid {old.pid})" in err and str(other.pid) not in err
    finally:
        for proc in (old, other):
            proc.kill()
            proc.wait()


def test_a_busy_old_worker_s_socket_on_the_shared_port_is_shut_and_the_worker_lives_on():
    """An old worker still busy with a request keeps its socket on the shared PORT: piku takes a
    copy of the socket from it and shuts it down. The socket stops listening (new connections go
    to the new release's), while the process and the connection it has live on. Another app's
    socket is left alone."""
    import socket
    import types
    code = ("import socket,sys,os;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1);"
            "s.bind(('127.0.0.1',0));s.listen();print(os.fstat(s.fileno()).st_ino,s.getsockname()[1],flush=True);"
            "c,_=s.accept();print('accepted',flush=True);sys.stdin.readline();c.sendall(b'finished');sys.stdin.readline()")
    procs = [subprocess.Popen([f"{app}:wsgi.1 uWSGI worker 1", "-c", code], executable=sys.executable,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for app in ("shop", "cafe")]
    try:
        (shop_inode, shop_port), (cafe_inode, cafe_port) = (map(int, p.stdout.readline().split()) for p in procs)
        client = socket.create_connection(("127.0.0.1", shop_port), timeout=5)  # (in flight on the shop worker)
        assert procs[0].stdout.readline() == "accepted\n"
        assert piku.shut_listeners(types.SimpleNamespace(app="shop"), {shop_inode, cafe_inode}) == {shop_inode}
        assert piku.listen_sockets(shop_port) == [] and [i for i, _ in piku.listen_sockets(cafe_port)] == [cafe_inode]
        procs[0].stdin.write("answer\n")
        procs[0].stdin.flush()
        assert client.recv(20) == b"finished"  # (the connection it had was served to the end)
        assert all(p.poll() is None for p in procs)
        client.close()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_dehydrated_keeps_its_temporary_files_in_piku_s_own_folder(tmp_path):
    """dehydrated leaves empty temporary files behind (two a run, in /tmp): it gets a TMPDIR of
    piku's, private, removed after each run."""
    paths = piku.paths_for(str(tmp_path / "piku"))
    fake = tmp_path / "dehydrated"
    fake.write_text('#!/bin/sh\nmktemp "$TMPDIR/dehydrated-XXXXXX" > "$TMPDIR/../seen"\n'
                    'out=; while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done\n'
                    'mkdir -p "$out/shop" && echo CERT > "$out/shop/fullchain.pem" && echo KEY > "$out/shop/privkey.pem"\n')
    fake.chmod(0o755)
    plan = {"paths": paths, "app": "shop", "settings": {}}
    assert piku.issue_with_dehydrated(plan, str(fake), ["shop.test"], "https://ca.test/dir") == ("CERT\n", "KEY\n")
    base = os.path.join(paths.state, "_acme", "dehydrated")
    seen = open(os.path.join(base, "seen")).read().strip()
    assert seen.startswith(base + "/tmp-") and not os.path.exists(os.path.dirname(seen))


def test_rollback_by_default_goes_to_the_release_that_served_before_the_live_one(tmp_path):
    """`rollback APP`: the `previous` release (a second rollback undoes the first), even when
    releases below it in the list went live earlier; failed ones never count; with the previous
    one's code pruned, the newest release below the live one that went live."""
    import json
    paths = piku.paths_for(str(tmp_path / "root"))
    records = []
    for rid, status in (("r5", "failed"), ("r4", "live"), ("r3", "old"), ("r2", "old"), ("r1", "previous")):
        d = os.path.join(paths.releases, "demo", rid)
        os.makedirs(d)
        records.append({"id": rid, "status": status, "dir": d, "rev": rid * 5})
    piku.save_manifest(paths, "demo", records)
    with open(os.path.join(paths.state, "demo", "live.json"), "w") as f:
        json.dump({"release": "r4", "slot": "a"}, f)
    assert piku.rollback_release(paths, "demo", None).id == "r1"
    assert piku.rollback_release(paths, "demo", "r2").id == "r2"
    with pytest.raises(piku.PikuError, match="never went live"):
        piku.rollback_release(paths, "demo", "r5")
    import shutil
    shutil.rmtree(os.path.join(paths.releases, "demo", "r1"))
    assert piku.rollback_release(paths, "demo", None).id == "r3"


@pytest.mark.parametrize("env,why", [("PORT=6000\n", "PORT gives them all the same one"),
                                     ("PIKU_PREBOOT=false\n", "PIKU_PREBOOT=false restarts a single one")])
def test_web_scaled_past_one_behind_nginx_needs_a_port_per_process(tmp_path, env, why):
    paths = piku.paths_for(str(tmp_path))
    piku.setup_tree(paths)
    release = os.path.join(paths.releases, "webn", "r1")
    os.makedirs(release)
    with open(os.path.join(release, "Procfile"), "w") as f:
        f.write("web: python3 -m http.server --bind $BIND_ADDRESS $PORT\n")
    with open(os.path.join(release, "ENV"), "w") as f:
        f.write("NGINX_SERVER_NAME=webn.test\n" + env)
    r = piku.Release(*[None] * len(piku.Release._fields))._replace(id="r1", dir=release)
    with pytest.raises(piku.PikuError) as e:
        piku.plan_target(paths, "webn", r, {"PATH": os.defpath, "HOME": str(tmp_path)}, piku.OPERATIONS["scale"], {"web": 2})
    assert str(e.value).startswith("web=2: each web process needs a port of its own behind nginx") and why in str(e.value)
    assert piku.plan_target(paths, "webn", r, {"PATH": os.defpath, "HOME": str(tmp_path)}, piku.OPERATIONS["scale"],
                            {"web": 1}).scaling == {"web": 1}
