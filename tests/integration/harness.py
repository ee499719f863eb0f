"""A real piku server for integration tests: an unprivileged user, sshd on 127.0.0.1 with
piku's forced command, a uWSGI emperor, an unprivileged nginx and piku's nginx watcher.
Every process is started here and stopped by PID in `stop()`."""
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# PIKU_TEST_USER: another user lets two test runs share a machine (each kills only its own processes)
# Under pytest-xdist (scripts/test runs two workers) each worker is a server of its own: gw1 runs
# as <user>1, gw2 as <user>2 (gw0, or no xdist: <user>).
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_SUFFIX = _WORKER[2:] if _WORKER != "gw0" else ""
USER = os.environ.get("PIKU_TEST_USER", "pikutest") + _SUFFIX
# a second server (restore onto another machine) runs as its own user, named after the first
USER2 = os.environ["PIKU_TEST_USER2"] + _SUFFIX if os.environ.get("PIKU_TEST_USER2") else USER + "b"
INSTALL_HINT = "run `bash scripts/install-deps` as root"
SYSTEM_PY = "/usr/bin/python3"


def need(binary):
    path = shutil.which(binary, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    assert path, f"{binary} is not installed: {INSTALL_HINT}"
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def root_nginx_ip(uid):
    """The loopback address a user's root nginx listens on (ports 80/443): one per test user."""
    return f"127.80.{(uid >> 8) & 255}.{(uid & 255) or 1}"


def kill_user_processes(uid):
    """SIGKILL, PID by PID, whatever still runs as uid (workers the emperor left, a stray
    `run`): only the test user's own processes. A few passes: one may fork while we look."""
    assert uid != 0, "refusing to kill root's processes"
    for _ in range(3):
        killed = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
                if uid in (int(uids[0]), int(uids[1])):
                    os.kill(int(pid), signal.SIGKILL)
                    killed += 1
            except (OSError, StopIteration, ValueError, IndexError):
                continue
        if not killed:
            return
        time.sleep(0.1)


def wait_port(port, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


class Server:
    """piku_source: the piku.py the server runs (this repository's by default). root_nginx: run
    nginx as root on the standard ports 80/443 of a loopback address of the user's own (its
    workers as the user), as on a real server (for configs that name port 80, like the original
    piku's); else nginx runs as the user on free ports of 127.0.0.1. root: PIKU_ROOT (default:
    a fresh directory; `~/...` is in the user's home: the original piku's ssh commands only
    know ~/.piku). user: another test user than PIKU_TEST_USER's, for a server that runs beside
    the session's (a user's processes, home and authorized_keys are one server's)."""

    nginx_watch_interval = 0.3  # seconds between nginx-watch's looks at nginx/ (where inotify is missing)

    def __init__(self, piku_source=None, root_nginx=False, root=None, user=None, nginx_as=None):
        for b in ("git", "ssh", "ssh-keygen", "sshd", "uwsgi", "nginx", "uv", "openssl"):
            need(b)
        assert os.path.exists(SYSTEM_PY), f"{SYSTEM_PY} missing: {INSTALL_HINT}"
        assert os.path.exists("/usr/lib/uwsgi/plugins/python3_plugin.so"), \
            f"uwsgi-plugin-python3 is not installed: {INSTALL_HINT}"
        self.procs, self.user = {}, user or USER
        self.ensure_user()
        self.base = tempfile.mkdtemp(prefix="t-", dir=self.home)
        os.chmod(self.base, 0o755)
        self.chown(self.base)
        self.root = os.path.join(self.home, root[2:]) if (root or "").startswith("~/") else \
            root or os.path.join(self.base, "piku")
        if root:
            shutil.rmtree(self.root, ignore_errors=True)  # (left by an earlier run that was killed)
        self.piku_py = os.path.join(self.base, "piku.py")
        shutil.copy(piku_source or os.path.join(REPO, "piku.py"), self.piku_py)
        os.chmod(self.piku_py, 0o755)
        self.chown(self.piku_py)
        # nginx-watch is this repository's (the original piku had systemd's path unit instead)
        self.watch_py = os.path.join(self.base, "piku-watch.py")
        shutil.copy(os.path.join(REPO, "piku.py"), self.watch_py)
        self.root_nginx = root_nginx
        # nginx_as: nginx's master runs as root and its workers as this system user (www-data), a
        # user the piku user shares no group with: the layout of docs/INSTALL.md, where root gives
        # nginx/ that group (on free ports of 127.0.0.1)
        self.nginx_as = nginx_as
        self.nginx_ip = root_nginx_ip(self.uid) if root_nginx else "127.0.0.1"
        self.priv = tempfile.mkdtemp(prefix="piku-test-")  # root-only: client key, sshd config
        self.logdir = os.path.join(self.base, "logs")
        os.makedirs(self.logdir)
        self.chown(self.logdir)
        self.env = {"HOME": self.home, "USER": self.user, "LOGNAME": self.user, "PIKU_ROOT": self.root,
                    "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "UV_SYSTEM_CERTS": "1"}

    # -- setup --------------------------------------------------------------
    def ensure_user(self):
        try:
            pw = pwd.getpwnam(self.user)
        except KeyError:
            subprocess.run(["adduser", "--disabled-password", "--gecos", "", self.user], check=True,
                           capture_output=True)
            pw = pwd.getpwnam(self.user)
        self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, pw.pw_dir
        os.chmod(self.home, 0o755)
        auth = os.path.join(self.home, ".ssh", "authorized_keys")
        if os.path.exists(auth):
            os.unlink(auth)

    def chown(self, path):
        os.chown(path, self.uid, self.gid)

    def as_user(self, argv, **kw):
        kw.setdefault("env", self.env)
        kw.setdefault("cwd", self.home)
        return subprocess.run(argv, user=self.uid, group=self.gid, extra_groups=[], text=True,
                              capture_output=True, **kw)

    def spawn(self, name, argv, as_user=True, env=None):
        log = open(os.path.join(self.logdir, f"{name}.log"), "a")
        kw = dict(user=self.uid, group=self.gid, extra_groups=[], env=self.env, cwd=self.home) \
            if as_user else ({"env": env} if env else {})
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        log.close()
        return self.procs[name]

    def share_nginx_dir(self):
        """The root step of docs/INSTALL.md (section 5; again after an upgrade): nginx/ belongs to
        the group nginx's workers run as (here nginx runs as the piku user: its own group, unless
        nginx_as), setgid so sockets inherit it."""
        if self.nginx_as:
            os.chown(os.path.join(self.root, "nginx"), -1, pwd.getpwnam(self.nginx_as).pw_gid)
        os.chmod(os.path.join(self.root, "nginx"), 0o2755)

    def start(self):
        r = self.as_user([SYSTEM_PY, self.piku_py, "setup"])
        assert r.returncode == 0, r.stdout + r.stderr
        self.share_nginx_dir()
        # Outbound TLS here goes through a local CA: the piku user's own uv.toml (uv's user-level
        # config, merged under each project's settings) is how an admin says so server-wide.
        r = self.as_user(["sh", "-c", 'mkdir -p "$HOME/.config/uv" && echo "system-certs = true" '
                                      '> "$HOME/.config/uv/uv.toml"'])
        assert r.returncode == 0, r.stderr
        self.setup_client_key()
        self.start_sshd()
        self.start_emperor()
        self.start_nginx()
        return self

    def start_emperor(self):
        """The uWSGI emperor as an admin's service starts it (again after kill_emperor)."""
        return self.spawn("emperor", ["uwsgi", "--ini", os.path.join(self.root, "uwsgi", "uwsgi.ini")])

    def kill_emperor(self):
        """SIGKILL the emperor alone (not its process group: what happens to its vassals and their
        processes is what a test looks at). Returns its pid once it is reaped."""
        proc = self.procs["emperor"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        return proc.pid

    def restart_emperor(self):
        """What `systemctl restart` does to the emperor: stop it (its vassals stop with it),
        start it again from uwsgi/uwsgi.ini."""
        proc = self.procs["emperor"]
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        self.start_emperor()

    def setup_client_key(self):
        self.key = os.path.join(self.priv, "id_ed25519")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "piku-test", "-f", self.key],
                       check=True)
        pub = os.path.join(self.base, "client.pub")
        shutil.copy(self.key + ".pub", pub)
        os.chmod(pub, 0o644)
        r = self.as_user([SYSTEM_PY, self.piku_py, "setup:ssh", pub])
        assert r.returncode == 0, r.stdout + r.stderr
        self.setup_ssh_output = r.stdout

    def start_sshd(self):
        hostkey = os.path.join(self.priv, "host_ed25519")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hostkey], check=True)
        self.ssh_port = free_port()
        conf = os.path.join(self.priv, "sshd_config")
        with open(conf, "w") as f:
            f.write(f"Port {self.ssh_port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\n"
                    f"PidFile {self.priv}/sshd.pid\nAuthorizedKeysFile .ssh/authorized_keys\n"
                    "UsePAM yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    f"PubkeyAuthentication yes\nAllowUsers {self.user}\nStrictModes yes\n"
                    "PrintMotd no\nLogLevel VERBOSE\nAcceptEnv none\n")
        os.makedirs("/run/sshd", exist_ok=True)
        sshd = need("sshd")
        check = subprocess.run([sshd, "-t", "-f", conf], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.spawn("sshd", [sshd, "-D", "-e", "-f", conf], as_user=False)
        assert wait_port(self.ssh_port), "sshd did not start:\n" + self.logs()

    def start_nginx(self):
        self.nginx_port, self.nginx_tls_port = (80, 443) if self.root_nginx else (free_port(), free_port())
        prefix = os.path.join(self.base, "nginx")
        os.makedirs(prefix)
        self.chown(prefix)
        self.nginx_conf = os.path.join(prefix, "nginx.conf")
        temps = "".join(f"  {d}_temp_path {prefix}/{d};\n" for d in
                        ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        with open(self.nginx_conf, "w") as f:
            if self.nginx_as:
                f.write(f"user {self.nginx_as} {grp.getgrgid(pwd.getpwnam(self.nginx_as).pw_gid).gr_name};\n")
            f.write(f"user {self.user} {grp.getgrgid(self.gid).gr_name};\n" if self.root_nginx else "")
            f.write(f"daemon off;\npid {prefix}/nginx.pid;\nerror_log {self.logdir}/nginx-error.log;\n"
                    f"events {{}}\nhttp {{\n  include /etc/nginx/mime.types;\n"
                    f"  access_log {self.logdir}/nginx-access.log;\n{temps}"
                    # nginx holds its two ports from the start: until an app listens there, a web
                    # app of a test server beside this one could be given one (both come from the
                    # ephemeral range) and every later reload of this nginx would fail to bind it
                    f"  server {{ listen {self.nginx_ip}:{self.nginx_port}; listen {self.nginx_ip}:"
                    f"{self.nginx_tls_port} ssl; ssl_reject_handshake on; server_name placeholder.invalid; return 404; }}\n"
                    f"  include {self.root}/nginx/*.conf;\n}}\n")
        nginx = need("nginx")
        as_user = not (self.root_nginx or self.nginx_as)  # as root, as on a real server: it signals a root nginx
        self.spawn("nginx", [nginx, "-p", prefix, "-c", self.nginx_conf, "-e", f"{self.logdir}/nginx-error.log"],
                   as_user=as_user)
        self.spawn("nginx-watch", [SYSTEM_PY, self.watch_py, "nginx-watch", "--interval",
                                   str(self.nginx_watch_interval), "--pid-file", f"{prefix}/nginx.pid", "--",
                                   nginx, "-p", prefix, "-c", self.nginx_conf,
                                   "-e", f"{self.logdir}/nginx-error.log", "-s", "reload"],
                   as_user=as_user, env=self.env)

    def start_pebble(self):
        """Debian's pebble test CA on loopback, with pebble-challtestsrv as its DNS (every name
        -> 127.0.0.1), validating HTTP-01 on the test nginx's port. Returns (directory URL,
        CA file that signs pebble's own TLS, readable by the piku user)."""
        import json
        for b in ("pebble", "pebble-challtestsrv", "dehydrated"):
            need(b)
        d = os.path.join(self.base, "pebble")
        os.makedirs(d)
        ssl = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)  # noqa
        ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=piku test CA",
            "-keyout", "ca.key", "-out", "ca.pem")
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "tls.key",
            "-out", "tls.csr")
        with open(os.path.join(d, "san.ext"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        ssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "tls.pem")
        os.chmod(os.path.join(d, "ca.pem"), 0o644)
        os.chmod(d, 0o755)
        dns, acme, mgmt = free_port(), free_port(), free_port()
        with open(os.path.join(d, "pebble.json"), "w") as f:
            json.dump({"pebble": {"listenAddress": f"127.0.0.1:{acme}",
                                  "managementListenAddress": f"127.0.0.1:{mgmt}",
                                  "certificate": f"{d}/tls.pem", "privateKey": f"{d}/tls.key",
                                  "httpPort": self.nginx_port, "tlsPort": free_port(),
                                  "ocspResponderURL": "", "externalAccountBindingRequired": False}}, f)
        self.spawn("challtestsrv", ["pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns}", "-http01", "",
                                    "-https01", "", "-tlsalpn01", "", "-management", f"127.0.0.1:{free_port()}",
                                    "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""], as_user=False)
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        log = open(os.path.join(self.logdir, "pebble.log"), "w")
        self.procs["pebble"] = subprocess.Popen(
            ["pebble", "-config", f"{d}/pebble.json", "-dnsserver", f"127.0.0.1:{dns}"], cwd=d, env=env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        assert wait_port(acme) and wait_port(mgmt), "pebble did not start:\n" + self.logs()
        self.pebble_mgmt, self.pebble_ca = f"https://127.0.0.1:{mgmt}", os.path.join(d, "ca.pem")
        return f"https://127.0.0.1:{acme}/dir", self.pebble_ca

    def pebble_root(self):
        """PEM of the root pebble signs certificates with (it makes a new one each run)."""
        import ssl
        ctx = ssl.create_default_context(cafile=self.pebble_ca)
        with urllib.request.urlopen(f"{self.pebble_mgmt}/roots/0", context=ctx, timeout=10) as r:
            path = os.path.join(self.base, "pebble", "issuer-root.pem")
            with open(path, "wb") as f:
                f.write(r.read())
        return path

    # -- teardown -----------------------------------------------------------
    def stop(self):
        for name in reversed(list(self.procs)):  # started last, stopped first
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGINT if name == "emperor" else signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        kill_user_processes(self.uid)
        if os.environ.get("PIKU_TEST_KEEP"):  # a copy of PIKU_ROOT (logs, state; no virtualenvs) to read after
            shutil.copytree(self.root, os.path.join(os.environ["PIKU_TEST_KEEP"], os.path.basename(self.root)),
                            symlinks=True, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock", "*.fifo", "venvs", "envs", "*.pid"))
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.priv, ignore_errors=True)

    # -- client helpers -----------------------------------------------------
    def ssh_argv(self):
        return ["ssh", "-i", self.key, "-p", str(self.ssh_port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]

    def ssh(self, *args, input=None, timeout=300, text=True, settle=True):
        """A piku command over ssh; text=False: bytes in and out (backup archives). Returns once
        the app named second (if any) is settled (see settled)."""
        r = subprocess.run(self.ssh_argv() + [f"{self.user}@127.0.0.1"] + list(args), input=input,
                           capture_output=True, text=text, timeout=timeout)
        if settle and len(args) > 1 and isinstance(args[1], str):
            self.settled(args[1])
        return r

    def settled(self, app, timeout=10):
        """Wait until nothing holds app's lock: an operation that switched a `web` app behind
        nginx returns before its old workers have stopped (a background process of piku's stops
        them once nginx has quiesced, holding the lock), so what a test reads right after it
        (vassal files, processes) is the state after that. True once free."""
        import fcntl
        lock = self.path("locks", f"{app}.lock")
        if "/" in app or not os.path.exists(lock):
            return True
        deadline = time.monotonic() + timeout
        with open(lock) as f:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                    return True
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.01)

    def git_env(self):
        env = dict(os.environ)
        env.update({"GIT_SSH_COMMAND": " ".join(self.ssh_argv()), "GIT_AUTHOR_NAME": "t",
                    "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
                    "GIT_COMMITTER_EMAIL": "t@example.invalid"})
        return env

    def remote_url(self, app, style="scp"):
        if style == "url":
            return f"ssh://{self.user}@127.0.0.1:{self.ssh_port}/{app}"
        return f"{self.user}@127.0.0.1:{app}"

    def git(self, repo, *args, check=True):
        r = subprocess.run(["git", *args], cwd=repo, env=self.git_env(), capture_output=True, text=True,
                           timeout=600)
        assert not check or r.returncode == 0, r.stdout + r.stderr
        return r

    def make_app(self, fixture, dest, files=None):
        """Copy tests/apps/<fixture> (or nothing when None) into a fresh git repo at dest."""
        if fixture:
            shutil.copytree(os.path.join(REPO, "tests", "apps", fixture), dest)
        else:
            os.makedirs(dest)
        self.git(dest, "init", "-q", "-b", "main")
        return self.commit(dest, "initial", files or {}, allow_empty=False)

    def deployed(self, fixture, app, tmp_dir, files=None):
        """A repo made in tmp_dir from tests/apps/<fixture> and files, pushed as <app>; the push
        must succeed."""
        repo = self.make_app(fixture, Path(tmp_dir) / app, files)
        r = self.push(repo, app)
        assert r.returncode == 0, r.stdout + self.logs()
        return repo

    def commit(self, repo, message, files=None, allow_empty=True):
        for rel, content in (files or {}).items():
            path = os.path.join(repo, rel)
            if content is None:
                os.unlink(path)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(content)
        self.git(repo, "add", "-A")
        self.git(repo, "commit", "-q", "-m", message, *(["--allow-empty"] if allow_empty else []))
        return Path(repo)

    def push(self, repo, app, style="scp", ref="main", extra=(), settle=True):
        r = subprocess.run(["git", "push", *extra, self.remote_url(app, style), ref], cwd=repo,
                           env=self.git_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=900)
        if settle:
            self.settled(app)
        return r

    def rev(self, repo, ref="HEAD"):
        return self.git(repo, "rev-parse", ref).stdout.strip()

    def remote_rev(self, app, ref="refs/heads/main"):
        r = subprocess.run(["git", "ls-remote", self.remote_url(app), ref], env=self.git_env(),
                           capture_output=True, text=True, timeout=60)
        return r.stdout.split()[0] if r.stdout.strip() else None

    def nginx_env(self, host, **extra):
        """ENV lines that put an app behind the test nginx (loopback only, test ports)."""
        settings = {"NGINX_SERVER_NAME": host, "NGINX_HTTP_PORT": self.nginx_port,
                    "NGINX_HTTPS_PORT": self.nginx_tls_port, "NGINX_IPV4_ADDRESS": self.nginx_ip,
                    "DISABLE_IPV6": "true"}
        settings.update(extra)
        return "".join(f"{k}={v}\n" for k, v in settings.items())

    # -- HTTP ---------------------------------------------------------------
    def http_get(self, port, path="/", host=None, timeout=5, headers=None):
        if port == getattr(self, "nginx_port", None):
            self.nginx_settled()
        ip = self.nginx_ip if port == getattr(self, "nginx_port", None) else "127.0.0.1"
        req = urllib.request.Request(f"http://{ip}:{port}{path}", headers=headers or {})
        if host:
            req.add_header("Host", host)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")
        except OSError as e:
            return None, str(e)

    def wait_http(self, port, path="/", host=None, status=200, contains=None, timeout=30, headers=None):
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            last = self.http_get(port, path, host, headers=headers)
            if last[0] == status and (contains is None or contains in last[1]):
                return last
            time.sleep(0.2)
        raise AssertionError(f"port {port}{path} host={host}: wanted {status} {contains!r}, got {last}\n"
                             + self.logs())

    def nginx_settled(self, timeout=20):
        """Wait until the test nginx serves what nginx/ holds now: one generation of workers
        (right after a reload the old worker, with the old config, still accepts connections
        until it handles its QUIT), started after the newest file in nginx/ was written
        (nginx-watch reloads a moment after a deploy)."""
        master, tick = self.procs["nginx"].pid, os.sysconf("SC_CLK_TCK")
        deadline = time.monotonic() + timeout
        while True:
            folder = os.path.join(self.root, "nginx")
            newest = max((os.stat(os.path.join(folder, n)).st_mtime for n in os.listdir(folder)
                          if n.endswith((".conf", ".crt", ".key"))), default=0)
            workers = []
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    if int(fields[1]) != master:
                        continue
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read().replace(b"\0", b" ").decode().strip()
                except (OSError, ValueError, IndexError):
                    continue
                # start time: clock ticks since boot (rounded down), as wall-clock time
                started = time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / tick)
                workers.append((title, started))
            live = [started for title, started in workers if title == "nginx: worker process"]
            if len(live) == 1 and live[0] > newest:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx did not reload onto nginx/ (newest file {newest}): {workers}\n"
                                     + self.logs())
            time.sleep(0.05)

    def vassal(self, app, kind, n=1):
        """Path of the enabled vassal of app's kind.n, whichever slot it runs in (None if none)."""
        import re
        d = self.path("uwsgi-enabled")
        for name in sorted(os.listdir(d)):
            if re.fullmatch(re.escape(f"{app}_{kind}.{n}") + r"(\.[0-9a-f]{6})?(\.[ab])?\.ini", name):
                return os.path.join(d, name)
        return None

    def vassal_text(self, app, kind, n=1):
        path = self.vassal(app, kind, n)
        assert path, f"no vassal for {app} {kind}.{n}: {os.listdir(self.path('uwsgi-enabled'))}"
        with open(path) as f:
            return f.read()

    def app_port(self, app):
        live = self.read(os.path.join("envs", app, "LIVE_ENV")) or ""
        for line in live.splitlines():
            if line.startswith("PORT="):
                return int(line[5:])
        raise AssertionError(f"no PORT in LIVE_ENV of {app}")

    # -- files --------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def nginx_errors(self, app, last=8):
        """The last lines of nginx's error log for this app (logs/<app>/nginx.error.log; for
        failure messages: why nginx answered 502)."""
        try:
            with open(self.path(f"logs/{app}/nginx.error.log"), errors="replace") as f:
                return [line.rstrip() for line in f][-last:]
        except OSError:
            return []

    def read(self, rel):
        try:
            with open(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_link(self, rel):
        """Where a symbolic link under PIKU_ROOT points, or None when there is no link."""
        try:
            return os.readlink(self.path(rel))
        except OSError:
            return None

    def tree(self):
        """Snapshot of every path under PIKU_ROOT with size and mtime (for 'nothing changed')."""
        out = {}
        for d, dirs, files in os.walk(self.root):
            if d == self.root:  # running workers write these all the time
                dirs[:] = [x for x in dirs if x not in ("uv-cache", "logs", "data")]
            if os.path.basename(d) == "cron" and os.path.dirname(os.path.dirname(d)) == os.path.join(self.root, "state"):
                dirs[:], files = [], []  # cron jobs mark the minute they ran in
            for n in dirs + files:
                p = os.path.join(d, n)
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                if p == os.path.join(self.root, "uwsgi", "uwsgi.log"):  # the emperor's own log
                    continue
                if n == "cron" and os.path.dirname(d) == os.path.join(self.root, "state"):
                    continue  # (made when a cron job of the app first runs)
                if n == "releases.json" and os.path.dirname(d) == os.path.join(self.root, "state"):
                    continue  # the release history records failed pushes too (`releases APP`)
                out[p] = (st.st_size, st.st_mtime_ns) if n in files else None
        return out

    def user_pids(self):
        """PIDs of the processes running as the test user."""
        out = []
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == self.uid:
                    out.append(int(pid))
            except OSError:
                continue
        return out

    def masters(self, app, kind, n=1):
        """PIDs of the uWSGI masters of app's kind.n (one per running vassal, old or new)."""
        title = f"{app}:{kind}.{n} uWSGI master"
        return [pid for pid in self.user_pids() if self.proc_title(pid).startswith(title)]

    @staticmethod
    def proc_title(pid):
        """A process's command line (its title, for a uWSGI), or '' when it is gone."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def listeners(self, port):
        """What listens on a port, with the processes (ss), and the emperor's last lines: for the
        failure message of a test that got an answer from the wrong release."""
        try:
            ss = subprocess.run(["ss", "-Hltnpe", f"sport = :{port}"], capture_output=True, text=True).stdout
        except OSError as e:
            ss = f"(ss: {e})\n"
        emperor = (self.read(os.path.join("uwsgi", "uwsgi.log")) or "").splitlines()[-15:]
        return ss + "\n".join(emperor)

    def logs(self, lines=30):
        out = []
        for name in sorted(os.listdir(self.logdir)):
            with open(os.path.join(self.logdir, name), errors="replace") as f:
                out.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)


def wait_for(what, check, timeout=90):
    """Poll until check() is true (the emperor and uWSGI's cron act on their own clock)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.3)


def system_uwsgi_python():
    with open("/usr/lib/uwsgi/plugins/python3_plugin.so", "rb") as f:
        import re
        m = re.search(rb"libpython(3\.\d+)", f.read())
    return m.group(1).decode()


def find_other_python(exclude_minor):
    """An installed CPython 3.9+ whose minor version differs from exclude_minor: (bin dir, 'X.Y').
    Looks where uv looks plus pyenv's versions (pyenv's shims only work for root's selection)."""
    import glob
    import re
    dirs = ["/usr/local/bin", "/usr/bin"]
    pyenv = os.environ.get("PYENV_ROOT", "/root/.pyenv")
    found = glob.glob(os.path.join(pyenv, "versions", "3.*", "bin"))
    dirs += sorted(found, key=lambda d: [int(x) for x in re.findall(r"\d+", d.split("versions/")[1])],
                   reverse=True)
    for d in dirs:
        for exe in sorted(glob.glob(os.path.join(d, "python3.[0-9]*")), reverse=True):
            m = re.search(r"python(3\.(\d+))$", exe)
            if m and m.group(1) != exclude_minor and int(m.group(2)) >= 9 and os.access(exe, os.X_OK):
                r = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    return d, m.group(1)
    raise AssertionError(f"these tests need a second CPython (3.9+, not {exclude_minor}) installed: "
                         "e.g. `apt-get install python3.12` or a pyenv build; none was found")


class Reachable:
    """Let the test user traverse the directories above path (pyenv lives in root's 0700 home);
    the original modes come back when the last user of a directory leaves. Counted across
    processes (pytest-xdist workers): one worker's exit must not shut a directory another
    worker's test still runs a Python from."""
    STATE, LOCK = "/tmp/piku-test-reachable.json", "/tmp/piku-test-reachable.lock"

    def __init__(self, path):
        self.dirs = []
        d = os.path.abspath(path)
        while d != "/":
            self.dirs.append(d)
            d = os.path.dirname(d)

    def _update(self, enter):
        import fcntl
        import json
        with open(self.LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(self.STATE) as f:
                    state = json.load(f)
            except (OSError, ValueError):
                state = {}
            for d in self.dirs:
                mode, users = state.get(d, (os.stat(d).st_mode & 0o7777, []))
                if mode & 0o001:
                    continue  # (traversable anyway: nothing to change or restore)
                users = [pid for pid in users if os.path.exists(f"/proc/{pid}")]  # (a killed run's)
                if enter:
                    users.append(os.getpid())
                elif os.getpid() in users:
                    users.remove(os.getpid())
                if users:
                    os.chmod(d, mode | 0o001)
                    state[d] = (mode, users)
                else:
                    os.chmod(d, mode)
                    state.pop(d, None)
            with open(self.STATE + ".tmp", "w") as f:
                json.dump(state, f)
            os.replace(self.STATE + ".tmp", self.STATE)

    def __enter__(self):
        self._update(True)
        return self

    def __exit__(self, *exc):
        self._update(False)


def request_in_background(port, path, host=None, settle=1.0):
    """GET path on port (with a Host header when given) in a thread; returns the thread and a
    dict that gets the outcome: {'answer': (status, body)} or {'error': ...}. Returns once the
    request is in flight (`settle` seconds after it was sent)."""
    import http.client
    import threading
    outcome = {}

    def get():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("GET", path, headers={"Host": host} if host else {})
            resp = conn.getresponse()
            outcome["answer"] = (resp.status, resp.read().decode())
        except OSError as e:
            outcome["error"] = repr(e)
        finally:
            conn.close()

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    time.sleep(settle)  # (uWSGI logs a request when it ends: by now it is in flight)
    return thread, outcome
