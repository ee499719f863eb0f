#!/usr/bin/env python3
"""piku.py: the smallest serious PaaS. `git push` deploys, `ssh piku@host CMD` manages.

Sections (search for the banner, e.g. "=== 5."):
   0. Header                         1. Imports
   2. Constants and paths            3. Errors and output
   4. Process runner                 5. Parsers: Procfile, ENV, cron, scaling
   6. Parsers: ssh, keys, Python     7. Settings
   8. Renderers: uWSGI, hooks, keys  9. Renderers: nginx, certificates
  10. Planners                      11. Filesystem
  12. Builders: Python              13. Builders: other runtimes
  14. Orchestration: the recipes, releases, the target state
  15. nginx files, maintenance      16. Certificates, nginx's config check
  17. The transaction               18. The switch
  19. Stopping old workers          20. Moving nginx's traffic
  21. Health checks                 22. After a switch, hooks
  23. Backup, restore, downgrade    24. Git and SSH plumbing
  25. Logs                          26. CLI: developers' commands
  27. CLI: setup, keys, internal    28. main()
  29. The piku client
Sections 5-10 are pure (data in, data out); the others do the I/O.
"""

# === 0. Header ===

import sys

__version__ = "0.1.0"

if sys.version_info < (3, 10):  # pragma: no cover - checked before anything else runs
    sys.exit(" !     piku.py needs Python 3.10 or newer")

# === 1. Imports ===
# Only cheap stdlib modules at import time: every ssh command pays for them.

import os
import re
from collections import namedtuple


class _Later:
    """A click object named when the module loads (click.Path(...), click.UNPROCESSED), made
    from the real click when the command line is built."""

    def __init__(self, name, args=None, kwargs=None):
        self.name, self.args, self.kwargs = name, args, kwargs

    def __call__(self, *args, **kwargs):
        return _Later(self.name, args, kwargs)

    def made(self, real):
        obj = getattr(real, self.name)
        return obj if self.args is None else obj(*self.args, **self.kwargs)


class _ClickStandIn:
    """`click` until a command line is parsed (click costs a Python start ~30 ms, paid twice by
    every push: the ssh command and the git hook need none of it). The decorators piku's
    commands use when the module loads are recorded on the functions and replayed on the real
    click by build_cli(); any other name (click.echo, click.UsageError...) is the real one."""
    RECORDED = ("argument", "option", "pass_context")

    def __getattr__(self, name):
        if name in self.RECORDED:
            if name == "pass_context":  # (a decorator itself, not a decorator factory)
                return lambda f: _record(f, name, (), {})
            return lambda *args, **kwargs: (lambda f: _record(f, name, args, kwargs))
        if name in ("Path", "UNPROCESSED", "Choice", "IntRange"):
            return _Later(name)
        import click as real
        return getattr(real, name)


def _record(f, name, args, kwargs):
    f.__dict__.setdefault("_piku_click", []).append((name, args, kwargs))
    return f


click = _ClickStandIn()

# === 2. Constants and paths ===

APP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
KIND_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,30}")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
WSGI_SPEC_RE = re.compile(r"[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?")
HOSTNAME_RE = re.compile(r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?|_")
IP_RE = re.compile(r"[0-9A-Fa-f.:\[\]]{2,64}")
SAFE_PATH_RE = re.compile(r"[A-Za-z0-9_./@+-]{1,512}")

SPECIAL_KINDS = ("release", "preflight", "postdeploy", "backup")  # Procfile phases, not processes
MAX_PROCESS_KINDS = 50  # Procfile lines with a kind (each may become several workers)
DEFAULT_RELEASES_KEPT = 3
PIKU_FILES_IN_ENV_DIR = ("ENV", "LIVE_ENV", "SCALING")

Paths = namedtuple("Paths", "root apps repos envs data logs cache nginx uwsgi uwsgi_available "
                            "uwsgi_enabled acme plugins releases state locks uv_cache venvs")


def paths_for(root):
    """Every directory under PIKU_ROOT (pure: no I/O)."""
    root = os.path.abspath(root)
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    return Paths(root, j("apps"), j("repos"), j("envs"), j("data"), j("logs"), j("cache"),
                 j("nginx"), j("uwsgi"), j("uwsgi-available"), j("uwsgi-enabled"), j("acme"),
                 j("plugins"), j("releases"), j("state"), j("locks"), j("uv-cache"), j("venvs"))


def default_root(environ=None):
    environ = os.environ if environ is None else environ
    return environ.get("PIKU_ROOT") or os.path.join(os.path.expanduser("~"), ".piku")


# === 3. Errors and output ===

class PikuError(Exception):
    """A failure the user can act on: one line of message and an exit code."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def _color(text, code, stream):
    return f"\033[{code}m{text}\033[0m" if stream.isatty() else text


def step(text):
    """A phase title: `-----> Title`."""
    print(_color(f"-----> {text}", "1", sys.stdout), flush=True)


def detail(text):
    for line in str(text).splitlines() or [""]:
        print(f"       {line}", flush=True)


def warn(text):
    for line in str(text).splitlines() or [""]:
        print(_color(f" !     {line}", "33", sys.stderr), file=sys.stderr, flush=True)


# === 4. Process runner ===

def die_with_parent(sig):
    """This process (and what it execs) gets `sig` when its parent dies. A vassal killed with
    its emperor must not leave its web command or inner uWSGI on the app's port; a killed push
    must not leave a build tool writing into what the next push builds."""
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _die_with_parent():
    """preexec_fn for every child piku waits for: SIGKILL if piku dies first."""
    die_with_parent(9)


# PR_SET_PDEATHSIG reaches one process, but `/bin/sh -c CMD` forks CMD (dash does), and web
# servers and build tools fork too: a command whose processes must all die with the process that
# started it runs under this supervisor. It leads the command's process group and, when its own
# parent dies (the signal that death sends it finds another parent), ends the whole group:
# SIGTERM, SIGKILL for what is left after a grace. A stop while the parent lives has reached the
# whole group already (uWSGI signals a daemon's group): the supervisor exits with its command,
# whose processes finish as they would without it. A command that ends by itself takes what it
# left running with it. Run by Python -I -S: a few MB, and no piku.py loaded. A vassal starts
# its daemon (a web or worker command) with `--launch FILE GRACE`: FILE, written by piku.py at
# deploy (render_launch), names the directory, the command and the environment, so a worker
# starts without loading piku.py (~30 ms of every start); its parent is uWSGI's master.
SUPERVISOR = """# piku.py: the supervisor of one command's process group
import os, signal, sys, time
if sys.argv[1] == "--launch":
    try:
        with open(sys.argv[2], encoding="utf-8", errors="surrogateescape") as f:
            fields = [line.replace("\\\\\\\\", "\\0").replace("\\\\n", "\\n").replace("\\0", "\\\\")
                      for line in f.read().split("\\n")]
        if fields[0] != "piku-launch 1" or fields[-1] != "":
            raise ValueError("not a launch file of this piku.py")
        argv, pairs = fields[3:3 + int(fields[2])], fields[3 + int(fields[2]):-1]
        os.chdir(fields[1])
    except (OSError, ValueError, IndexError) as e:
        sys.stderr.write(f"piku: not started ({sys.argv[2]}): {e}\\n")
        sys.exit(1)
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env.update(pair.split("=", 1) for pair in pairs)
    os.environ.clear()
    os.environ.update(env)
    parent, grace = os.getppid(), float(sys.argv[3])
else:
    parent, grace, argv = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
me, stopping = os.getpid(), []
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM, which ends the group
except (OSError, AttributeError):
    pass
try:
    os.setpgid(0, 0)
except OSError:
    pass  # a session leader (uWSGI's daemons) leads its group already
# (the stop signals wait until end_group handles them: a parent that dies while the command
# starts must not kill this supervisor alone, by SIGTERM's default action, leaving the group)
STOP = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
signal.pthread_sigmask(signal.SIG_BLOCK, STOP)
child = os.fork()
if child == 0:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        sys.stderr.write(f"cannot start {argv[0]}: {e.strerror}\\n")
    os._exit(127)

def others_left():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pid) != me and int(group) == me and state != "Z":
            return True
    return False

def end_group(*_):
    if os.getppid() == parent:
        stopping.append(True)
        return
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and others_left():
        try:
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    os.killpg(0, signal.SIGKILL)

for s in STOP:
    signal.signal(s, end_group)
signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)
if os.getppid() != parent:
    end_group()
status = os.waitpid(child, 0)[1]
if not stopping:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""
INHERITED_ENV = ("LANG", "LC_ALL", "TZ", "TERM", "SHELL", "LOGNAME")  # what a worker keeps of its starter's
SUPERVISOR = SUPERVISOR.replace("INHERITED_ENV", repr(INHERITED_ENV))
SUPERVISOR_GRACE = 5.0  # seconds a command's processes get after SIGTERM once its parent has died


def supervised(argv, parent=None, grace=SUPERVISOR_GRACE):
    """argv run under SUPERVISOR: it and everything it starts end when `parent` (this process
    unless given) dies."""
    return [sys.executable, "-I", "-S", "-c", SUPERVISOR, str(parent or os.getpid()), str(grace)] + list(argv)


def run(argv, cwd=None, env=None, capture=False, input=None, check=True, timeout=None):
    """Run argv (a list, never a shell string). Returns CompletedProcess."""
    import subprocess
    try:
        proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, input=input,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.STDOUT if capture == "merged" else
                              (subprocess.PIPE if capture else None),
                              text=True, errors="replace", timeout=timeout, preexec_fn=_die_with_parent)
    except FileNotFoundError:
        raise PikuError(f"command not found: {argv[0]}", 127)
    except (OSError, ValueError) as e:  # E2BIG, EACCES, ENOEXEC..., a NUL in an argument
        raise PikuError(f"cannot start {os.path.basename(str(argv[0]))}: {getattr(e, 'strerror', None) or e}", 126)
    if check and proc.returncode != 0:
        out = (proc.stdout or "") + (proc.stderr or "") if capture else ""
        raise PikuError(f"{os.path.basename(str(argv[0]))} failed (exit {proc.returncode})"
                        + (f": {out.strip()[-2000:]}" if out.strip() else ""), proc.returncode)
    return proc


def capture(argv, cwd=None, env=None):
    """stdout of argv, stripped; raises PikuError on failure."""
    return run(argv, cwd=cwd, env=env, capture=True).stdout.strip()


def which(name, environ=None):
    import shutil
    path = (environ or os.environ).get("PATH", os.defpath)
    return shutil.which(name, path=path)


def clean_env(environ):
    """A copy of environ without git's hook variables (GIT_DIR, GIT_QUARANTINE_PATH, ...) and
    without the directory git puts first on PATH for its hooks (.../git-core)."""
    env = {k: v for k, v in environ.items() if not k.startswith("GIT_") and k not in ("SSH_ORIGINAL_COMMAND",)}
    if "PATH" in env:
        parts = [d for d in env["PATH"].split(":") if d and not d.rstrip("/").endswith("/git-core")]
        env["PATH"] = ":".join(dict.fromkeys(parts)) or os.defpath
    return env


# === 5. Parsers (pure): Procfile, ENV, config, cron, scaling ===

def parse_app_name(raw):
    """Validate an app name as it arrives from git or a command; returns the clean name."""
    name = (raw or "").strip()
    if name.startswith("~/"):
        name = name[2:]
    name = name.lstrip("/") if name.count("/") == 1 and name.startswith("/") else name
    if name.endswith(".git"):
        name = name[:-4]
    if not APP_NAME_RE.fullmatch(name):
        shown = (raw[:40] + "...") if raw and len(raw) > 40 else raw
        raise PikuError(f"invalid app name {shown!r}: use 1-63 letters, digits, '.', '_' or '-',"
                        " starting with a letter or digit")
    return name


def host_port(host, port):
    """'host:port', with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def connect_host(bind):
    """Where to connect to reach something bound on bind (a wildcard means this host)."""
    return "127.0.0.1" if bind in ("0.0.0.0", "") else ("::1" if bind in ("::", "[::]") else bind)


def parse_bool(value, key="value"):
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on", "y"):
        return True
    if v in ("0", "false", "no", "off", "n", ""):
        return False
    raise PikuError(f"{key}: expected true or false, got {value!r}")


def parse_count_or_bool(value, key, when_true, maximum=10**9):
    """A number, or a boolean standing for `when_true` (true) or 0 (false): settings the
    original piku read as numbers and earlier piku.py versions as booleans."""
    v = str(value).strip().lower()
    if v in ("true", "yes", "on", "y"):
        return when_true
    if v in ("false", "no", "off", "n", ""):
        return 0
    if not re.fullmatch(r"[0-9]{1,30}", v):
        raise PikuError(f"{key}: expected a number (0 = off) or true/false, got {value!r}")
    n = int(v)
    if not 0 <= n <= maximum:
        raise PikuError(f"{key}: expected a number between 0 and {maximum}, got {value!r}")
    return n


def parse_int(value, key="value", minimum=None, maximum=None):
    """A whole number in ASCII digits (Python's int() also takes '1_000' and other scripts'
    digits, which no other reader of these values does)."""
    text = str(value).strip()
    if not re.fullmatch(r"-?[0-9]{1,30}", text):
        raise PikuError(f"{key}: expected a whole number, got {value!r}")
    n = int(text)
    if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
        raise PikuError(f"{key}: {n} is out of range ({minimum}..{maximum})")
    return n


CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
CRON_NAMES = ("minute", "hour", "day of month", "month", "day of week")
# names a field may use instead of numbers, counted from the field's lowest value
CRON_WORDS = ((), (), (), ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
              ("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
CRON_SHORTCUTS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                  "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
                  "@annually": "0 0 1 1 *"}
CRON_REBOOT = "@reboot"


def parse_cron_field(field, lo, hi, name, words=()):
    """Set of values matched by one cron field (numbers or the field's names, *, */n, a-b,
    a-b/n, lists)."""
    def number(m):
        if m.group(0) not in words:
            raise PikuError(f"bad cron {name} field {field!r}"
                            + (f" (names: {', '.join(words)})" if words else " (no names here)"))
        return str(lo + words.index(m.group(0)))
    values = set()
    for part in field.lower().split(","):
        rng, slash, stepv = part.partition("/")
        part = re.sub(r"[a-z]+", number, rng) + slash + stepv
        m = re.fullmatch(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?", part)
        if not m:
            raise PikuError(f"bad cron {name} field {field!r}")
        rng, stepv = m.group(1), int(m.group(2) or 1)
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a, b = (int(x) for x in rng.split("-"))
        else:
            a = b = int(rng)
            if m.group(2):
                b = hi
        if not (lo <= a <= hi and lo <= b <= hi and a <= b and stepv >= 1):
            raise PikuError(f"cron {name} field {field!r} out of range {lo}-{hi}")
        values.update(range(a, b + 1, stepv))
    return values


def parse_cron(spec):
    """'M H DoM Mon DoW command' or '@daily command' (any of CRON_SHORTCUTS) -> (list of 5 value
    sets, command); '@reboot command' -> (None, command): it runs when its worker starts."""
    spec = spec.strip()
    if spec.startswith("@"):
        word, _, command = spec.partition(" ")
        if word != CRON_REBOOT and word not in CRON_SHORTCUTS:
            raise PikuError(f"unknown cron shortcut {word[:20]!r}: use {CRON_REBOOT}, "
                            f"{', '.join(CRON_SHORTCUTS)} or five time fields")
        if not command.strip():
            raise PikuError(f"cron {word} needs a command after it")
        if word == CRON_REBOOT:
            return None, command.strip()
        spec = f"{CRON_SHORTCUTS[word]} {command.strip()}"
    parts = spec.split(None, 5)
    if len(parts) < 6:
        raise PikuError(f"cron needs 5 time fields and a command, got {spec!r}")
    sets = [parse_cron_field(f, lo, hi, n, w)
            for f, (lo, hi), n, w in zip(parts[:5], CRON_RANGES, CRON_NAMES, CRON_WORDS)]
    if 7 in sets[4]:
        sets[4] = (sets[4] - {7}) | {0}
    return sets, parts[5]


def cron_matches(sets, tm):
    """Does a time.struct_time match the parsed cron sets (standard DoM/DoW 'or' rule)? An
    @reboot job (sets None) never does."""
    if sets is None:
        return False
    minute, hour, dom, mon, dow = sets
    wday = (tm.tm_wday + 1) % 7  # struct_time: Monday=0; cron: Sunday=0
    dom_all, dow_all = dom == set(range(1, 32)), dow == set(range(0, 7))
    if dom_all or dow_all:
        day_ok = tm.tm_mday in dom and wday in dow
    else:
        day_ok = tm.tm_mday in dom or wday in dow
    return tm.tm_min in minute and tm.tm_hour in hour and tm.tm_mon in mon and day_ok


# One definition of a line for the files piku writes and reads back (ENV, LIVE_ENV, SCALING,
# Procfile, vassal inis): a line ends at \n, \r\n or \r, as Python reads text files. Other
# readers break lines at more characters (str.splitlines() also at \v \f \x1c-\x1e \x85
# \u2028 \u2029): the writers never put any of LINE_BREAKS inside a value (render_env quotes
# it as JSON, render_ini refuses it), so every reader sees the same lines.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


MASTER_TITLE_RE = re.compile(r"([^\s:]+:[A-Za-z][A-Za-z0-9_-]*)(?:(\.[0-9]+) |:)uWSGI master")


def parse_master_title(title):
    """A uWSGI master's process title -> (worker, numbered): ('app:kind.n', True) for piku.py's
    `app:kind.n uWSGI master`, ('app:kind', False) for the original piku's `app:kind:uWSGI
    master` (it names no instance), (None, False) for anything else."""
    m = MASTER_TITLE_RE.fullmatch(title)
    if not m:
        return None, False
    return m.group(1) + (m.group(2) or ""), bool(m.group(2))


def split_lines(text):
    """text -> lines, split at \n, \r\n and \r only (see LINE_BREAKS)."""
    return re.split(r"\r\n|\r|\n", text)


def render_cron_record(tm, worker, text):
    """A line piku adds to a cron job's log (the job's own output has no time stamps)."""
    import time
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', tm)} [piku cron] {worker}: {text}\n"


def parse_procfile(text):
    """Procfile text -> (ordered {kind: command}, [warnings]). Raises on bad lines."""
    workers, warnings = {}, []
    for lineno, raw in enumerate(split_lines(text), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, sep, cmd = line.partition(":")
        kind, cmd = kind.strip(), cmd.strip()
        if "\0" in cmd:  # (no program can be started with it)
            raise PikuError(f"Procfile line {lineno}: the command holds a NUL character")
        if not sep or not KIND_RE.fullmatch(kind) or not cmd:
            raise PikuError(f"Procfile line {lineno}: expected 'kind: command', got {raw.strip()[:80]!r}")
        if kind in workers:
            raise PikuError(f"Procfile line {lineno}: process kind {kind!r} is defined twice")
        if len(workers) == MAX_PROCESS_KINDS:
            raise PikuError(f"Procfile line {lineno}: more than {MAX_PROCESS_KINDS} process kinds; "
                            "run more instances of one kind instead (ps:scale)")
        if kind.startswith("cron"):
            try:
                parse_cron(cmd)
            except PikuError as e:
                raise PikuError(f"Procfile line {lineno}: {e}")
        if kind == "wsgi":
            cmd = re.sub(r"\s+#.*\Z", "", cmd)  # `wsgi: app:app  # a comment`
        if kind == "wsgi" and not WSGI_SPEC_RE.fullmatch(cmd):
            raise PikuError(f"Procfile line {lineno}: wsgi needs 'module:callable', got {cmd!r}")
        workers[kind] = cmd
    if "wsgi" in workers and "web" in workers:
        warnings.append("both wsgi and web are defined: web is disabled (wsgi wins)")
        del workers["web"]
    return workers, warnings


def _unquote_env_value(value):
    """Values quoted in an ENV file: "json style" or 'literal'. Returns (value, expand?)."""
    import json
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value), False
        except ValueError:
            return value[1:-1], True
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1], False
    return value, True


def expand_vars(value, env):
    """$VAR and ${VAR} from env; unknown names are left as written."""
    def sub(m):
        name = m.group(1) or m.group(2)
        return env.get(name, m.group(0))
    return re.sub(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))", sub, value)


def parse_env(text, base=None, source="ENV", expand=True):
    """ENV file text -> dict. `$VAR` expands from earlier keys (then base), unless `expand` is
    false (values as they were written); bad keys raise."""
    env, scope = {}, dict(base or {})
    for lineno, raw in enumerate(split_lines(text), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not ENV_KEY_RE.fullmatch(key):
            raise PikuError(f"{source} line {lineno}: expected KEY=value, got {line[:60]!r}")
        value, expand_this = _unquote_env_value(value.strip())
        value = expand_vars(value, scope) if expand and expand_this else value
        env[key] = scope[key] = value
    return env


CONFIG_REF_RE = re.compile(r"\$(\$?)(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")


def expand_config(config, base):
    """config:set values as the app gets them: `$NAME` and `${NAME}` replaced by one of piku's
    own values or another setting (base), or a config:set value before it, as the original piku
    did. Other names stay as written, and `$$NAME` is a literal `$NAME`. Never a shell."""
    scope, out = dict(base), {}
    for key, value in config.items():
        out[key] = scope[key] = expand_config_value(value, scope)
    return out


def expand_config_value(value, scope):
    def sub(m):
        name = m.group(2) or m.group(3)
        if name not in scope:
            return m.group(0)
        return m.group(0)[1:] if m.group(1) else scope[name]
    return CONFIG_REF_RE.sub(sub, value)


def _needs_quoting(value):
    """Values written as JSON strings: with quotes, `$`, `#`, backslashes, surrounding spaces,
    or any character that is not printable (every line break of LINE_BREAKS, tabs, NUL, ...):
    JSON escapes all of those, so the line holds printable ASCII only."""
    return (value != value.strip() or any(c in value for c in "$\"'\\#") or value[:1] in "\"'"
            or not all(c == " " or c.isprintable() for c in value))


def render_env(env):
    """dict -> ENV file text that parse_env reads back byte for byte."""
    import json
    lines = []
    for k, v in env.items():
        if not ENV_KEY_RE.fullmatch(k):
            raise PikuError(f"invalid key {k!r}: letters, digits and _ only")
        lines.append(f"{k}={json.dumps(v)}" if v and _needs_quoting(v) else f"{k}={v}")
    return "\n".join(lines) + ("\n" if lines else "")


def parse_config_import(text):
    """config:import input -> {key: value}: a JSON object of strings (config:export --json) or
    ENV lines (config:export; read as the stored config is, `$NAME` from earlier lines only)."""
    import json
    if len(text) > 1_000_000:
        raise PikuError("config:import: the input is larger than 1 MB")
    if text.lstrip().startswith("{"):
        try:
            out = json.loads(text)
        except ValueError as e:
            raise PikuError(f"config:import: the input is not valid JSON ({e})")
        if not isinstance(out, dict):
            raise PikuError("config:import: expected a JSON object of \"KEY\": \"value\" pairs")
        for key, value in out.items():
            if not ENV_KEY_RE.fullmatch(key):
                raise PikuError(f"config:import: invalid key {key[:60]!r} (keys: letters, digits and _)")
            if not isinstance(value, str):
                raise PikuError(f"config:import: {key}: values must be JSON strings, got {json.dumps(value)[:40]}")
    else:
        out = parse_env(text, source="config:import input")
    if not out:
        raise PikuError("config:import: no KEY=value lines in the input, nothing to import "
                        "(usage: config:import APP < settings.env)")
    return out


def plan_config_changes(old, new):
    """Keys whose value differs between two configs (set, changed or removed), sorted."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def parse_assignments(args):
    """['K=V', 'K2=a', 'b'] -> {'K': 'V', 'K2': 'a b'} (words without '=' continue a value)."""
    out, last = {}, None
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and ENV_KEY_RE.fullmatch(key):
            out[key] = value
            last = key
        elif last is not None:
            out[last] += " " + arg
        else:
            raise PikuError(f"expected KEY=VALUE, got {arg[:60]!r}{'...' if len(arg) > 60 else ''} "
                            "(keys: letters, digits and _, at most 128 of them, not starting with a digit)")
    return out


def parse_scaling(text):
    """SCALING file text ('kind:count' or 'kind=count' lines) -> {kind: count}."""
    out = {}
    for line in split_lines(text):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, count = line.replace("=", ":").partition(":")
        if KIND_RE.fullmatch(kind.strip()):
            try:
                out[kind.strip()] = max(0, int(count.strip()))
            except ValueError:
                continue
    return out


def render_scaling(scaling):
    return "".join(f"{k}:{v}\n" for k, v in scaling.items())


def parse_ports(text):
    """state/<app>/ports.json text -> ({"port": N, "web": {"a": [N, ...], "b": [...]}} holding
    only the parts that are well-formed, [problems]). piku writes the file, but a hand edit or a
    cut-off write must not stop an operation: whatever is malformed is left out and said."""
    import json
    if not (text or "").strip():
        return {}, []
    try:
        data = json.loads(text)
    except ValueError:
        return {}, ["is not valid JSON"]
    if not isinstance(data, dict):
        return {}, ["is not a JSON object"]
    def port(p):  # piku writes numbers; older versions' strings of ASCII digits count too
        digits = isinstance(p, str) and p.isascii() and p.isdigit()
        return (type(p) is int or digits) and 0 < int(p) < 65536
    out, problems = {}, []
    if port(data.get("port")):
        out["port"] = int(data["port"])
    elif data.get("port") not in (None, ""):
        problems.append(f"has port {str(data['port'])[:20]!r}, which is no port number")
    web = data.get("web")
    if web is not None and not isinstance(web, dict):
        problems.append("has a `web` that is not an object")
    elif web is not None:
        out["web"] = {}
        for slot in ("a", "b"):
            ports = web.get(slot) or []
            good = [int(p) for p in ports if port(p)] if isinstance(ports, list) else []
            if not isinstance(ports, list) or len(good) != len(ports):
                problems.append(f"has web slot {slot} holding something other than port numbers")
            out["web"][slot] = good
    return out, problems


def parse_scale_args(args, known_kinds, behind_nginx=False):
    """['web=2', 'worker=0'] -> {kind: n}; unknown kinds and bad counts raise (KINDS says how
    many of a kind may run)."""
    out = {}
    for arg in args:
        kind, sep, count = arg.partition("=")
        if not sep:
            raise PikuError(f"expected KIND=COUNT, got {arg!r}")
        if kind not in known_kinds:
            raise PikuError(f"unknown process kind {kind!r}; this app has: {', '.join(sorted(known_kinds)) or 'none'}")
        out[kind] = parse_int(count, kind, 0, 64)
        if out[kind] > max_scale(kind, behind_nginx):
            raise PikuError(SCALE_LIMITS.get(kind_name(kind), f"{kind}: at most {max_scale(kind, behind_nginx)}"))
    return out


SCALE_LIMITS = {
    "web": "web: without nginx every web process would get the same PORT; set NGINX_SERVER_NAME (nginx "
           "then balances over one port per process), run more workers inside it (e.g. gunicorn "
           "--workers N), or scale a wsgi worker",
    "cron": "a cron job runs once per schedule; scale it to 0 or 1"}


# === 6. Parsers (pure): ssh commands, keys, Python versions, backups ===

GIT_COMMANDS = ("git-receive-pack", "git-upload-pack")
SSH_INTERNAL = GIT_COMMANDS + ("scp",)  # hidden commands an ssh client may send
SCP_FLAGS = ("-t", "-f", "-r", "-p", "-d", "-v")


def parse_scp_args(args):
    """The server side of legacy scp (`scp -t|-f [-r -p -d -v] PATH`) -> (flags, path)."""
    flags = [a for a in args if a.startswith("-")]
    targets = [a for a in args if not a.startswith("-")]
    if any(f not in SCP_FLAGS for f in flags) or len(targets) != 1 or \
            (("-t" in flags) == ("-f" in flags)):
        raise PikuError("refused: scp takes -t or -f, optionally -r -p -d -v, and one path "
                        "under an app's data directory")
    return flags, targets[0]


def parse_ssh_command(original):
    """SSH_ORIGINAL_COMMAND -> argv for the CLI. Never touches a shell."""
    import shlex
    if original is None or not original.strip():
        return ["help"]
    if "\0" in original:
        raise PikuError("refused: NUL byte in command")
    try:
        argv = shlex.split(original)
    except ValueError as e:
        raise PikuError(f"refused: cannot parse command ({e})")
    if argv and argv[0] in ("git-receive-pack", "git-upload-pack", "git receive-pack", "git upload-pack"):
        if len(argv) != 2:
            raise PikuError(f"refused: {argv[0]} takes exactly one repository")
        return [argv[0], parse_app_name(argv[1])]
    if argv[:1] == ["git"] and len(argv) == 3 and argv[1] in ("receive-pack", "upload-pack"):
        return ["git-" + argv[1], parse_app_name(argv[2])]
    return argv


SSH_DEST_RE = re.compile(r"(?:[A-Za-z0-9._+-]{1,64}@)?(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])")


def parse_ssh_dest(dest, what):
    if not SSH_DEST_RE.fullmatch(dest or ""):
        raise PikuError(f"{what}: {dest!r} is not [user@]host")
    return dest


def parse_remote_url(url, what="git remote"):
    """A piku app's git remote URL -> (ssh destination, port or None, app).
    Forms: `[user@]host:app[.git]` and `ssh://[user@]host[:port]/app[.git]`."""
    u = (url or "").strip()
    m = re.fullmatch(r"ssh://([^/]+?)(?::(\d{1,5}))?/+([^/]+)", u) or \
        re.fullmatch(r"((?:[^@/:]+@)?(?:\[[^\]/]+\]|[^:/\[]+))():(?:~/|/)?([^/]+)", u)
    if not m:
        raise PikuError(f"{what}: {u!r} is not a piku remote (expected piku@host:app or "
                        "ssh://piku@host[:port]/app)")
    dest, port, app = m.groups()
    return parse_ssh_dest(dest, what), port or None, parse_app_name(app)


def parse_server_address(value):
    """PIKU_SERVER `[user@]host[:port]` (or ssh://...) -> (ssh destination, port or None)."""
    v = (value or "").strip()
    m = re.fullmatch(r"(?:ssh://)?([^/]+?)(?::(\d{1,5}))?/?", v)
    if not m:
        raise PikuError(f"PIKU_SERVER: {v!r} is not [user@]host[:port]")
    return parse_ssh_dest(m.group(1), "PIKU_SERVER"), m.group(2)


KEY_TYPE_RE = re.compile(r"(ssh-|ecdsa-|sk-)[\w@.-]+")
KEY_BLOB_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
AuthorizedKey = namedtuple("AuthorizedKey", "type fingerprint comment piku")


def split_key_lines(text):
    """Lines with their line feed, split as sshd reads authorized_keys (at \\n only)."""
    return re.findall(r"[^\n]*\n|[^\n]+\Z", text)


def key_fingerprint(blob):
    """OpenSSH's SHA256 fingerprint of a base64 key blob ('SHA256:...'); None if not base64."""
    import base64
    import binascii
    import hashlib
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return None
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def split_key_options(text):
    """'options type base64 ...' -> (options, rest): options end at the first blank outside quotes."""
    quoted = escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c in " \t" and not quoted:
            return text[:i], text[i:].lstrip()
    return text, ""


def parse_key_line(line):
    """One authorized_keys line -> AuthorizedKey, or None (blank, comment, not a key). `piku` is
    true when its forced command runs piku (this piku.py's line, or the original piku's)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    options = ""
    if not KEY_TYPE_RE.fullmatch(text.split()[0]):
        options, text = split_key_options(text)
    parts = text.split(None, 2)
    if len(parts) < 2 or not KEY_TYPE_RE.fullmatch(parts[0]) or not KEY_BLOB_RE.fullmatch(parts[1]):
        return None
    command = re.search(r'(?:^|,)command="((?:[^"\\]|\\.)*)"', options)
    piku = bool(command and re.match(r"(PIKU_ROOT|FINGERPRINT)=", command.group(1)) and "piku" in command.group(1))
    fp = key_fingerprint(parts[1])
    return AuthorizedKey(parts[0], fp, parts[2].strip() if len(parts) > 2 else "", piku) if fp else None


GROUP_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,62}")  # what git config takes as a variable name
REMOTE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,99}")


def parse_client_options(argv):
    """The piku client's own options (before the command) -> ({remotes, group, help, version},
    rest of argv). -r/--remote may be repeated; -g/--group names a group of remotes."""
    opts, argv = {"remotes": [], "group": None, "help": False, "version": False}, list(argv)
    while argv and argv[0].startswith("-"):
        arg = argv.pop(0)
        opt, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if opt in ("-h", "--help", "--version"):
            opts["version" if opt == "--version" else "help"] = True
            return opts, argv
        if opt not in ("-r", "--remote", "-g", "--group"):
            raise PikuError(f"unknown option {opt!r} (see `piku --help`)", 2)
        value = value if eq else (argv.pop(0) if argv else "")
        if not value:
            raise PikuError(f"{opt} needs a name (see `piku --help`)", 2)
        if opt in ("-g", "--group"):
            if opts["group"] or not GROUP_NAME_RE.fullmatch(value):
                raise PikuError(f"-g takes one group name (letters, digits and -, as in git config "
                                f"piku.group.NAME), got {value[:40]!r}", 2)
            opts["group"] = value
        else:
            opts["remotes"].append(value)
    if opts["group"] and opts["remotes"]:
        raise PikuError("use either -g GROUP or -r REMOTE (a group lists its remotes)", 2)
    return opts, argv


def parse_group_remotes(group, value):
    """The value of `git config piku.group.GROUP` ('prod1 prod2', commas work too) -> remote
    names in order, each once."""
    names = list(dict.fromkeys(n for n in re.split(r"[\s,]+", value or "") if n))
    if not names:
        raise PikuError(f"group {group} lists no remotes: git config piku.group.{group} \"REMOTE1 REMOTE2\"")
    return names


PYVER_RE = re.compile(r"(?:(?:cpython|python)[-@]?)?(\d+(?:\.\d+){0,2})(t)?", re.I)
PYSPEC_RE = re.compile(r"\s*(?:(?:==|!=|<=|>=|~=|<|>)\s*\d+(?:\.\d+){0,2}(?:\.\*)?\s*,?\s*)+")


def parse_python_version(value):
    """PYTHON_VERSION / .python-version content -> uv request string. Garbage raises."""
    v = split_lines((value or "").strip())[0].strip()
    if not v:
        return None
    m = PYVER_RE.fullmatch(v)
    if m:
        if not m.group(1).startswith("3") or len(m.group(1)) > 10:
            raise PikuError(f"PYTHON_VERSION {value!r}: only Python 3 is supported")
        return m.group(1) + (m.group(2) or "")
    if PYSPEC_RE.fullmatch(v):
        return v.replace(" ", "").rstrip(",")
    raise PikuError(f"invalid Python version {value!r}: use 3, 3.12, 3.12.1 or a range like >=3.11")


def parse_plugin_python(blob):
    """Bytes of the uWSGI python plugin -> 'X.Y' of the libpython it links, or None."""
    m = re.search(rb"libpython(3\.\d+)", blob)
    return m.group(1).decode() if m else None


def parse_pyvenv_cfg(text):
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def parse_uv_changes(output):
    """uv's ' + pkg==1.0' / ' - pkg==0.9' lines -> (added, removed)."""
    added = [l.strip()[2:] for l in output.splitlines() if l.startswith(" + ")]
    removed = [l.strip()[2:] for l in output.splitlines() if l.startswith(" - ")]
    return added, removed


def parse_requirement_includes(requirements_text):
    """Files a requirements file pulls in: `-r FILE`, `--requirement FILE`, `-c`, `--constraint`."""
    out = []
    for line in requirements_text.splitlines():
        m = re.match(r"^\s*(?:-r|-c|--requirement|--constraint)(?:\s*=\s*|\s+|(?<=-r)|(?<=-c))(\S+)", line)
        if m:
            out.append(m.group(1))
    return out


def is_fully_pinned(requirements_text):
    """Every requirement is `name==version` (extras, markers and comments allowed): the file
    may be a complete lock, which `uv pip sync` installs exactly."""
    reqs = [l.split("#")[0].strip() for l in requirements_text.splitlines()]
    reqs = [r for r in reqs if r]
    return bool(reqs) and all(re.fullmatch(r"[A-Za-z0-9._\[\],-]+==[A-Za-z0-9.*+!_-]+(\s*;.*)?", r) for r in reqs)


def parse_missing_requirements(check_output):
    """Packages `uv pip check` says are required but not installed."""
    return sorted(set(re.findall(r"requires `([A-Za-z0-9._-]+)[^`]*`, but it's not installed", check_output)))


def parse_lock_local_sources(lock_text):
    """Local directories and files a uv.lock installs from (`directory`, `editable`, `path`
    sources), relative to the project; the project itself (".") is left out."""
    found = re.findall(r'^source = \{ (?:directory|editable|path) = "([^"]+)"', lock_text, re.M)
    return sorted({p for p in found if p not in (".", "./")})


def parse_requirement_local_paths(requirements_text):
    """Local paths a requirements file installs from: `./lib`, `../lib`, `-e ./lib`, `-e .`,
    `file:` URLs and `name @ file:` references."""
    out = []
    for line in requirements_text.splitlines():
        line = line.split(" #")[0].strip()
        line = re.sub(r"^(?:-e|--editable)(?:\s*=\s*|\s+)", "", line)
        m = re.search(r"(?:^|@\s*)file://(/\S*)", line) or re.fullmatch(r"(\.{1,2}(?:/\S*)?|/\S+)", line)
        if m:
            out.append(m.group(1).split("#")[0])
    return out


def daemon_restarts(log_text):
    """How often uWSGI restarted a daemon (web/worker process) in this log text, and whether it
    is now holding it back for dying too fast."""
    return (log_text.count("[uwsgi-daemons] respawning"), "[uwsgi-daemons] throttling" in log_text)


def crash_looping(log_tail):
    """The last lines of a daemon worker's log say it keeps dying: restarted at least twice
    among them, or held back by uWSGI's throttling."""
    restarts, throttled = daemon_restarts(log_tail)
    return restarts >= 2 or throttled


def parse_webhook_url(value, key="PIKU_DEPLOY_WEBHOOK"):
    """An http:// or https:// URL (ASCII, no spaces, no user:password@) -> the URL; else raises."""
    import ipaddress
    from urllib.parse import urlsplit
    v = str(value)
    shown = repr(v[:60]) + ("..." if len(v) > 60 else "")
    try:
        parts = urlsplit(v)
        parts.port  # (raises for a port that is not a number from 0 to 65535)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or len(v) > 2000 \
            or not v.isascii() or not v.isprintable() or " " in v:
        raise PikuError(f"{key}: expected an http:// or https:// URL (ASCII, no spaces), got {shown}")
    if "@" in parts.netloc:
        raise PikuError(f"{key}: user:password@ in the URL is not supported: put the token in its path or query")
    host = parts.hostname
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOSTNAME_RE.fullmatch(host) or host == "_" or host.startswith("*"):
            raise PikuError(f"{key}: {host[:60]!r} is not a host name or IP address")
    return v


# A backup archive (`backup APP`): these files, the folders `config`, `tls` and `data`, and under
# data/ the app's own files, folders and symbolic links (leading nowhere outside data/).
BACKUP_FORMAT = 1
BACKUP_FILES = {"manifest.json": 64 << 20, "repo.bundle": None, "config/ENV": 2 << 20, "config/SCALING": 1 << 16,
                "tls/crt": 1 << 20, "tls/key": 1 << 20, "tls/certificate.json": 1 << 16}
BACKUP_DIRS = ("config", "tls", "data")
GIT_REV_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
BRANCH_RE = re.compile(r"refs/heads/[A-Za-z0-9_][A-Za-z0-9._/-]{0,200}")


def parse_backup_member(name, kind, size=0, link=""):
    """One member of a backup archive (kind: file, dir, link, or what else it is) -> its path
    relative to the archive's top; raises for what restore must not write: absolute or `..`
    paths, names a backup does not have, other types, links that lead out of data/."""
    shown = repr(name[:80])
    rel = name[:-1] if kind == "dir" and name.endswith("/") else name
    parts = rel.split("/")
    if not rel or len(rel) > 4096 or rel.startswith("/") or "\0" in rel \
            or any(p in ("", ".", "..") or len(p) > 255 for p in parts):
        raise PikuError(f"the member {shown} leads out of the archive's folder (an absolute path or `..`)")
    if kind == "link":
        target = "" if not link or link.startswith("/") or "\0" in link else \
            os.path.normpath(os.path.join(os.path.dirname(rel), link))
        if parts[0] != "data" or len(parts) < 2 or not (target == "data" or target.startswith("data/")):
            raise PikuError(f"the symbolic link {shown} -> {link[:80]!r} leads out of the app's data")
        return rel
    if kind not in ("file", "dir"):
        raise PikuError(f"the member {shown} is a {kind}: a backup holds only files, folders and symbolic links")
    if kind == "file" and rel in BACKUP_FILES:
        if BACKUP_FILES[rel] is not None and size > BACKUP_FILES[rel]:
            raise PikuError(f"{rel} is {size} bytes long, more than a backup's ever is")
        return rel
    if parts[0] == "data" and (len(parts) > 1 or kind == "dir") or (kind == "dir" and rel in BACKUP_DIRS):
        return rel
    raise PikuError(f"the member {shown} ({kind}) is not part of a piku backup")


def backup_digest(manifest):
    """The sha256 of a backup manifest's fields, its own `digest` left out."""
    import hashlib
    import json
    body = json.dumps({k: v for k, v in manifest.items() if k != "digest"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def parse_backup_manifest(text, files, links):
    """manifest.json of a backup, checked against what the archive held (files: {path: sha256},
    links: {path: target}) -> the manifest as a dict; raises when it cannot be verified."""
    import json
    try:
        m = json.loads(text or "")
    except ValueError:
        m = None
    if not isinstance(m, dict):
        raise PikuError("the archive has no manifest.json, or not one piku wrote (a JSON object)")
    if isinstance(m.get("format"), int) and m["format"] > BACKUP_FORMAT:
        raise PikuError(f"the archive was made by a newer piku.py (backup format {m['format']}): update piku.py "
                        "here first")
    if m.get("format") != BACKUP_FORMAT or not isinstance(m.get("digest"), str):
        raise PikuError("the manifest has no digest (unsigned): not a backup piku made")
    if m["digest"] != backup_digest(m):
        raise PikuError("the manifest does not match its digest: it was changed or damaged")
    checks = {"app": lambda v: isinstance(v, str) and APP_NAME_RE.fullmatch(v),
              "rev": lambda v: isinstance(v, str) and GIT_REV_RE.fullmatch(v),
              "branch": lambda v: isinstance(v, str) and BRANCH_RE.fullmatch(v) and ".." not in v,
              "release": lambda v: v is None or isinstance(v, str) and len(v) < 200,
              "files": lambda v: isinstance(v, dict) and all(isinstance(h, str) for h in v.values()),
              "links": lambda v: isinstance(v, dict)}
    for key, ok in checks.items():
        if not ok(m.get(key)):
            raise PikuError(f"the manifest has no valid {key!r}")
    held = {k: v for k, v in files.items() if k != "manifest.json"}
    for what, want, have in (("file", m["files"], held), ("symbolic link", m["links"], links)):
        for path in sorted(set(want) | set(have)):
            if path not in have:
                raise PikuError(f"the {what} {path} of the manifest is missing from the archive (cut off?)")
            if path not in want:
                raise PikuError(f"the {what} {path} is in the archive but not in its manifest")
            if want[path] != have[path]:
                raise PikuError(f"{path} does not match the manifest: the archive was changed or damaged")
    if "repo.bundle" not in held:
        raise PikuError("the archive holds no repo.bundle")
    return m


# === 7. Settings ===
# Layering: defaults < repo ENV < config:set values (envs/<app>/ENV) < computed values.
# SETTINGS is the one table of what piku reads: name, default (None: unset), the check a value
# must pass before anything is written, and a one-line doc (docs/ENV.md has the long form; a
# unit test keeps the two in step).

Setting = namedtuple("Setting", "name default check doc")


def v_int(lo, hi):
    return lambda value, key: parse_int(value, key, lo, hi)


def v_bool(value, key):
    parse_bool(value, key)


def v_choice(*choices):
    def check(value, key):
        if value not in choices:
            raise PikuError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return check


def v_count_or_bool(value, key):
    parse_count_or_bool(value, key, 0)


def v_ip(value, key):
    parse_ip(value, key)


def v_hostnames(value, key):
    for name in split_names(value):
        if not HOSTNAME_RE.fullmatch(name):
            raise PikuError(f"{key}: invalid host name {name!r}")


def v_path(value, key):
    safe_path(value, key)


S = Setting
SETTINGS = (
    # piku
    S("PIKU_AUTO_RESTART", "true", v_bool, "restart running processes on deploys and config changes"),
    S("PIKU_PREBOOT", "true", v_bool, "start a web process's new release before the old one stops"),
    S("PIKU_WEB_ROUTER", "true", v_bool, "nginx reaches blue/green web processes through uWSGI routers"),
    S("PIKU_HEALTH_TIMEOUT", "30", v_int(1, 3600), "seconds new processes get to answer"),
    S("PIKU_HEALTHCHECK", "http", v_choice("http", "connect"), "what the health check asks: a GET, or a connect"),
    S("PIKU_HEALTHCHECK_PATH", "/", lambda v, k: parse_health_path(v, k), "the path the health check GETs"),
    S("PIKU_HEALTHCHECK_STATUS", "", lambda v, k: parse_status_spec(v), "healthy statuses (default: below 500)"),
    S("PIKU_RELEASES_KEPT", str(DEFAULT_RELEASES_KEPT), v_int(1, 100), "releases kept per app"),
    S("PIKU_VERBOSE", "false", v_bool, "show build tools' output on success too"),
    S("PIKU_USE_UV", "true", v_bool, "build requirements.txt apps with uv (else virtualenv + pip)"),
    S("PIKU_CRON_OVERLAP", "allow", v_choice("allow", "forbid"), "forbid: skip a cron run while its previous one runs"),
    S("PIKU_PYUWSGI", "auto", v_choice("auto", "never", "always"), "serve wsgi with the venv's own uWSGI"),
    S("PIKU_UWSGI_PLUGIN_DIR", None, v_path, "where to look first for uWSGI's python3 plugin"),
    S("PIKU_MAINTENANCE_DURING_RELEASE", "false", v_bool, "maintenance mode while `release:` runs"),
    S("PIKU_DEPLOY_WEBHOOK", None, lambda v, k: parse_webhook_url(v, k), "URL told of each deploy (JSON POST)"),
    S("PIKU_DEPLOY_WEBHOOK_TIMEOUT", "5", v_int(1, 60), "seconds a deploy waits for the webhook at most"),
    # Python and uv
    S("PYTHON_VERSION", None, lambda v, k: parse_python_version(v), "the app's Python version"),
    S("UV_PYTHON_PREFERENCE", "managed", None, "where uv takes Pythons from"),
    S("PATH", None, None, "the PATH after the virtualenv's bin/"),
    # other runtimes
    S("NODE_VERSION", None, lambda v, k: parse_node_version(v), "the app's Node.js version (nodeenv installs others)"),
    S("NODE_PACKAGE_MANAGER", None, lambda v, k: parse_package_manager(v), "npm, yarn or pnpm, with options"),
    # network
    S("BIND_ADDRESS", "127.0.0.1", v_ip, "where wsgi and web processes listen"),
    S("PORT", None, v_int(1, 65535), "the port of wsgi/web"),
    S("DISABLE_IPV6", "false", v_bool, "no IPv6 listen lines in nginx"),
    S("NGINX_IPV4_ADDRESS", "0.0.0.0", v_ip, "nginx IPv4 listen address"),
    S("NGINX_IPV6_ADDRESS", "[::]", v_ip, "nginx IPv6 listen address"),
    S("NGINX_HTTP_PORT", "80", v_int(1, 65535), "nginx HTTP port"),
    S("NGINX_HTTPS_PORT", "443", v_int(1, 65535), "nginx HTTPS port"),
    # nginx
    S("NGINX_SERVER_NAME", None, v_hostnames, "host names; puts the app behind nginx"),
    S("NGINX_HTTPS_ONLY", "false", v_bool, "redirect HTTP to HTTPS"),
    S("NGINX_STATIC_PATHS", None, lambda v, k: parse_static_paths(v), "/url:dir pairs nginx serves"),
    S("NGINX_CATCH_ALL", None, lambda v, k: render_catch_all(v), "fallback page of static locations"),
    S("NGINX_INCLUDE_FILE", None, v_path, "file included in the app's server block"),
    S("NGINX_ALLOW_GIT_FOLDERS", "false", v_bool, "serve URLs containing /.git"),
    S("NGINX_CLOUDFLARE_ACL", "false", v_bool, "only Cloudflare and loopback may connect"),
    S("NGINX_CACHE_PREFIXES", None, lambda v, k: parse_url_prefixes(v, k), "URL prefixes nginx caches"),
    S("NGINX_CACHE_SIZE", "1", v_int(1, 10**6), "cache size in GB"),
    S("NGINX_CACHE_TIME", "3600", v_int(0, 10**9), "seconds a cached 200/304 is valid"),
    S("NGINX_CACHE_CONTROL", "3600", v_int(0, 10**9), "max-age of cached responses"),
    S("NGINX_CACHE_EXPIRY", "86400", v_int(0, 10**9), "unused cache entries are dropped after this"),
    S("NGINX_CACHE_REDIRECTS", "3600", v_count_or_bool, "seconds cached redirects are valid"),
    S("NGINX_CACHE_ANY", "0", v_count_or_bool, "seconds other cached statuses are valid"),
    S("NGINX_CACHE_PATH", None, v_path, "where the cache lives"),
    S("NGINX_CLIENT_MAX_BODY_SIZE", "64m", lambda v, k: parse_body_size(v, k), "largest request body"),
    S("NGINX_PROXY_READ_TIMEOUT", None, v_int(1, 604800), "seconds nginx waits for the app's response"),
    S("NGINX_PROXY_SEND_TIMEOUT", None, v_int(1, 604800), "seconds nginx waits to send the app a request"),
    S("NGINX_PROXY_BUFFERING", "true", v_bool, "false: pass responses on as they come (streaming, SSE)"),
    S("NGINX_WEBSOCKET_TIMEOUT", None, v_int(1, 604800), "idle seconds before a web app's WebSocket closes"),
    S("NGINX_GZIP", "true", v_bool, "compress text responses"),
    S("NGINX_HSTS", "0", v_count_or_bool, "Strict-Transport-Security max-age over HTTPS (0: off)"),
    S("NGINX_BASIC_AUTH", None, lambda v, k: parse_basic_auth_setting(v, k), "user:hash list, or a file"),
    S("NGINX_ALLOW", None, lambda v, k: parse_allow_list(v, k), "only these addresses/networks may connect"),
    S("NGINX_REDIRECT", None, lambda v, k: parse_redirects(v, k), "from:to name pairs answered with a 301"),
    S("NGINX_LOG_MAXSIZE", "10485760", v_int(0, 10**12), "cap of the app's nginx logs in bytes"),
    # uWSGI
    S("UWSGI_MAX_REQUESTS", "1024", v_int(0, 10**9), "recycle a worker after this many requests"),
    S("UWSGI_LISTEN", "16", v_int(1, 65535), "socket backlog"),
    S("UWSGI_PROCESSES", "1", v_int(1, 1024), "worker processes per wsgi instance"),
    S("UWSGI_THREADS", "4", v_int(1, 1024), "threads per worker"),
    S("UWSGI_ENABLE_THREADS", "true", v_bool, "let the app start threads"),
    S("UWSGI_LOG_MAXSIZE", "1048576", v_int(0, 10**12), "rotate logs at this size"),
    S("UWSGI_LOG_X_FORWARDED_FOR", "false", v_bool, "log the X-Forwarded-For address"),
    S("UWSGI_GEVENT", "0", v_count_or_bool, "gevent cores instead of threads"),
    S("UWSGI_ASYNCIO", "0", v_int(0, 10**5), "asyncio cores instead of threads"),
    S("UWSGI_IDLE", "", v_int(0, 10**7), "exit after this many idle seconds"),
    S("UWSGI_INCLUDE_FILE", None, v_path, "extra uWSGI options for every vassal"),
    # TLS
    S("ACME_ROOT_CA", "letsencrypt.org", lambda v, k: parse_acme_ca(v), "the ACME CA"),
    S("ACME_CLIENT", "auto", v_choice("auto", "acme.sh", "dehydrated", "none"), "the ACME client"),
    S("ACME_EMAIL", None, lambda v, k: parse_email(v, k), "ACME account contact"),
    S("ACME_CA_BUNDLE", None, v_path, "CA file for the ACME server's own HTTPS"),
)
del S
SETTING = {s.name: s for s in SETTINGS}
DEFAULTS = {s.name: s.default for s in SETTINGS if s.default is not None}


# Every setting is in the environment of every process: Linux refuses to start a program when
# one variable is over 128 KiB, or all of them with the arguments over a quarter of the stack
# limit (2 MiB by default). Keys: at most 128 characters (ENV_KEY_RE).
MAX_VALUE_BYTES = 64 * 1024
MAX_SETTINGS_BYTES = 1024 * 1024


def check_env_limits(env, source):
    """Raise for what no process environment can hold: a value over MAX_VALUE_BYTES (UTF-8), a
    NUL character, text without a UTF-8 form (a lone surrogate), or settings over
    MAX_SETTINGS_BYTES together."""
    total = 0
    for key, value in env.items():
        try:
            size = len(value.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:
            raise PikuError(f"{source}: {key} holds text that has no UTF-8 form (a lone surrogate, \\ud800-\\udfff)")
        if "\0" in value:
            raise PikuError(f"{source}: {key} holds a NUL character, which no process environment can")
        if size > MAX_VALUE_BYTES:
            raise PikuError(f"{source}: {key} is {size} bytes long; a value may have at most "
                            f"{MAX_VALUE_BYTES // 1024} KiB (keep big data in a file, e.g. under $DATA_ROOT)")
        total += len(key) + 1 + size
    if total > MAX_SETTINGS_BYTES:
        raise PikuError(f"{source}: the settings take {total} bytes together; at most "
                        f"{MAX_SETTINGS_BYTES // 1024 // 1024} MiB are allowed (keep big data in files)")


def merge_settings(repo_env, config, base):
    """An app's settings: its repo ENV < its config:set values, those expanded (expand_config)."""
    return {**repo_env, **expand_config(config, {**base, **repo_env})}


def validate_settings(settings, source="settings"):
    """Raise PikuError for the first setting piku cannot use; returns settings. An empty value
    means unset (the default applies), as it always has."""
    check_env_limits(settings, source)
    for s in SETTINGS:
        value = settings.get(s.name, "")
        if s.check and value != "":
            try:
                s.check(value, s.name)
            except PikuError as e:  # (messages quote the value: keep a long one to one line)
                raise PikuError(str(e) if len(str(e)) <= 300 else str(e)[:300] + "... (shortened)", e.code)
    return settings


def parse_ip(value, key):
    """An IPv4 or IPv6 address (brackets allowed around IPv6); raises otherwise."""
    import ipaddress
    try:
        ipaddress.ip_address(value.strip("[]") if value.startswith("[") and value.endswith("]") else value)
    except ValueError:
        raise PikuError(f"{key}: not an IP address: {value!r}")
    return value


def split_names(value):
    return [n for n in re.split(r"[,\s]+", value or "") if n]


def setting(settings, key):
    return settings.get(key, DEFAULTS.get(key, ""))


def setting_bool(settings, key):
    return parse_bool(setting(settings, key) or "false", key)


def setting_int(settings, key):
    return int(setting(settings, key))


# number-or-boolean settings: what `true` stands for
COUNT_OR_BOOL = {"UWSGI_GEVENT": lambda s: 100, "NGINX_CACHE_ANY": lambda s: setting_int(s, "NGINX_CACHE_TIME"),
                 "NGINX_HSTS": lambda s: 31536000,
                 "NGINX_CACHE_REDIRECTS": lambda s: setting_int(s, "NGINX_CACHE_TIME")}


def setting_count(settings, key):
    return parse_count_or_bool(setting(settings, key), key, COUNT_OR_BOOL[key](settings))


def computed_env(paths, app, settings, port, home, user, base_path, src_layout=False, venv=None, app_dir=None):
    """Values piku injects into every process; they override ENV (except PORT, PATH set there).
    venv and app_dir: the release's own virtualenv and directory (envs/<app> and apps/<app>,
    the live ones, when not given). src_layout: the app keeps its packages in src/ (the project
    itself is not installed into the virtualenv), so <app_dir>/src goes first on PYTHONPATH."""
    venv = venv or os.path.join(paths.envs, app)
    app_dir = app_dir or os.path.join(paths.apps, app)
    user_path = settings.get("PATH") or base_path
    extra = {}
    if src_layout:
        extra["PYTHONPATH"] = ":".join(p for p in (os.path.join(app_dir, "src"), settings.get("PYTHONPATH")) if p)
    return extra | {
        "APP": app,
        "DATA_ROOT": os.path.join(paths.data, app),
        "LOG_ROOT": paths.logs,
        "HOME": home,
        "USER": user,
        "PATH": os.path.join(venv, "bin") + ":" + user_path,
        "VIRTUAL_ENV": venv,
        "PIKU_APP_DIR": app_dir,
        "PORT": str(port),
        "BIND_ADDRESS": setting(settings, "BIND_ADDRESS"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "UTF_8:replace",
    }


# === 8. Renderers (pure): uWSGI, launchers, git hooks, keys, the original piku's files ===

UWSGI_MAGIC_RE = re.compile(r"[$@%]\(|%[a-zA-Z0-9]|[\0" + LINE_BREAKS + "]")


def render_ini(pairs):
    """[(key, value)] -> uWSGI ini text; refuses values uWSGI would interpret."""
    lines = ["[uwsgi]"]
    for key, value in pairs:
        value = str(value)
        if UWSGI_MAGIC_RE.search(value) or value.strip().startswith((";", "#")):
            raise PikuError(f"refusing to write {key} = {value[:60]!r} into a uWSGI ini")
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def worker_dir(v):
    """Where a worker runs: its release's own directory (apps/<app> for files of older versions)."""
    return v.get("dir") or os.path.join(v["paths"].apps, v["app"])


def exec_worker_argv(v, *first):
    """argv for `exec-worker`: the release directory, environment file and port the worker gets
    are named in its vassal, so a worker started again later runs exactly what it ran before."""
    opts = [*first]
    for flag, key in (("--dir", "dir"), ("--env", "env_file"), ("--port", "worker_port"),
                      ("--uwsgi", "inner")):
        if v.get(key):
            opts += [flag, str(v[key])]
    return v["piku"] + ["exec-worker"] + opts + [v["app"], v["kind"], str(v["index"])]


def render_launch(directory, argv, env):
    """A worker's launch file, as SUPERVISOR --launch reads it: the directory it runs in, its
    command and its environment (on top of the master's INHERITED_ENV), a line each, with `\\`
    for a backslash and `\\n` for a line feed (no NUL: neither argv nor environ can hold one)."""
    fields = ["piku-launch 1", directory, str(len(argv))] + list(argv) + [f"{k}={v}" for k, v in env.items()]
    for key in env:
        if not ENV_KEY_RE.fullmatch(key):
            raise PikuError(f"invalid key {key!r}: letters, digits and _ only")
    for field in fields:
        if "\0" in field:
            raise PikuError(f"refusing a NUL character in a worker's environment or command: {field[:60]!r}")
    return "".join(field.replace("\\", "\\\\").replace("\n", "\\n") + "\n" for field in fields)


def launch_argv(v):
    """How a vassal starts its daemon from its launch file: the supervisor straight away."""
    return [v["piku"][0], "-I", "-S", supervisor_path(v["paths"]), "--launch", v["launch"], str(SUPERVISOR_GRACE)]


def render_vassal(v):
    """Vassal ini for one worker. `v` is a dict: app, kind, index, paths, settings, port,
    piku (argv prefix running piku.py), python_plugin, mode ('native'|'pyuwsgi'|'daemon'),
    socket (unix socket for nginx or None), release (a label), and for workers of a release:
    dir (its directory), env_file, boot (wsgi loader), inner + fifo (pyuwsgi), check_socket
    (a private socket the health check uses), worker_port (a web instance's own port), router
    (the unix socket of its router, web_routed)."""
    import shlex
    s, p, app, kind, n = v["settings"], v["paths"], v["app"], v["kind"], v["index"]
    # (no vacuum: a master still shutting down must not unlink a socket the next one bound)
    pairs = [("master", "true"), ("die-on-term", "true"),
             ("chdir", worker_dir(v)),
             ("procname-prefix-spaced", f"{app}:{kind}.{n}"),
             ("env", f"PIKU_ROOT={p.root}"),
             ("logto", v.get("log") or os.path.join(p.logs, app, f"{kind}.{n}.log")),
             ("log-maxsize", setting(s, "UWSGI_LOG_MAXSIZE")),
             ("log-backupname", (v.get("log") or os.path.join(p.logs, app, f"{kind}.{n}.log")) + ".old")]
    if v.get("master_fifo"):  # piku wakes the master through it (it acts once a second otherwise)
        pairs.append(("master-fifo", v["master_fifo"]))
    if v["mode"] == "native":
        plugins = [v.get("python_plugin") or "python3"] + list(v.get("extra_plugins") or [])
        pairs = [("plugin", ",".join(plugins))] + pairs + wsgi_pairs(v)
    elif kind.startswith("cron"):
        pairs.append(("cron", "-1 -1 -1 -1 -1 " + shlex.join(exec_worker_argv(v, "--if-due"))))
        # @reboot jobs start when this master does (a deploy, restart, boot); uWSGI gives the
        # whole vassal up if a master-start hook fails, so this one never does
        pairs.append(("hook-master-start", "exec:" + shlex.join(exec_worker_argv(v, "--at-start")) + " || true"))
    else:  # a daemon: web, worker, or the virtualenv's own uWSGI (pyuwsgi)
        # uWSGI runs it with /bin/sh -c, which would fork it: exec keeps it the master's own child,
        # so that it (and the supervisor it execs into) sees the master die
        argv = launch_argv(v) if v.get("launch") else exec_worker_argv(v)
        if v.get("router"):  # nginx reaches the daemon's port through this socket (web_routed)
            pairs += [("plugin", "rawrouter"), ("rawrouter", v["router"]), ("chmod-socket", "660"),
                      ("rawrouter-to", host_port(connect_host(setting(s, "BIND_ADDRESS")), v["worker_port"])),
                      # nginx's own timeouts govern a request; the router forwards bytes while it lasts
                      ("rawrouter-timeout", str(ROUTER_TIMEOUT_SECONDS))]
        pairs.append(("attach-daemon2", "cmd=exec " + shlex.join(argv) + ",stopsignal=15"))
    if s.get("UWSGI_INCLUDE_FILE"):
        pairs.append(("ini", uwsgi_include(v)))
    return f"# piku release {v['release']}\n" + render_ini(pairs)


def uwsgi_include(v):
    """UWSGI_INCLUDE_FILE as uWSGI must read it: a relative path is the file of the worker's
    release (uWSGI would take it relative to the emperor's directory)."""
    include = safe_path(v["settings"]["UWSGI_INCLUDE_FILE"], "UWSGI_INCLUDE_FILE")
    return os.path.join(worker_dir(v), include)


def wsgi_pairs(v, inner=False):
    """The python-serving options shared by native vassals and pyuwsgi inner inis."""
    s, p, app = v["settings"], v["paths"], v["app"]
    pairs = [("wsgi-file", v.get("boot") or os.path.join(p.state, app, "wsgi_boot.py")),
             ("processes", setting(s, "UWSGI_PROCESSES")),
             ("max-requests", setting(s, "UWSGI_MAX_REQUESTS")),
             ("listen", setting(s, "UWSGI_LISTEN")),
             ("need-app", "true"), ("lazy-apps", "true"),
             # a worker recycled by max-requests exits at once: Python's teardown waits for the
             # worker's other threads, which can hang it until the master kills it (a stall)
             ("skip-atexit-teardown", "true"),
             # a graceful stop ends within 25 s: the master kills a worker still busy (or stuck) by
             # then, before the emperor gives up on the master at 30 s and kills it alone, which
             # would leave the worker running on, orphaned
             ("worker-reload-mercy", str(WORKER_STOP_MERCY_SECONDS)),
             # no app but ours in a worker: a uwsgi packet's UWSGI_FILE / UWSGI_SCRIPT /
             # UWSGI_MODULE (from anyone who reaches the socket) would load and run another one
             ("max-apps", "1"),
             # each worker enters its release's directory before loading the app (a master kept
             # across chain reloads may sit elsewhere)
             ("hook-pre-app", "chdir:" + worker_dir(v)),
             ("env", f"PROC_INDEX={v['index']}")]
    if v.get("port"):  # (behind nginx a wsgi worker has its unix socket alone)
        pairs += [("http-socket", host_port(setting(s, "BIND_ADDRESS"), v["port"])), ("reuse-port", "true")]
    if v.get("socket"):
        pairs += [("socket", v["socket"]), ("chmod-socket", "660")]  # nginx/ gives the group
    if v.get("check_socket"):  # in a 0700 directory: only piku reaches it
        pairs.append(("socket", v["check_socket"]))
    pairs += wsgi_concurrency_pairs(s)
    if setting_bool(s, "UWSGI_ENABLE_THREADS"):
        pairs.append(("enable-threads", "true"))
    if setting_bool(s, "UWSGI_LOG_X_FORWARDED_FOR"):
        pairs.append(("log-x-forwarded-for", "true"))
    if setting(s, "UWSGI_IDLE"):
        pairs += [("idle", setting(s, "UWSGI_IDLE")), ("die-on-idle", "true")]
    return pairs


ROUTER_TIMEOUT_SECONDS = 86400
WORKER_STOP_MERCY_SECONDS = 25  # (below the uWSGI emperor's default curse tolerance, 30 s)


def wsgi_concurrency_pairs(s):
    """How a wsgi worker serves requests side by side: gevent, asyncio or threads."""
    if setting_count(s, "UWSGI_GEVENT"):
        return [("gevent", str(setting_count(s, "UWSGI_GEVENT")))]
    if int(setting(s, "UWSGI_ASYNCIO") or 0) > 0:
        return [("asyncio", setting(s, "UWSGI_ASYNCIO")), ("greenlet", "true")]
    return [("threads", setting(s, "UWSGI_THREADS"))]


def render_inner_ini(v):
    """ini for the venv's own uWSGI (pyuwsgi) when the system plugin has another Python."""
    p, app, kind, n = v["paths"], v["app"], v["kind"], v["index"]
    include = v["settings"].get("UWSGI_INCLUDE_FILE")
    pairs = [("master", "true"), ("die-on-term", "true"), ("chdir", worker_dir(v)),
             ("procname-prefix-spaced", f"{app}:{kind}.{n}"),
             ("master-fifo", v.get("fifo") or os.path.join(p.state, app, f"{kind}.{n}.fifo"))] + wsgi_pairs(v) \
        + ([("ini", uwsgi_include(v))] if include else [])
    return render_ini(pairs)


def render_wsgi_boot(venv, app_dir, spec, env, pyver):
    """Python source that uWSGI loads: sets the app's environment, activates the venv
    (uv venvs have no activate_this.py), then imports module:callable."""
    module, _, attr = spec.partition(":")
    site = os.path.join(venv, "lib", f"python{pyver}", "site-packages")
    return (
        "# Written by piku.py on every deploy; do not edit.\n"
        "import os, sys, site, importlib\n"
        f"os.chdir({app_dir!r})\n"
        f"os.environ.update({env!r})\n"
        f"sys.path[0:0] = [{app_dir!r}] + [p for p in os.environ.get('PYTHONPATH', '').split(':') if p]\n"
        f"site.addsitedir({site!r})\n"
        f"sys.prefix = sys.exec_prefix = {venv!r}\n"
        f"application = getattr(importlib.import_module({module!r}), {attr or 'application'!r})\n"
    )


def safe_path(value, key):
    if not SAFE_PATH_RE.fullmatch(value or "") or ".." in value.split("/"):
        raise PikuError(f"{key}: {value!r} is not an acceptable path (letters, digits, ._/@+- only)")
    return value


def render_emperor_ini(paths):
    return render_ini([
        ("emperor", paths.uwsgi_enabled),
        ("emperor-freq", "1"),  # how often (s) the emperor scans for changed vassals
        ("master", "true"),
        ("master-fifo", os.path.join(paths.uwsgi, "emperor.fifo")),  # piku writes E: scan now
        ("logto", os.path.join(paths.uwsgi, "uwsgi.log")),
        ("log-maxsize", "1048576"),
        ("pidfile", os.path.join(paths.uwsgi, "uwsgi.pid")),
        ("stats", os.path.join(paths.uwsgi, "uwsgi-stats.sock")),
    ])


# Runs piku.py through the import system, so the compiled bytecode in __pycache__ is reused:
# every ssh command and push saves the ~25 ms of compiling this file. It uses the import
# machinery the interpreter has already loaded (importing importlib.util costs ~10 ms more a
# start). No quotes, no backslashes, no semicolon but between statements (the launcher file
# has a line for each). (Not -S: an older piku.py put back in place imports click at once.)
LAUNCHER = ("import sys,_frozen_importlib as b,_frozen_importlib_external as e;n,p=sys.argv[1:3];"
            "del sys.argv[1:3];s=e.spec_from_file_location(n,p);m=sys.modules[n]=b.module_from_spec(s);"
            "s.loader.exec_module(m);sys.exit(m.main())")


def launcher_argv(python, piku_py):
    """argv prefix that runs piku.py's main() from its cached bytecode."""
    return [python, "-c", LAUNCHER, "piku", piku_py]


def render_git_hook(python, piku_py, root, app):
    import shlex
    return ("#!/bin/sh\n# Written by piku.py: builds and deploys before git accepts the push.\n"
            f"PIKU_ROOT={shlex.quote(root)} exec {shlex.join(launcher_argv(python, piku_py))}"
            f" git-hook {shlex.quote(app)}\n")


def render_authorized_key(python, piku_py, root, key_line):
    import shlex
    cmd = f"PIKU_ROOT={shlex.quote(root)} {shlex.join(launcher_argv(python, piku_py))}"
    if '"' in cmd or "\\" in cmd:
        raise PikuError("piku.py path or PIKU_ROOT contains a quote or backslash; move it")
    return (f'command="{cmd}",no-agent-forwarding,no-user-rc,no-X11-forwarding,'
            f"no-port-forwarding {key_line.strip()}\n")


# -- the original piku's formats, for `downgrade` (what it reads and runs without piku.py) ------

ORIGINAL_REFUSED_RE = re.compile(r"[$@]\(|[\0" + LINE_BREAKS + "]")


def original_value_problem(value):
    """Why a value cannot go into a file in the original piku's formats, or None: uWSGI would
    evaluate `$(...)` and `@(...)` in its ini lines (a `%` can be escaped), a line break would
    end the line, and the original strips surrounding blanks."""
    if ORIGINAL_REFUSED_RE.search(value):
        return "it holds `$(`, `@(` or a line break, which the original piku's uWSGI lines would evaluate or cut"
    if value != value.strip():
        return "it starts or ends with blanks, which the original piku strips"
    return None


def original_ini_value(key, value):
    """A value for a line of an original-format vassal: uWSGI reads `%%` as `%`."""
    problem = original_value_problem(value)
    if problem:
        raise PikuError(f"{key}: {problem}")
    return value.replace("%", "%%")


def plan_original_cron(spec):
    """A Procfile cron line -> (uWSGI's `cron` fields, command): numbers, -1 for `*`, -N for
    `*/N`, which is all uWSGI's cron takes; raises for what it cannot express."""
    spec = spec.strip()
    if spec.startswith("@"):
        word, _, command = spec.partition(" ")
        if word not in CRON_SHORTCUTS:
            raise PikuError(f"`{word}`: the original piku's uWSGI cron has no such schedule")
        fields = CRON_SHORTCUTS[word].split()
    else:
        parts = spec.split(None, 5)
        if len(parts) < 6:
            raise PikuError(f"`{spec[:60]}` is not `M H DoM Mon DoW command`")
        fields, command = parts[:5], parts[5]
    out = []
    for field, (lo, hi), name in zip(fields, CRON_RANGES, CRON_NAMES):
        m = re.fullmatch(r"\*(?:/([0-9]{1,2}))?|([0-9]{1,2})", field)
        if not m or (m.group(2) and not lo <= int(m.group(2)) <= hi) or (m.group(1) and int(m.group(1)) < 1):
            raise PikuError(f"{name} `{field}`: the original piku's uWSGI cron takes a number, * or */N only")
        out.append(m.group(2) or (f"-{m.group(1)}" if m.group(1) else "-1"))
    return " ".join(out), command.strip()


def render_original_vassal(v):
    """A vassal in the original piku's format: the command itself, the environment on `env`
    lines, the virtualenv through uWSGI's `virtualenv`, the process title `app:kind:`. `v`:
    app, kind, index, paths, settings, chdir, command, env, venv, python_plugin,
    extra_plugins, socket or port (wsgi), check_socket (wsgi, private), cron (its fields)."""
    s, app, kind, n = v["settings"], v["app"], v["kind"], v["index"]
    log = os.path.join(v["paths"].logs, app, f"{kind}.{n}.log")
    pairs = [("chdir", v["chdir"]), ("master", "true"), ("project", app), ("procname-prefix", f"{app}:{kind}:"),
             ("max-requests", setting(s, "UWSGI_MAX_REQUESTS")), ("listen", setting(s, "UWSGI_LISTEN")),
             ("processes", setting(s, "UWSGI_PROCESSES")),
             ("enable-threads", "true" if setting_bool(s, "UWSGI_ENABLE_THREADS") else "false"),
             ("log-maxsize", setting(s, "UWSGI_LOG_MAXSIZE")), ("logto", log), ("log-backupname", log + ".old")]
    if v.get("venv"):
        pairs.append(("virtualenv", v["venv"]))
    if kind == "wsgi":
        plugins = [v.get("python_plugin") or "python3"] + list(v.get("extra_plugins") or [])
        pairs += [("plugin", ",".join(plugins)), ("module", v["command"])] + wsgi_concurrency_pairs(s)
        pairs += [("socket", v["socket"]), ("chmod-socket", "660")] if v.get("socket") else \
            [("http-socket", host_port(setting(s, "BIND_ADDRESS"), v["port"])), ("reuse-port", "true")]
        pairs += [("socket", v["check_socket"])] if v.get("check_socket") else []
    elif kind.startswith("cron"):
        pairs.append(("cron", f"{v['cron']} {original_ini_value(kind, v['command'])}"))
    else:
        pairs.append(("attach-daemon", original_ini_value(kind, v["command"])))
    if s.get("UWSGI_INCLUDE_FILE"):
        pairs.append(("ini", os.path.join(v["chdir"], safe_path(s["UWSGI_INCLUDE_FILE"], "UWSGI_INCLUDE_FILE"))))
    text = render_ini(pairs)
    return text + "".join(f"env = {k}={original_ini_value(k, val)}\n" for k, val in v["env"].items())


def render_original_env(env):
    """ENV / LIVE_ENV as the original piku reads them: `KEY=value` lines, no quoting (it would
    keep the quotes); values must pass original_value_problem."""
    for key, value in env.items():
        problem = original_value_problem(value)
        if problem or not ENV_KEY_RE.fullmatch(key):
            raise PikuError(f"{key}: {problem or 'not a valid key'}")
    return "".join(f"{k}={v}\n" for k, v in env.items())


def render_original_hook(piku_py, root, app):
    """repos/<app>/hooks/post-receive for the original piku: it deploys after git accepted."""
    import shlex
    return ("#!/bin/sh\n# Written by piku.py's downgrade: the original piku deploys after git accepted the push.\n"
            f"exec env PIKU_ROOT={shlex.quote(root)} {shlex.quote(piku_py)} git-hook {shlex.quote(app)}\n")


def render_original_keys(text, piku_py, root):
    """authorized_keys with piku.py's lines (its launcher) in the original piku's form, which
    runs piku.py as a program; every other line byte for byte. Returns (text, lines changed)."""
    import shlex
    out, changed = [], 0
    for line in split_key_lines(text):
        key = parse_key_line(line)
        if not (key and key.piku and "spec_from_file_location" in line):
            out.append(line)
            continue
        options, rest = split_key_options(line.strip())
        rest = " ".join(rest.split()[:2] + ([key.comment] if key.comment else []))
        if '"' in piku_py + root or "\\" in piku_py + root:
            raise PikuError("piku.py's path or PIKU_ROOT contains a quote or backslash; move it")
        out.append(f'command="PIKU_ROOT={shlex.quote(root)} FINGERPRINT={key.fingerprint} NAME=default {shlex.quote(piku_py)} '
                   f'$SSH_ORIGINAL_COMMAND",no-agent-forwarding,no-user-rc,no-X11-forwarding,'
                   f"no-port-forwarding {rest}\n")
        changed += 1
    return "".join(out), changed


def render_systemd_units(python, piku_py, paths, user):
    """Units for the emperor, for reloading nginx when nginx/ changes and for renewing
    certificates daily (systemd hosts). Values are quoted as systemd reads them."""
    def q(*argv):
        return " ".join('"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"' for a in argv)
    env = f"Environment={q('PIKU_ROOT=' + paths.root)}\n"
    return {
        "piku-uwsgi.service": (
            "[Unit]\nDescription=piku uWSGI emperor\nAfter=network.target\n\n[Service]\n"
            f"User={user}\nGroup=www-data\n{env}"
            f"ExecStart=/usr/bin/uwsgi --ini {q(paths.uwsgi + '/uwsgi.ini')}\n"
            "Restart=always\nKillSignal=SIGINT\n\n[Install]\nWantedBy=multi-user.target\n"),
        "piku-nginx.path": (
            "[Unit]\nDescription=Watch piku nginx configs and certificates\n\n[Path]\n"
            f"PathChanged={paths.nginx}\n\n[Install]\nWantedBy=multi-user.target\n"),
        "piku-nginx.service": (
            "[Unit]\nDescription=Reload nginx for piku\n\n[Service]\nType=oneshot\n"
            "ExecStart=/usr/sbin/nginx -s reload\n"),
        "piku-certs.service": (
            "[Unit]\nDescription=Renew piku's ACME certificates\n\n[Service]\nType=oneshot\n"
            f"User={user}\n{env}ExecStart={q(python, piku_py, 'certs:renew')}\n"),
        "piku-certs.timer": (
            "[Unit]\nDescription=Renew piku's ACME certificates daily\n\n[Timer]\n"
            "OnCalendar=daily\nRandomizedDelaySec=1h\nPersistent=true\n\n"
            "[Install]\nWantedBy=timers.target\n"),
    }


def render_starter_procfile(files):
    """A first Procfile for a project. `files`: {name: text} of the files at its top level."""
    text = files.get
    django = sorted(n[:-len("/wsgi.py")] for n in files if n.endswith("/wsgi.py"))
    if "manage.py" in files and django:
        first = [f"wsgi: {django[0]}.wsgi:application", "release: python manage.py migrate --noinput"]
    elif "wsgi.py" in files:
        first = ["wsgi: wsgi:" + ("app" if re.search(r"^app\s*=", text("wsgi.py") or "", re.M)
                                  and not re.search(r"^(def )?application\b", text("wsgi.py") or "", re.M)
                                  else "application")]
    elif re.search(r"^app\s*=", text("app.py") or "", re.M):
        first = ["wsgi: app:app"]
    else:
        first = ["wsgi: app:application"]
    return ("# Procfile: one process per line, `kind: command` (see docs/PROCFILE.md).\n"
            + "\n".join(first) + "\n"
            "# web: gunicorn --bind $BIND_ADDRESS:$PORT app:app    (any server listening on $PORT)\n"
            "# worker: python worker.py                            (a background process)\n"
            "# cron1: */10 * * * * python tasks.py                 (minute hour day month weekday)\n")


def render_starter_env(app):
    return ("# ENV: settings for piku, KEY=value (see docs/ENV.md); `config:set` values override them.\n"
            f"# NGINX_SERVER_NAME={app}.example.com\n"
            "# PYTHON_VERSION=3.12\n"
            "# UWSGI_PROCESSES=2\n")


# -- a backup's manifest, a deploy's notice --------------------------------------------------

def render_backup_manifest(info, files, links):
    """manifest.json of a backup: info (app, release, rev, branch, versions, date), the sha256 of
    every file and the target of every link the archive holds, and a digest of all that."""
    import json
    manifest = {**info, "format": BACKUP_FORMAT, "files": dict(sorted(files.items())),
                "links": dict(sorted(links.items()))}
    manifest["digest"] = backup_digest(manifest)
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


DEPLOY_NOTICE_FIELDS = ("app", "release", "revision", "branch", "status", "duration", "url", "error", "server",
                        "time", "piku")


def render_deploy_notice(fields):
    """The JSON body POSTed to PIKU_DEPLOY_WEBHOOK: every field of DEPLOY_NOTICE_FIELDS (null
    when not known), status `success` or `failed`, duration in seconds."""
    import json
    body = {k: fields.get(k) for k in DEPLOY_NOTICE_FIELDS}
    if body["duration"] is not None:
        body["duration"] = round(body["duration"], 2)
    return json.dumps(body, sort_keys=True).encode()


# === 9. Renderers (pure): nginx, certificates, host names ===

URL_PREFIX_RE = re.compile(r"/[A-Za-z0-9_./~-]*")


def parse_static_paths(value):
    """NGINX_STATIC_PATHS '/url:dir,/other:dir2' -> [(url, dir)] (dir relative to the app)."""
    out = []
    for item in [i for i in (value or "").split(",") if i.strip()]:
        url, sep, path = item.strip().partition(":")
        if not sep or not URL_PREFIX_RE.fullmatch(url):
            raise PikuError(f"NGINX_STATIC_PATHS: expected /url:path, got {item!r}")
        out.append((url, safe_path(path, "NGINX_STATIC_PATHS")))
    return out


# ACME CAs known by name (acme.sh's short names work too); anything else must be a directory URL.
ACME_CAS = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt_test": "https://acme-staging-v02.api.letsencrypt.org/directory",
    "zerossl": "https://acme.zerossl.com/v2/DV90",
    "buypass": "https://api.buypass.com/acme/directory",
    "buypass_test": "https://api.test4.buypass.no/acme/directory",
    "google": "https://dv.acme-v02.api.pki.goog/directory",
}
ACME_URL_RE = re.compile(r"https://[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._~/%-]*)?")
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}")


def parse_email(value, key):
    if not EMAIL_RE.fullmatch(value or ""):
        raise PikuError(f"{key}: not an e-mail address: {value!r}")
    return value
# Names no public CA will ever certify: they get the self-signed certificate.
PRIVATE_SUFFIXES = (".localhost", ".test", ".invalid", ".example", ".local", ".internal", ".lan",
                    ".home.arpa", ".localdomain")


def parse_acme_ca(value):
    """ACME_ROOT_CA -> (directory URL, public?). Names: letsencrypt(.org), zerossl(.com), ...;
    an https:// URL is taken as the directory itself (a private CA such as pebble)."""
    v = (value or "").strip()
    key = re.sub(r"\.(org|com|no|goog)\Z", "", v.lower())
    if key in ACME_CAS:
        return ACME_CAS[key], True
    if v in ACME_CAS.values():
        return v, True
    if ACME_URL_RE.fullmatch(v):
        return v, False
    raise PikuError(f"ACME_ROOT_CA: expected one of {', '.join(sorted(ACME_CAS))} or an https:// "
                    f"directory URL, got {value!r}")


def acme_names(names, public_ca):
    """The names an ACME CA can validate over HTTP-01 (no wildcards, IPs or, for a public CA,
    private-use names); empty when any name cannot be: one certificate covers them all."""
    for n in names:
        if n.startswith("*") or n == "_" or re.fullmatch(r"[\d.]+|.*:.*", n) or "." not in n:
            return []
        if public_ca and n.lower().endswith(PRIVATE_SUFFIXES):
            return []
    return list(names)


def name_clash(app, existing):
    """An existing app whose vassal file names could be the same as this one's: worker files are
    named <app>_<kind>.N.ini, so `a` (kind `b_web`) and `a_b` (kind `web`) would share one."""
    for other in existing:
        if other != app and (app.startswith(other + "_") or other.startswith(app + "_")):
            return other
    return None


def probe_host(name):
    """A Host header that nginx routes to the server_name `name` (a wildcard gets a label)."""
    return "piku-probe" + name[1:] if name.startswith("*.") else name


def server_name_owners(confs):
    """{host name (lower case): app} from the server_name lines of apps' nginx confs
    ({app: conf text})."""
    owners = {}
    for app, text in confs.items():
        for line in re.findall(r"^\s*server_name\s+([^;]*);", text, re.M):
            for name in line.split():
                owners.setdefault(name.lower(), app)
    return owners


def render_dehydrated_config(ca_url, basedir, wellknown, email):
    """dehydrated's config is sourced by bash: every value is quoted for the shell."""
    import shlex
    lines = [f"CA={shlex.quote(ca_url)}", f"BASEDIR={shlex.quote(basedir)}",
             f"WELLKNOWN={shlex.quote(wellknown)}", "CHALLENGETYPE=http-01", "RENEW_DAYS=30",
             "KEY_ALGO=prime256v1"]
    if email:
        lines.append(f"CONTACT_EMAIL={shlex.quote(email)}")
    return "\n".join(lines) + "\n"


def parse_openssl_enddate(text):
    """`openssl x509 -enddate -noout` output -> epoch seconds (None if unreadable)."""
    import calendar
    import time
    m = re.search(r"notAfter=(\w{3}\s+\d{1,2} \d\d:\d\d:\d\d \d{4}) GMT", text or "")
    if not m:
        return None
    return calendar.timegm(time.strptime(re.sub(r"\s+", " ", m.group(1)), "%b %d %H:%M:%S %Y"))


# --- The front door: what nginx supports, and the settings that tune an app's server block.

NGINX_HTTP2_DIRECTIVE = (1, 25, 1)  # `http2 on;` from here on; before, a flag of the listen line
NGINX_REJECT_HANDSHAKE = (1, 19, 4)  # ssl_reject_handshake
BODY_SIZE_RE = re.compile(r"[0-9]{1,9}[kKmMgG]?")
HTPASSWD_USER_RE = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
HTPASSWD_HASH_RE = re.compile(r"(?:\$apr1\$[./0-9A-Za-z]{1,8}\$[./0-9A-Za-z]{22}"  # htpasswd -m
                              r"|\$2[aby]\$[0-9]{2}\$[./0-9A-Za-z]{53}"  # bcrypt (htpasswd -B)
                              r"|\$5\$(?:rounds=[0-9]{1,9}\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{43}"
                              r"|\$6\$(?:rounds=[0-9]{1,9}\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86})")
NGINX_TOKEN_RE = re.compile(r"""\s+|#[^\n]*|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[{};]|[^\s{};"']+""")
LISTEN_RE = re.compile(r"^[ \t]*listen[ \t]+([^\s;]+)([^;\n]*);", re.M)
NGINX_LOG_FILES = ("nginx.access.log", "nginx.error.log")
MAINTENANCE_RETRY_AFTER = 120
GZIP_TYPES = ("text/plain text/css text/xml text/javascript application/javascript application/json "
              "application/xml application/rss+xml application/atom+xml image/svg+xml")


def parse_nginx_v(text):
    """`nginx -V` output -> {version: [1, 22, 1] or None, http2, ssl, conf_path}."""
    text = text or ""
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", text)
    conf = re.search(r"--conf-path=(\S+)", text)
    return {"version": [int(x) for x in m.groups()] if m else None,
            "http2": "--with-http_v2_module" in text, "ssl": "--with-http_ssl_module" in text,
            "conf_path": conf.group(1) if conf else None}


def nginx_has(features, since):
    """Is the installed nginx (features from parse_nginx_v; None: unknown) at least `since`?"""
    version = (features or {}).get("version")
    return bool(version) and tuple(version) >= since


def http2_syntax(features):
    """How this nginx turns HTTP/2 on: 'directive' (`http2 on;`), 'flag' (`listen ... ssl
    http2`) or None (no HTTP/2 module, or nginx unknown)."""
    if not (features or {}).get("http2") or not (features or {}).get("version"):
        return None
    return "directive" if nginx_has(features, NGINX_HTTP2_DIRECTIVE) else "flag"


def parse_nginx_directive_names(text):
    """Names of the directives an nginx snippet sets at its top level (not inside a block)."""
    names, depth, expect = set(), 0, True
    for m in NGINX_TOKEN_RE.finditer(text or ""):
        tok = m.group(0)
        if tok[0].isspace() or tok[0] == "#":
            continue
        if tok in ("{", "}", ";"):
            depth += {"{": 1, "}": -1, ";": 0}[tok]
            expect = True
        elif expect:
            if depth == 0:
                names.add(tok)
            expect = False
    return names


def listen_key(addr):
    """A listen address as nginx compares them: `80` and `*:80` are 0.0.0.0:80; no port is 80."""
    if addr.isdigit():
        return f"0.0.0.0:{addr}"
    if addr.startswith("*:"):
        return "0.0.0.0:" + addr[2:]
    if not addr.startswith("unix:") and (addr.endswith("]") or ":" not in addr):
        return addr + ":80"
    return addr


def parse_listens(text):
    """{address:port: set of flags} of the listen lines of an nginx config."""
    out = {}
    for addr, flags in LISTEN_RE.findall(text or ""):
        out.setdefault(listen_key(addr), set()).update(flags.split())
    return out


def parse_nginx_conf_refs(text):
    """(include patterns, address:ports a server marks as the default) of an nginx config."""
    includes = re.findall(r"^[ \t]*include[ \t]+([^\s;]+)[ \t]*;", text or "", re.M)
    defaults = {k for k, flags in parse_listens(text).items() if flags & {"default_server", "default"}}
    return includes, defaults


def parse_nginx_user(text):
    """The group nginx's workers run as, from the `user USER [GROUP];` directive, or None."""
    m = re.search(r"^[ \t]*user[ \t]+([^\s;]+)(?:[ \t]+([^\s;]+))?[ \t]*;", text or "", re.M)
    return (m.group(2) or m.group(1)) if m else None


def plan_default_listens(confs, taken):
    """{address:port: flags} piku's default server listens on: every one an app's config (texts
    `confs`) listens on, except those another server already is the default of (`taken`: an
    app named `_`, or the admin's own default site)."""
    listens = {}
    for text in confs:
        for key, flags in parse_listens(text).items():
            listens.setdefault(key, set()).update(flags)
    return {k: f for k, f in listens.items()
            if k not in taken and not f & {"default_server", "default"}}


def render_default_server(listens, features, cert=None):
    """nginx/_default.conf: the server nginx picks for a host name no app has, on every
    address:port an app listens on. HTTP gets a plain 404; over HTTPS the TLS handshake is
    refused (nginx >= 1.19.4), or, on older nginx, completed with `cert` (crt, key), a
    certificate of its own that names no app; without one, HTTPS ports are left out."""
    head = "# Written by piku.py (setup and every nginx change): the answer for names no app has.\n"
    reject = nginx_has(features, NGINX_REJECT_HANDSHAKE)
    ssl_ok = reject or bool(cert)
    ports = [(k, "ssl" in f) for k, f in sorted(listens.items()) if ssl_ok or "ssl" not in f]
    if not ports:
        return head + "# (no app listens anywhere yet)\n"
    flag = " http2" if http2_syntax(features) == "flag" else ""
    lines = ["server {"] + [f"  listen {k}{' ssl' + flag if ssl else ''} default_server;" for k, ssl in ports]
    if any(ssl for _, ssl in ports):
        lines += ["  ssl_reject_handshake on;"] if reject else \
            [f"  ssl_certificate {cert[0]};", f"  ssl_certificate_key {cert[1]};"]
    return head + "\n".join(lines + ["  return 404;", "}"]) + "\n"


def parse_body_size(value, key):
    if not BODY_SIZE_RE.fullmatch(value or ""):
        raise PikuError(f"{key}: expected a size like 64m, 512k, 1g or 0 (no limit), got {value!r}")
    return value


def parse_allow_list(value, key):
    """NGINX_ALLOW 'a.b.c.d,net/len,...' -> the networks in nginx's own spelling."""
    import ipaddress
    out = []
    for item in split_names(value):
        try:
            out.append(str(ipaddress.ip_network(item.strip("[]"), strict=False)))
        except ValueError:
            raise PikuError(f"{key}: {item!r} is not an IP address or network (like 203.0.113.0/24)")
    return out


def parse_htpasswd(text, key):
    """`user:hash` lines (apr1, bcrypt, SHA-256/512 crypt; blank and # lines skipped) -> the
    text of an htpasswd file; anything else (a plain password too) raises."""
    lines = []
    for raw in (text or "").replace(",", "\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not HTPASSWD_USER_RE.fullmatch(user) or not HTPASSWD_HASH_RE.fullmatch(hashed):
            raise PikuError(f"{key}: expected user:hash with an apr1, bcrypt or SHA-crypt hash (make one "
                            f"with `htpasswd -nB USER` or `openssl passwd -apr1`), got {line[:40]!r}")
        lines.append(f"{user}:{hashed}")
    if not lines:
        raise PikuError(f"{key}: no user:hash line")
    return "\n".join(lines) + "\n"


def parse_basic_auth_setting(value, key):
    """NGINX_BASIC_AUTH: 'user:hash,...' (-> htpasswd text) or a file of the app's repository
    (-> ('file', relative path)); never a path outside the app."""
    if ":" in value:
        return parse_htpasswd(value, key)
    path = safe_path(value, key)
    if path.startswith("/"):
        raise PikuError(f"{key}: {value!r}: a password file must be inside the app (a relative path)")
    return ("file", path)


def parse_redirects(value, key):
    """NGINX_REDIRECT 'www.example.com:example.com,...' -> [(from, to)]."""
    out = []
    for item in split_names(value):
        src, sep, dst = item.partition(":")
        for name in (src, dst):
            if not sep or not HOSTNAME_RE.fullmatch(name) or name.startswith("*") or name == "_":
                raise PikuError(f"{key}: expected from.example.com:to.example.com, got {item!r}")
        out.append((src.lower(), dst.lower()))
    return out


def served_names(settings):
    """(names of the app's main server block, [(from, to)] redirects): a redirect's source must
    be one of NGINX_SERVER_NAME (its certificate covers it) and at least one name must stay."""
    names = split_names(settings.get("NGINX_SERVER_NAME", ""))
    redirects = parse_redirects(settings.get("NGINX_REDIRECT", ""), "NGINX_REDIRECT")
    sources = {src for src, _ in redirects}
    for src in sources - {n.lower() for n in names}:
        raise PikuError(f"NGINX_REDIRECT: {src} is not one of NGINX_SERVER_NAME: add it there too")
    rest = [n for n in names if n.lower() not in sources]
    if names and not rest:
        raise PikuError("NGINX_REDIRECT: every name of NGINX_SERVER_NAME redirects: keep one to serve the app")
    return rest, redirects


# directives nginx takes more than once at one level: an include file's add to piku's
NGINX_MULTI_DIRECTIVES = ("add_header", "allow", "deny", "error_page", "ssl_certificate", "ssl_certificate_key")


def render_directives(pairs, skip, indent="  "):
    """`name value;` lines, without those an include file sets itself (`skip`): its value wins
    (nginx refuses most directives twice at one level)."""
    return [f"{indent}{d} {v};" for d, v in pairs if d not in skip or d in NGINX_MULTI_DIRECTIVES]


def render_server_settings(n):
    """The app's server-level tuning: HTTP/2, body size, TLS, logs, gzip, HSTS, basic auth and
    the allow list."""
    s, p, app = n["settings"], n["paths"], n["app"]
    pairs = []
    if n["cert"] and http2_syntax(n.get("nginx")) == "directive":
        pairs.append(("http2", "on"))
    pairs.append(("client_max_body_size", setting(s, "NGINX_CLIENT_MAX_BODY_SIZE")))
    if n["cert"]:
        pairs += [("ssl_certificate", f"{p.nginx}/{app}.crt"), ("ssl_certificate_key", f"{p.nginx}/{app}.key"),
                  ("ssl_protocols", "TLSv1.2 TLSv1.3")]
    if n.get("logs"):
        pairs += [("access_log", f"{n['logs']}/{NGINX_LOG_FILES[0]}"), ("error_log", f"{n['logs']}/{NGINX_LOG_FILES[1]}")]
    if setting_bool(s, "NGINX_GZIP"):
        pairs += [("gzip", "on"), ("gzip_vary", "on"), ("gzip_proxied", "any"), ("gzip_comp_level", "5"),
                  ("gzip_min_length", "256"), ("gzip_types", GZIP_TYPES)]
    pairs += hsts_header(n)
    if n.get("htpasswd"):
        pairs += [("auth_basic", f'"{app}"'), ("auth_basic_user_file", n["htpasswd"])]
    if websocket_timeout(n):
        pairs.append(("error_page", "418 = @piku-websocket"))
    allow = parse_allow_list(s.get("NGINX_ALLOW", ""), "NGINX_ALLOW")
    pairs += [("allow", net) for net in allow]
    if allow and not setting_bool(s, "NGINX_CLOUDFLARE_ACL"):  # (that list ends in its own deny)
        pairs.append(("deny", "all"))
    return render_directives(pairs, n.get("include_directives") or set())


def hsts_header(n):
    """NGINX_HSTS as an add_header pair (none without HTTPS). Locations with add_header lines
    of their own (cache, maintenance) repeat it: nginx does not add server-level ones there."""
    age = setting_count(n["settings"], "NGINX_HSTS") if n["cert"] else 0
    return [("add_header", f'Strict-Transport-Security "max-age={age}" always')] if age else []


def render_acme_location(n):
    """ACME challenges are answered whatever else the server block does: no allow list, no
    basic auth, no maintenance page (whose marker header they carry, for piku's own probe)."""
    s, extra = n["settings"], ""
    if s.get("NGINX_ALLOW") or setting_bool(s, "NGINX_CLOUDFLARE_ACL"):
        extra += "allow all; "
    if n.get("htpasswd"):
        extra += "auth_basic off; "
    if n.get("maintenance"):
        extra += "add_header X-Piku-Maintenance on always; "
    return f"  location ^~ /.well-known/acme-challenge/ {{ {extra}root {n['paths'].acme}/{n['app']}; }}"


def render_maintenance(n):
    """Maintenance mode: every request but ACME challenges gets 503, Retry-After and the page
    (a file of the live release, else a built-in one)."""
    page = (n.get("maintenance") or {}).get("page")
    body = ([f"    root {n['app_dir']};", f"    try_files /{safe_path(page, 'page')} =503;"] if page else
            ["    default_type text/html;",
             f"    return 503 '<!doctype html><title>Down for maintenance</title><h1>Down for maintenance</h1>"
             f"<p>{n['app']} is being updated. Please try again in a few minutes.</p>';"])
    return ["  error_page 503 @piku-maintenance;", "  location / { return 503; }",
            "  location @piku-maintenance {", f"    add_header Retry-After {MAINTENANCE_RETRY_AFTER} always;",
            "    add_header X-Piku-Maintenance on always;"] + render_directives(hsts_header(n), (), "    ") \
        + body + ["  }"]


def redirect_target(s, scheme, host):
    port = setting(s, "NGINX_HTTPS_PORT" if scheme == "https" else "NGINX_HTTP_PORT")
    return f"{scheme}://{host}" + ("" if port == {"https": "443", "http": "80"}[scheme] else f":{port}")


def render_redirect_servers(n, redirects, listen):
    """One server block per NGINX_REDIRECT source, on the app's own listen lines: 301 to the
    target name, same scheme, path and query (ACME challenges are still answered)."""
    s, out = n["settings"], []
    schemes = [sc for sc, on in (("http", any(" ssl" not in l for l in listen)), ("https", n["cert"])) if on]
    tls = [l for l in render_server_settings(n) if l.split()[0] in ("http2", "ssl_certificate",
                                                                   "ssl_certificate_key", "ssl_protocols")]
    listen = [l.replace(" default_server;", ";") for l in listen]  # (an app named `_` is, not these)
    for src, dst in redirects:
        go = {sc: f"return 301 {redirect_target(s, sc, dst)}$request_uri;" for sc in schemes}
        where = (f"if ($scheme = https) {{ {go['https']} }} {go['http']}" if len(go) == 2 else next(iter(go.values())))
        out += ["server {"] + listen + [f"  server_name {src};"] + tls + \
            [render_acme_location(n), f"  location / {{ {where} }}", "}"]
    return out


def websocket_timeout(n):
    """NGINX_WEBSOCKET_TIMEOUT for a `web` app (nginx passes WebSockets to HTTP backends only)."""
    value = n["settings"].get("NGINX_WEBSOCKET_TIMEOUT")
    return int(value) if value and n.get("has_backend") and not n.get("sockets") and not n.get("maintenance") \
        else None


def websocket_locations(n):
    return ["@piku-websocket"] if websocket_timeout(n) else []


def render_backend_tuning(n, location):
    """Directives appended inside each location passing requests to the app: timeouts,
    buffering, and the hand-over of WebSocket upgrades to @piku-websocket."""
    s = n["settings"]
    module = "uwsgi" if n["sockets"] else "proxy"
    ws = websocket_timeout(n)
    if location == "@piku-websocket":
        pairs = [("proxy_read_timeout", f"{ws}s"), ("proxy_send_timeout", f"{ws}s")]
    else:
        pairs = [(f"{module}_{d}_timeout", f"{s[k]}s") for d, k in (("read", "NGINX_PROXY_READ_TIMEOUT"),
                                                                   ("send", "NGINX_PROXY_SEND_TIMEOUT")) if s.get(k)]
        if not setting_bool(s, "NGINX_PROXY_BUFFERING"):
            pairs.append((f"{module}_buffering", "off"))
    if s.get("NGINX_CACHE_PREFIXES"):  # (the cache's add_header lines hide the server's)
        pairs += hsts_header(n)
    lines = render_directives(pairs, n.get("include_directives") or set(), "    ")
    if ws and location != "@piku-websocket":
        lines.append('    if ($http_upgrade ~* "^websocket$") { return 418; }')
    return lines


def nginx_listen_flags(n, listen, ssl_only=False):
    """The app's listen lines with what they need besides the address: only the HTTPS ones
    (HTTPS-only), `http2` on old nginx, `default_server` for an app named `_`."""
    names = split_names(n["settings"].get("NGINX_SERVER_NAME", ""))
    flag = " http2" if n["cert"] and http2_syntax(n.get("nginx")) == "flag" else ""
    default = " default_server" if "_" in names else ""
    out = []
    for line in listen:
        if ssl_only and " ssl;" not in line:
            continue
        out.append(line.replace(" ssl;", f" ssl{flag};").replace(";", f"{default};"))
    return out


def nginx_listen_lines(s, https):
    ports = [(setting(s, "NGINX_HTTP_PORT"), "")]
    if https:
        ports.append((setting(s, "NGINX_HTTPS_PORT"), " ssl"))
    addrs = [setting(s, "NGINX_IPV4_ADDRESS")]
    if not setting_bool(s, "DISABLE_IPV6"):
        addrs.append(setting(s, "NGINX_IPV6_ADDRESS"))
    for a in addrs:
        if not IP_RE.fullmatch(a):
            raise PikuError(f"nginx listen address {a!r} is not an IP address")
    return [f"  listen {a}:{port}{flag};" for port, flag in ports for a in addrs]


def nginx_upstream(n):
    """[(address, backup?)] the app's upstream balances over: `n["upstream"]` when the caller
    worked it out (both slots of a blue/green app), else the wsgi sockets or the web port."""
    if n.get("upstream") is not None:
        return n["upstream"]
    if n["sockets"]:
        return [("unix:" + sock, False) for sock in n["sockets"]]
    if "web" in n["kinds"]:
        bind = connect_host(setting(n["settings"], "BIND_ADDRESS"))
        return [(host_port(bind, n["port"]), False)] + (
            [(host_port(bind, n["standby"]), True)] if n.get("standby") else [])
    return []


def render_switch_probe(token):
    """Locations that tell piku which config nginx serves: after a reload the new token answers
    204, every other piku-switch URL 404 (nothing reaches the app)."""
    if not token:
        return []
    return ["  location ^~ /.well-known/piku-switch/ { return 404; }",
            f"  location = /.well-known/piku-switch/{token} {{ return 204; }}"]


def switch_probe_path(conf_text):
    """The URL path that only nginx serving this config answers with 204 (render_switch_probe),
    or None when the config has none."""
    m = re.search(r"piku-switch/(\w+) ", conf_text or "")
    return f"/.well-known/piku-switch/{m.group(1)}" if m else None


def render_nginx(n):
    """nginx server block(s) for one app. `n`: app, settings, paths, kinds (Procfile),
    sockets (list of unix sockets for wsgi), upstream ([(address, backup?)], optional), port,
    app_dir, cert (bool: cert+key exist), switch_token (optional)."""
    s, app, p = n["settings"], n["app"], n["paths"]
    names = split_names(setting(s, "NGINX_SERVER_NAME"))
    https_only = n["cert"] and setting_bool(s, "NGINX_HTTPS_ONLY")
    lines = []
    servers = nginx_upstream(n)
    if servers:
        # max_fails=0: a refused connection never marks a server down, it only sends that one
        # request on to the next one; the backups are the other slot's workers (blue/green).
        lines += [f"upstream piku-{app} {{"] + [f"  server {addr}{' backup' if backup else ''} max_fails=0;"
                                                for addr, backup in servers] + ["}"]
    cache = parse_cache(s, p, app)
    if cache:  # wsgi apps are reached with uwsgi_pass: the uwsgi module has its own cache
        lines.append(f"{'uwsgi' if n['sockets'] else 'proxy'}_cache_path {cache['path']} levels=1:2 "
                     f"keys_zone={app}:20m inactive={cache['expiry']}s max_size={cache['size']}g "
                     "use_temp_path=off;")
    if https_only:
        lines += ["server {"] + nginx_listen_flags(n, nginx_listen_lines(s, False))
        lines += [f"  server_name {' '.join(names)};", render_acme_location(n)]
        lines += render_switch_probe(n.get("switch_token"))
        lines += ["  location / { return 301 https://$host$request_uri; }", "}"]
    listen = nginx_listen_flags(n, nginx_listen_lines(s, n["cert"]), ssl_only=https_only)
    served, redirects = served_names(s)
    lines += render_redirect_servers(n, redirects, listen)
    lines += ["server {"] + listen + [f"  server_name {' '.join(served)};"] + render_server_settings(n)
    lines.append(render_acme_location(n))
    lines += render_switch_probe(n.get("switch_token"))
    if n.get("maintenance"):  # nothing else is served: not the app, its files nor its include
        return "\n".join(lines + render_maintenance(n) + ["}"]) + "\n"
    if not setting_bool(s, "NGINX_ALLOW_GIT_FOLDERS"):
        lines.append("  location ~ /\\.git { deny all; return 404; }")
    if setting_bool(s, "NGINX_CLOUDFLARE_ACL"):
        lines += [f"  allow {net};" for net in CLOUDFLARE_NETS] + ["  allow 127.0.0.1;", "  allow ::1;",
                                                                    "  deny all;"]
    include = s.get("NGINX_INCLUDE_FILE")
    if include:
        lines.append(f"  include {os.path.join(n['app_dir'], safe_path(include, 'NGINX_INCLUDE_FILE'))};")
    statics = parse_static_paths(s.get("NGINX_STATIC_PATHS", ""))
    if "static" in n["kinds"] and not any(url == "/" for url, _ in statics):
        statics.append(("/", static_dir(n["kinds"])))
    catch_all = render_catch_all(s["NGINX_CATCH_ALL"]) if s.get("NGINX_CATCH_ALL") else None
    for url, path in statics:
        target = path if path.startswith("/") else os.path.normpath(os.path.join(n["app_dir"], path))
        slash = "/" if url.endswith("/") else ""
        # What a static location lacks: for "/" the app behind it, else the catch-all page (a
        # single-page app), else a 404 (a static prefix is nginx's alone).
        fallback = "@piku" if url == "/" and n["has_backend"] else (catch_all or "=404")
        # a symlink committed in the repo (public -> /) must not publish the server's files
        lines += [f"  location {url} {{", f"    alias {target.rstrip('/')}{slash or ('/' if url == '/' else '')};",
                  "    disable_symlinks if_not_owner;",
                  f"    try_files $uri $uri.html $uri/ {fallback};", "  }"]
    if n["has_backend"]:
        lines += render_nginx_backend(n, cache, static_root=any(url == "/" for url, _ in statics))
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_nginx_backend(n, cache, static_root=False):
    """The locations that pass requests to the app: `/` (unless a static directory has it) and
    @piku, where a static `/` sends what it does not have."""
    app = n["app"]
    out = []
    for name in (["@piku"] if static_root else ["/", "@piku"]) + websocket_locations(n):
        out.append(f"  location {name} {{")
        if n["sockets"]:
            out += [f"    uwsgi_param {p};" for p in UWSGI_PARAMS]
            out += [f"    uwsgi_pass piku-{app};",
                    "    uwsgi_param HTTP_X_FORWARDED_PROTO $scheme;",
                    "    uwsgi_param HTTP_X_FORWARDED_FOR $proxy_add_x_forwarded_for;"]
        else:
            out += [f"    proxy_pass http://piku-{app};", "    proxy_http_version 1.1;",
                    "    proxy_set_header Host $host;",
                    "    proxy_set_header X-Real-IP $remote_addr;",
                    "    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                    "    proxy_set_header X-Forwarded-Proto $scheme;",
                    "    proxy_set_header Upgrade $http_upgrade;",
                    "    proxy_set_header Connection $piku_connection_upgrade;"]
        if cache:
            out += render_cache_location(cache, "uwsgi" if n["sockets"] else "proxy")
        out += render_backend_tuning(n, name)
        out.append("  }")
    return out


def render_catch_all(value):
    target = value if value.startswith("/") else "/" + value
    if not URL_PREFIX_RE.fullmatch(target):
        raise PikuError(f"NGINX_CATCH_ALL: {value!r} is not a path")
    return target


def static_dir(workers):
    """The Procfile's `static:` directory, always inside the app (as in the original piku:
    `static: /` is the app's top directory, never the server's root)."""
    return safe_path(workers["static"].strip().strip("/") or ".", "static")


def parse_url_prefixes(value, key):
    """'/a,/b' -> ['/a', '/b']; anything that is not a plain /path raises."""
    urls = [u for u in (value or "").split(",") if u]
    for u in urls:
        if not URL_PREFIX_RE.fullmatch(u):
            raise PikuError(f"{key}: {u!r} is not a /path")
    return urls


def parse_cache(s, p, app):
    urls = parse_url_prefixes(s.get("NGINX_CACHE_PREFIXES", ""), "NGINX_CACHE_PREFIXES")
    if not urls:
        return None
    path = s.get("NGINX_CACHE_PATH") or os.path.join(p.cache, app)
    return {"prefixes": urls, "path": safe_path(path, "NGINX_CACHE_PATH"), "app": app,
            "size": setting_int(s, "NGINX_CACHE_SIZE"), "time": setting_int(s, "NGINX_CACHE_TIME"),
            "control": setting_int(s, "NGINX_CACHE_CONTROL"),
            "expiry": setting_int(s, "NGINX_CACHE_EXPIRY"),
            "redirects": setting_count(s, "NGINX_CACHE_REDIRECTS"), "any": setting_count(s, "NGINX_CACHE_ANY")}


def render_cache_location(c, module):
    """Cache directives for a location passing to the app (module: proxy or uwsgi). Only URIs
    under the cache prefixes are cached and marked public; everything else passes untouched."""

    regex = "|".join(re.escape(u) for u in c["prefixes"])
    lines = ["    set $piku_nocache 1;", '    set $piku_cache_control "";',
             f"    if ($uri ~ ^({regex})) {{ set $piku_nocache 0; "
             f"set $piku_cache_control \"public, max-age={c['control']}\"; }}",
             f"    {module}_cache {c['app']};", f"    {module}_cache_bypass $piku_nocache;",
             f"    {module}_no_cache $piku_nocache;", f"    {module}_cache_valid 200 304 {c['time']}s;"]
    if module == "uwsgi":  # the uwsgi module has no default key
        lines.append("    uwsgi_cache_key $scheme$host$request_uri;")
    if c["redirects"]:
        lines.append(f"    {module}_cache_valid 301 302 307 308 {c['redirects']}s;")
    if c["any"]:
        lines.append(f"    {module}_cache_valid any {c['any']}s;")
    return lines + [f"    {module}_ignore_headers Cache-Control Expires Set-Cookie;",
                    "    add_header Cache-Control $piku_cache_control;",  # empty: not sent
                    "    add_header X-Cache-Status $upstream_cache_status;"]


def render_nginx_map():
    """http-level snippet every piku server needs once (WebSocket upgrade header); the name is
    piku's own so it cannot clash with a map the admin's nginx.conf already has."""
    return ("map $http_upgrade $piku_connection_upgrade {\n  default upgrade;\n  '' close;\n}\n")


CLOUDFLARE_NETS = ("173.245.48.0/20", "103.21.244.0/22", "103.22.200.0/22", "103.31.4.0/22",
                   "141.101.64.0/18", "108.162.192.0/18", "190.93.240.0/20", "188.114.96.0/20",
                   "197.234.240.0/22", "198.41.128.0/17", "162.158.0.0/15", "104.16.0.0/13",
                   "104.24.0.0/14", "172.64.0.0/13", "131.0.72.0/22", "2400:cb00::/32",
                   "2606:4700::/32", "2803:f800::/32", "2405:b500::/32", "2405:8100::/32",
                   "2a06:98c0::/29", "2c0f:f248::/32")


UWSGI_PARAMS = ("QUERY_STRING $query_string", "REQUEST_METHOD $request_method",
                "CONTENT_TYPE $content_type", "CONTENT_LENGTH $content_length",
                "REQUEST_URI $request_uri", "PATH_INFO $document_uri",
                "DOCUMENT_ROOT $document_root", "SERVER_PROTOCOL $server_protocol",
                "REQUEST_SCHEME $scheme", "HTTPS $https if_not_empty",
                "REMOTE_ADDR $remote_addr", "REMOTE_PORT $remote_port",
                "SERVER_PORT $server_port", "SERVER_NAME $server_name")


def render_nginx_check_conf(tmp, includes):
    """A throwaway main config to run `nginx -t` on piku's server blocks as an unprivileged user."""
    temps = "\n".join(f"  {d}_temp_path {tmp}/{d};" for d in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    inc = "\n".join(f"  include {path};" for path in includes)
    return (f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{}}\nhttp {{\n"
            f"  access_log off;\n{temps}\n{inc}\n}}\n")


# === 10. Planners (pure) ===

def detect_requirements(files, workers):
    return "requirements.txt" in files


def detect_pyproject(files, workers):
    return "pyproject.toml" in files


def detect_generic(files, workers):
    return any(k != "static" and k not in SPECIAL_KINDS for k in workers)


def detect_static(files, workers):
    return "static" in workers


def detect_ruby(files, workers):
    return "Gemfile" in files


def detect_node(files, workers):
    return "package.json" in files


def detect_maven(files, workers):
    return "pom.xml" in files


def detect_gradle(files, workers):
    return "build.gradle" in files or "build.gradle.kts" in files


def detect_go(files, workers):
    return "go.mod" in files or "Godeps" in files or any(f.endswith(".go") for f in files)


def detect_clojure_cli(files, workers):
    return "deps.edn" in files


def detect_leiningen(files, workers):
    return "project.clj" in files


def detect_php(files, workers):
    return workers.get("web") == PHP_WEB_COMMAND


def detect_rust(files, workers):
    return "Cargo.toml" in files


# What is built beside the first runtime that matches: a Python app's package.json (its JS
# assets), and any app's `php:` line (uWSGI's php plugin serves it, whatever else the app is).
COMPANIONS = {"python-requirements": ("node", "php"), "python-uv": ("node", "php")}


def plan_runtime(files, workers, runtimes):
    """The first runtime whose detector accepts the release, and the companions built after it
    (COMPANIONS): (name, label, build); names of several join with `+` (`python-uv+node`)."""
    rows = [row for row in runtimes if row[2](files, workers)]
    if not rows:
        raise PikuError("nothing to run: the Procfile has no wsgi, web, php, worker or static entry")
    name, label, _, build = rows[0]
    extra = [row for row in rows[1:] if row[0] in COMPANIONS.get(name, ("php",))]
    if not extra:
        return name, label, build
    shorts = [row[1].replace(" app detected", "") for row in extra]

    def build_all(b):
        build(b)
        for short, row in zip(shorts, extra):
            step(f"Then {short}")
            row[3](b)
    return "+".join([name] + [row[0] for row in extra]), f"{label}; then {', then '.join(shorts)}", build_all


PHP_DOCROOT_RE = re.compile(r"[A-Za-z0-9_.@+-][A-Za-z0-9_./@+-]{0,200}")
# The `web` command a Procfile's `php: DOCROOT` line becomes: uWSGI with its php plugin on
# $BIND_ADDRESS:$PORT. A constant (the document root comes from the environment), so the web
# machinery (port, nginx, preboot, health check) serves PHP unchanged. The UWSGI_* settings in
# the environment are options to this uWSGI (UWSGI_PROCESSES = processes ...); the ones that
# only mean something to a Python worker are removed.
PHP_WEB_COMMAND = ('exec env -u UWSGI_GEVENT -u UWSGI_ASYNCIO -u UWSGI_THREADS -u UWSGI_INCLUDE_FILE '
                   '-u UWSGI_IDLE uwsgi --master --die-on-term --plugin 0:php '
                   '--http-socket "$BIND_ADDRESS:$PORT" --php-docroot "$PIKU_PHP_DOCROOT" '
                   '--php-index index.php --php-allowed-ext .php --check-static "$PIKU_PHP_DOCROOT" '
                   '--static-skip-ext .php --static-skip-ext .inc --static-index index.html')


def parse_php_docroot(value):
    """The document root of a `php:` Procfile line, relative to the app ('.' for the app itself)."""
    rel = value.strip().strip("/") or "."
    if not PHP_DOCROOT_RE.fullmatch(rel) or ".." in rel.split("/"):
        raise PikuError(f"Procfile: php: wants a directory of the app (e.g. `php: public`), got {value!r}")
    return rel


def map_legacy_kinds(workers, warnings):
    """The original piku's uWSGI-plugin kinds: `php: DOCROOT` becomes the `web` process
    (PHP_WEB_COMMAND); `jwsgi:` and `rwsgi:` (JVM and rack plugins) run as plain workers here,
    with a warning."""
    warnings = warnings + [f"Procfile: {k}: (uWSGI's {'JVM' if k == 'jwsgi' else 'rack'} plugin in the "
                           "original piku) runs as a background worker here: serve HTTP with web: on $PORT"
                           for k in ("jwsgi", "rwsgi") if k in workers]
    if "php" not in workers:
        return workers, warnings
    parse_php_docroot(workers["php"])
    clash = [k for k in ("web", "wsgi") if k in workers]
    if clash:
        raise PikuError(f"Procfile: php and {clash[0]} both serve the app on $PORT: keep one of them")
    return {("web" if k == "php" else k): (PHP_WEB_COMMAND if k == "php" else v)
            for k, v in workers.items()}, warnings


NODE_MANAGERS = {"npm": ("package-lock.json", "npm-shrinkwrap.json"), "yarn": ("yarn.lock",),
                 "pnpm": ("pnpm-lock.yaml",)}
NODE_OPTION_RE = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9=._:/@+-]*")
NODE_VERSION_RE = re.compile(r"v?(\d+(?:\.\d+){0,2})")


def parse_package_manager(value):
    """NODE_PACKAGE_MANAGER (`npm`, `yarn`, `pnpm`, each with options) -> [words]."""
    words = (value or "npm").split()
    if words[0] not in NODE_MANAGERS or not all(NODE_OPTION_RE.fullmatch(w) for w in words[1:]):
        raise PikuError(f"NODE_PACKAGE_MANAGER: expected {', '.join(NODE_MANAGERS)} and options "
                        f"(`npm --legacy-peer-deps`), got {value!r}")
    return words


def parse_node_version(value):
    m = NODE_VERSION_RE.fullmatch((value or "").strip())
    if not m:
        raise PikuError(f"NODE_VERSION: expected a version like 20, 20.11 or 20.11.1, got {value!r}")
    return m.group(1)


def node_version_matches(installed, wanted):
    """Does `node --version` output (v20.11.1) satisfy NODE_VERSION (20, 20.11, v20.11.1)?"""
    have = installed.strip().lstrip("v").split(".")
    want = parse_node_version(wanted).split(".")
    return have[:len(want)] == want


def plan_node_install(manager_words, files):
    """(argv, lockfile or None) installing a package.json's dependencies: a lockfile of the
    manager makes the install exact (`npm ci`, `--frozen-lockfile`)."""
    tool, options = manager_words[0], manager_words[1:]
    lock = next((f for f in NODE_MANAGERS[tool] if f in files), None)
    if tool == "npm":
        return [tool, "ci" if lock else "install", "--no-audit", "--no-fund"] + options, lock
    return [tool, "install"] + (["--frozen-lockfile"] if lock else []) + options, lock


def plan_go_build(files):
    """argv building a Go app into bin/: its module's packages, or (no go.mod) the .go files at
    the top of the repository."""
    if "go.mod" in files:
        return ["go", "build", "-o", "bin/", "./..."]
    sources = sorted(f for f in files if f.endswith(".go") and not f.endswith("_test.go"))
    return ["go", "build", "-o", "bin/"] + sources if sources else None


def plan_gradle_build(files):
    """The project's own Gradle wrapper when it has one, else the system gradle; no daemon
    left running after the push."""
    return (["/bin/sh", "./gradlew"] if "gradlew" in files else ["gradle"]) + ["--no-daemon", "build"]


JAVA = ("java", "default-jdk-headless")
# argv and the tools they need (binary, Debian package) of the runtimes built by one command
TOOL_BUILDS = {
    "maven": (["mvn", "-B", "package"], (JAVA, ("mvn", "maven"))),
    "clojure-cli": (["clojure", "-T:build", "release"],
                    (JAVA, ("clojure", "install the Clojure CLI (clojure.org's linux-install script; "
                                       "Debian's clojure package has no -T)"))),
    "leiningen": (["lein", "uberjar"], (JAVA, ("lein", "leiningen"))),
    "rust": (["cargo", "build"], (("cargo", "cargo"), ("rustc", "rustc"))),
}


# What each Procfile kind is: the one place that knows (every other function asks here).
#   listens:    what it serves requests on: "socket" (a uwsgi socket for nginx, and PORT), "port", None
#   max_scale:  most instances (web: one without nginx, where every instance would get PORT)
#   vassal:     how uWSGI runs it: "wsgi" (native or pyuwsgi), "daemon", "cron", None (no process)
#   health:     "http" (a real request must answer), "alive" (must not keep exiting), None
#   blue_green: "always", "nginx" (when nginx fronts it: the old and new instances need not share
#               a port), "never" (restarted in place)
#   nginx:      how nginx reaches it: "uwsgi", "proxy", "files" (static), None
Kind = namedtuple("Kind", "listens max_scale vassal health blue_green nginx")
KINDS = {
    "wsgi": Kind("socket", 64, "wsgi", "http", "always", "uwsgi"),
    "web": Kind("port", 64, "daemon", "http", "nginx", "proxy"),
    "static": Kind(None, 0, None, None, "never", "files"),
    "cron": Kind(None, 1, "cron", None, "never", None),
    "release": Kind(None, 0, None, None, "never", None),    # phases: run once per deploy
    "preflight": Kind(None, 0, None, None, "never", None),
    "postdeploy": Kind(None, 0, None, None, "never", None),  # after a deploy went live
    "backup": Kind(None, 0, None, None, "never", None),      # before `backup` reads the app
    "worker": Kind(None, 64, "daemon", "alive", "never", None),  # any other name
}


def kind_name(kind):
    """The KINDS row of a Procfile kind: cron1 -> cron, anything unknown -> worker."""
    return "cron" if kind.startswith("cron") else (kind if kind in KINDS else "worker")


def kind_of(kind):
    return KINDS[kind_name(kind)]


def max_scale(kind, behind_nginx):
    return 1 if kind_name(kind) == "web" and not behind_nginx else kind_of(kind).max_scale


def plan_scaling(workers, saved, behind_nginx=False):
    """{kind: count} for every kind that runs as processes (default 1); Procfile kinds only,
    counts capped by KINDS (a SCALING file of the original piku may ask for more)."""
    return {k: min(saved.get(k, 1), max_scale(k, behind_nginx)) for k in workers if kind_of(k).vassal}


def serving(kind):
    """Does this kind answer requests (and so get a health check and a place in nginx)?"""
    return kind_of(kind).listens is not None


def plan_blue_green(kind, settings, port_pinned=False):
    """Do the new release's instances of `kind` start beside the live ones (own sockets or
    ports, health-checked, then traffic moves), or is the kind restarted in place?"""
    rule = kind_of(kind).blue_green
    if rule == "nginx":  # a web command binds $PORT: old and new can only differ behind nginx
        return bool(split_names(settings.get("NGINX_SERVER_NAME", ""))) and not port_pinned \
            and setting_bool(settings, "PIKU_PREBOOT")
    return rule == "always"


def vassal_name(app, kind, n, slot=None, gen=None):
    """<app>_<kind>.<n>.ini, or <app>_<kind>.<n>[.<gen>].<slot>.ini for a blue/green instance
    (gen: 6 hex digits, new each time the slot starts; see Target)."""
    return f"{app}_{kind}.{n}" + (f".{gen}" if slot and gen else "") + (f".{slot}" if slot else "") + ".ini"


def parse_vassal_name(app, name):
    """(kind, n, slot or None) of one of app's vassal file names, or None."""
    m = re.fullmatch(re.escape(app) + r"_([A-Za-z][A-Za-z0-9_-]{0,30})\.(\d+)(?:(?:\.[0-9a-f]{6})?\.([ab]))?\.ini", name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def plan_vassals(app, scaling, slot=None, slotted=()):
    """Vassal file names for a scaling plan: {name: (kind, n)}; kinds in `slotted` get the slot."""
    return {vassal_name(app, kind, n, slot if kind in slotted else None): (kind, n)
            for kind, count in scaling.items() for n in range(1, count + 1)}


def other_slot(slot):
    return "b" if slot == "a" else "a"


def plan_wsgi_mode(setting_value, venv_version, plugin_version):
    """('native'|'pyuwsgi', notice or None) for a wsgi worker; raises on a refused mismatch."""
    mm = ".".join((venv_version or "").split(".")[:2])
    if setting_value == "always":
        return "pyuwsgi", "serving wsgi with the virtualenv's own uWSGI (PIKU_PYUWSGI=always)"
    if plugin_version and mm == plugin_version:
        return "native", None
    if setting_value == "never":
        have = f"embeds Python {plugin_version}" if plugin_version else "has no python3 plugin"
        raise PikuError(f"the system uWSGI {have} but the app's virtualenv uses Python {mm}: "
                        f"set PYTHON_VERSION={plugin_version or '<system version>'} "
                        f"(`config:set APP PYTHON_VERSION={plugin_version}`), use a `web: gunicorn ...` "
                        "worker, or allow PIKU_PYUWSGI=auto")
    why = (f"system uWSGI embeds Python {plugin_version}" if plugin_version
           else "no uWSGI python3 plugin found")
    return "pyuwsgi", f"{why}, app uses Python {mm}: serving wsgi with pyuwsgi from the virtualenv"


CLIENT_APP_COMMANDS = ("config", "config:get", "config:set", "config:unset", "config:live", "config:export",
                       "config:import", "deploy", "destroy", "logs", "ps", "ps:scale", "releases", "rollback",
                       "run", "restart", "stop", "certs", "certs:renew", "cron:run", "maintenance:on",
                       "maintenance:off", "backup", "restore")


def plan_client_call(command, args, app):
    """The piku argv the client sends for `piku COMMAND ARGS...`: the app goes right after
    the commands that take one (`run -- cmd` drops the `--`)."""
    args = list(args)
    if command not in CLIENT_APP_COMMANDS or (command == "backup" and "--all" in args):
        return [command] + args
    if not app:
        raise PikuError(f"{command} needs an app: run it in a checkout with a `piku` git remote, "
                        "set PIKU_APP, or pass -r REMOTE")
    if command == "run" and args[:1] == ["--"]:
        args = args[1:]
    return [command, app] + args


def plan_key_removal(keys, wanted, force=False):
    """The authorized_keys lines `keys:remove WANTED` drops: keys is [(line index, AuthorizedKey)],
    WANTED a fingerprint (`SHA256:` optional) or a comment. Returns ([line indices], key).
    Refuses no match, a comment several keys share, a key piku did not add, and (unless force)
    the last key piku has: nobody could log in to put one back."""
    if not wanted or len(wanted) > 300 or not wanted.isprintable():
        raise PikuError("keys:remove: expected a fingerprint (SHA256:...) or a key's comment (see `keys`)")
    fp = wanted if wanted.startswith("SHA256:") else "SHA256:" + wanted
    found = [(i, k) for i, k in keys if k.fingerprint == fp] or [(i, k) for i, k in keys if k.comment == wanted]
    if not found:
        raise PikuError(f"no key with the fingerprint or comment {wanted!r} (see `keys`)")
    prints = sorted({k.fingerprint for _, k in found})
    if len(prints) > 1:
        raise PikuError(f"{len(prints)} keys have the comment {wanted!r} ({', '.join(prints)}): "
                        "remove one by its fingerprint")
    drop = [i for i, k in found if k.piku]
    if not drop:
        raise PikuError(f"key {prints[0]} was not added by piku (its line runs no piku command): "
                        "edit ~/.ssh/authorized_keys by hand")
    if not force and not any(k.piku and i not in drop for i, k in keys):
        raise PikuError(f"key {prints[0]} is the last key piku has: without it nobody can push or run "
                        "commands; add another key first, or pass --force")
    return drop, found[0][1]


def plan_group_report(command, done, failed, code, pending):
    """The lines the client ends with when a command or push on a group of remotes stopped at
    `failed` (the last one is the error)."""
    if command == "push":
        lines = [f"{', '.join(done)} already run{'s' if len(done) == 1 else ''} the new release; to go back "
                 "there: " + ", ".join(f"`piku -r {n} rollback`" for n in done)] if done else []
        return lines + [f"push to {failed} failed (exit {code}): {failed} keeps its previous release"
                        + (f"; not pushed to {', '.join(pending)}" if pending else "")]
    return ([f"{command} ran on {', '.join(done)}"] if done else []) + [
        f"{command} failed on {failed} (exit {code}); stopped there" + (f": not run on {', '.join(pending)}"
                                                                        if pending else "")]


RELEASE_ID_RE = re.compile(r"\d{8}-\d{6}-[0-9a-f]{10}(\.\d+)?")  # how new_release names a release


def plan_staging_leftovers(names, recorded, live, went_live):
    """The directories in releases/<app> (`names`) that failed pushes of an older piku.py left
    behind: named as releases are, not in the release history (`recorded`), and newer than the
    live release `live` (None: none is in releases/<app>); an older piku.py only ever moved
    forward, so these never went live. Only while no release of the history went live
    (`went_live`): after that, an unrecorded directory can be a release the history dropped."""
    if went_live:
        return []
    return sorted(n for n in names if n not in recorded and RELEASE_ID_RE.fullmatch(n)
                  and (live is None or n[:15] > live[:15]))


def fingerprint(*parts):
    import hashlib
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


# === 11. Filesystem ===

def read_text(path, default=None):
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return default


def write_atomic(path, content, mode=0o644, only_if_changed=False):
    """Write via temp file + rename so readers never see a half file. True if written."""
    if only_if_changed and read_text(path) == content:
        return False
    import tempfile
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


def ensure_dirs(*dirs):
    for d in dirs:
        os.makedirs(d, exist_ok=True)


def private_dirs(*dirs):
    """Make dirs 0750 (the piku user's; its group may read; other users nothing), and take
    group write and every right of other users away from existing ones (earlier versions made
    them 0755: any local user could read an app's data and logs)."""
    for d in dirs:
        os.makedirs(d, mode=0o750, exist_ok=True)
        mode = os.stat(d).st_mode & 0o7777
        if mode & 0o027:
            os.chmod(d, mode & ~0o027)


def remove_path(path):
    import shutil
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):  # files, links, sockets, FIFOs
        os.unlink(path)


class AppLock:
    """Per-app exclusive lock: deploys and config changes of one app never interleave."""

    def __init__(self, paths, app, wait=600):
        self.path, self.app, self.wait, self.fd = os.path.join(paths.locks, f"{app}.lock"), app, wait, None

    def __enter__(self):
        import fcntl
        import time
        ensure_dirs(os.path.dirname(self.path))
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        t0, said = time.monotonic(), False
        while time.monotonic() < t0 + self.wait:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if not said and time.monotonic() > t0 + 1:  # (the old web workers of the last switch
                    said = True                              # stop in the background for ~0.1 s)
                    detail(f"waiting for another operation on {self.app} to finish...")
                time.sleep(0.02)
        os.close(self.fd)
        raise PikuError(f"{self.app} is busy (another deploy or config change); try again later")

    def __exit__(self, *exc):
        os.close(self.fd)


def vassal_belongs(text, paths, app):
    """A vassal ini belongs to app iff its chdir is that app's directory or one of its releases
    (exact, no prefix: app `a` never owns `ab`'s files)."""
    want, releases = os.path.join(paths.apps, app), os.path.join(paths.releases, app)
    for line in split_lines(text or ""):
        key, sep, value = line.partition("=")
        if sep and key.strip() == "chdir":
            value = value.strip().rstrip("/")
            return value == want or (os.path.dirname(value) == releases and bool(os.path.basename(value)))
    return False


def vassals_of(paths, app, directory=None):
    """Names of vassal files in uwsgi-enabled (or directory) that belong to app."""
    directory = directory or paths.uwsgi_enabled
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(app + "_") and n.endswith(".ini")
                  and vassal_belongs(read_text(os.path.join(directory, n)), paths, app))


def known_apps(paths):
    try:
        with os.scandir(paths.repos) as entries:  # (is_dir() needs no stat per app)
            return sorted(e.name for e in entries if APP_NAME_RE.fullmatch(e.name) and e.is_dir())
    except FileNotFoundError:
        return []


def app_must_exist(paths, app):
    app = parse_app_name(app)
    if not os.path.isdir(os.path.join(paths.repos, app)) and not os.path.exists(os.path.join(paths.apps, app)):
        raise PikuError(f"no such app: {app} (see `apps`)")
    return app


def load_config(paths, app):
    """config:set values (envs/<app>/ENV)."""
    return parse_env(read_text(os.path.join(paths.envs, app, "ENV"), ""), source=f"{app} config", expand=False)


def write_config(paths, app, config):
    ensure_dirs(os.path.join(paths.envs, app))
    write_atomic(os.path.join(paths.envs, app, "ENV"), render_env(config), mode=0o600)


def load_live_env(paths, app):
    return parse_env(read_text(os.path.join(paths.envs, app, "LIVE_ENV"), ""), source="LIVE_ENV")


def load_scaling(paths, app):
    return parse_scaling(read_text(os.path.join(paths.envs, app, "SCALING"), ""))


# Repository files piku reads itself (requirements files included by these are added).
REPO_FILES = ("Procfile", "ENV", "requirements.txt", "pyproject.toml", "uv.lock", ".python-version")


def protect_repo_env(release_dir):
    """The committed ENV may hold secrets: mode 0600, so nginx never serves it. Committed as a
    link, the file it leads to is protected if it is in the release; nothing outside the
    release is ever touched (check_repo_links refuses that link later)."""
    real, top = os.path.realpath(os.path.join(release_dir, "ENV")), os.path.realpath(release_dir)
    if real.startswith(top + os.sep) and os.path.isfile(real):
        os.chmod(real, 0o600)


def check_repo_path(release_dir, rel, kind="file"):
    """Refuse rel (relative to the release) when it leads outside the release (a committed
    symbolic link, or `..`) or exists as something other than a `kind` ('file', 'directory';
    None: either). The target is never named nor read: the error must not show what lies
    outside."""
    path = os.path.join(release_dir, rel)
    if not os.path.lexists(path):
        return
    top = os.path.realpath(release_dir)
    if not (os.path.realpath(path) + os.sep).startswith(top + os.sep):
        raise PikuError(f"{rel} leads outside the repository (a symbolic link or `..`): refused; "
                        f"commit the {kind or 'package'} itself")
    if kind and not (os.path.isdir(path) if kind == "directory" else os.path.isfile(path)):
        raise PikuError(f"{rel} is not a {kind}")


def check_repo_links(release_dir):
    """Before piku reads the pushed files: each one it reads (REPO_FILES, the files
    requirements.txt includes, recursively) is a regular file inside the release, and the
    local packages they install from (`./lib`, uv.lock's path sources) are in it too."""
    pending, requirements, done = list(REPO_FILES), {"requirements.txt"}, set()
    while pending and len(done) < 100:
        rel = pending.pop(0)
        if rel in done:
            continue
        done.add(rel)
        check_repo_path(release_dir, rel)
        text = read_text(os.path.join(release_dir, rel), "") if os.path.isfile(os.path.join(release_dir, rel)) else ""
        if rel in requirements:
            for inc in parse_requirement_includes(text):
                if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:|/", inc):  # (URLs, absolute paths)
                    inc = os.path.normpath(os.path.join(os.path.dirname(rel), inc))
                    requirements.add(inc)
                    pending.append(inc)
        local = parse_requirement_local_paths(text) if rel in requirements else \
            parse_lock_local_sources(text) if rel == "uv.lock" else []
        for src in local:
            if not src.startswith("/"):
                check_repo_path(release_dir, os.path.normpath(os.path.join(os.path.dirname(rel), src)), None)


def owner_only_problem(path, root_may_own=False):
    """None if nobody but root and the piku user can change the file at the absolute `path`:
    it is a regular file of the piku user (or, root_may_own, of root), writable by its owner
    alone, and no directory or symbolic link on the way to it (followed or not) is another
    user's or open to others (a sticky directory such as /tmp excepted). Else what is wrong,
    in a few words."""
    import stat
    me = os.getuid()
    try:
        for candidate in dict.fromkeys((os.path.normpath(path), os.path.realpath(path))):
            parts = candidate.strip("/").split("/")
            for i, name in enumerate(parts):
                parent = "/" + "/".join(parts[:i])
                pst, est = os.stat(parent), os.lstat(os.path.join(parent, name))
                if pst.st_uid not in (0, me) or (pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX):
                    return f"other users can change {parent}"
                if stat.S_ISLNK(est.st_mode) and est.st_uid not in (0, me):
                    return f"{os.path.join(parent, name)} is another user's symbolic link"
        st = os.stat(path)
    except FileNotFoundError:
        return "it does not exist"
    except OSError as e:
        return f"it cannot be checked ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_uid not in ((me, 0) if root_may_own else (me,)) or st.st_mode & 0o022:
        return "it is not a file only " + ("root or " if root_may_own else "") + "the piku user can write"
    return None


INCLUDE_SETTINGS = ("UWSGI_INCLUDE_FILE", "NGINX_INCLUDE_FILE")


def check_app_paths(release_dir, workers, settings):
    """Paths the settings and the Procfile make uWSGI and nginx read: include files relative
    to the app stay inside the release (checked when there is one), absolute ones are files
    only the piku user can change (never another user's: uWSGI would run its `exec-*`
    options as the piku user); static directories in the release do not lead outside it."""
    for key in INCLUDE_SETTINGS:
        value = settings.get(key)
        if not value:
            continue
        safe_path(value, key)
        if value.startswith("/"):
            problem = owner_only_problem(value)
            if problem:
                raise PikuError(f"{key}: {value} is refused: {problem}. Use a file in the app's "
                                "repository (a path relative to it), or one the piku user owns")
        elif release_dir:
            check_repo_path(release_dir, value)
    statics = [d for _, d in parse_static_paths(settings.get("NGINX_STATIC_PATHS", ""))]
    for rel in statics + ([static_dir(workers)] if "static" in (workers or {}) else []):
        if release_dir and not rel.startswith("/"):
            check_repo_path(release_dir, rel.rstrip("/") or ".", "directory")


def free_port(bind):
    import socket
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as sock:
        sock.bind((bind.strip("[]"), 0))
        return sock.getsockname()[1]


def port_free(bind, port):
    """Can a server listen on this port right now? (SO_REUSEADDR, as servers set it: connections
    of a process that just stopped, in TIME_WAIT, do not make the port busy.)"""
    import socket
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind.strip("[]"), port))
            return True
        except OSError:
            return False


def port_open(host, port, timeout=0.5):
    import socket
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def is_inside(path, top):
    """Is path, links followed, top or under it?"""
    real, top = os.path.realpath(path), os.path.realpath(top)
    return real == top or real.startswith(top + os.sep)


def backup_member_kind(member):
    """What a tarfile member is, in the words of parse_backup_member."""
    return ("file" if member.isreg() else "dir" if member.isdir() else "link" if member.issym()
            else "hard link" if member.islnk() else "FIFO" if member.isfifo()
            else "device" if member.isdev() else "special member")


def copy_new_file(src, dest, mode):
    """Copy the binary stream src into the new file dest (made here: never an existing file, never
    through a link); returns the sha256 of what was copied."""
    import hashlib
    h = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            out.write(chunk)
    os.chmod(dest, mode)
    return h.hexdigest()


def extract_backup(stream, staging):
    """Unpack the backup archive read from `stream` into the empty folder `staging`: only members
    parse_backup_member accepts, each once, none written through a symbolic link, and every link
    leading into data/ when followed. Returns ({file: sha256}, {link: target}); raises PikuError."""
    import tarfile
    import zlib
    files, links, dirs, seen = {}, {}, [], set()
    try:
        with tarfile.open(fileobj=stream, mode="r|gz") as tar:
            for m in tar:
                rel = parse_backup_member(m.name, backup_member_kind(m), m.size, m.linkname)
                dest, parts = os.path.join(staging, rel), rel.split("/")
                if any(os.path.islink(os.path.join(staging, *parts[:i])) for i in range(1, len(parts))):
                    raise PikuError(f"{rel} would be written through a symbolic link")
                if rel in seen or os.path.lexists(dest) and (not m.isdir() or os.path.islink(dest)):
                    raise PikuError(f"{rel} is in the archive twice")
                seen.add(rel)
                os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
                if m.isdir():
                    os.makedirs(dest, mode=0o700, exist_ok=True)
                    dirs.append((dest, m.mode & 0o777 | 0o700))
                elif m.issym():
                    os.symlink(m.linkname, dest)
                    links[rel] = m.linkname
                else:
                    mode = m.mode & 0o777 if parts[0] == "data" else 0o600
                    files[rel] = copy_new_file(tar.extractfile(m), dest, mode)
                    os.utime(dest, (m.mtime, m.mtime))
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise PikuError(f"the archive is not a whole tar.gz archive ({str(e) or type(e).__name__})")
    except OSError as e:
        raise PikuError(f"the archive could not be unpacked here ({e.strerror or e})")
    for rel in links:
        if not is_inside(os.path.join(staging, rel), os.path.join(staging, "data")):
            raise PikuError(f"the symbolic link {rel} leads out of the app's data (through another link)")
    for d, mode in reversed(dirs):
        os.chmod(d, mode)
    return files, links


# === 12. Builders: Python (uv, requirements.txt, pyuwsgi) ===
# One function per runtime; RUNTIMES (below) is the table deploy walks in order.

class Build:
    """Everything a builder needs about one release being prepared. A builder writes only into
    the release directory and into content-keyed directories it creates (a Python app's
    virtualenv in venvs/<app>/<fingerprint>): never into anything the live release uses."""

    def __init__(self, paths, app, release_dir, settings, workers, environ, live=None):
        self.paths, self.app, self.release_dir = paths, app, release_dir
        self.settings, self.workers = settings, workers
        self.state = os.path.join(paths.state, app)
        self.env = build_env(paths, app, settings, environ)
        self.uv = find_uv(self.env, environ) if setting_bool(settings, "PIKU_USE_UV") else None
        self.verbose = setting_bool(settings, "PIKU_VERBOSE")
        self.live = live or {}  # the live release's manifest record ({} for a first deploy)
        self.venv = None         # the release's virtualenv (Python apps), once built or found
        self.python = None       # 'X.Y.Z' of that virtualenv
        self.fingerprint = None  # what the virtualenv was built from (its directory's name)
        self.inputs = None       # the same before the interpreter is known (cheap to compute)
        self.wants_pyuwsgi = False


def find_uv(env, environ):
    """uv on the app's PATH, the server's PATH, or where `pip install --user uv` puts it."""
    home = os.path.expanduser("~")
    for path in (env.get("PATH"), environ.get("PATH"), f"{home}/.local/bin:{home}/.cargo/bin"):
        found = which("uv", {"PATH": path or ""})
        if found:
            return found
    return None


# What build tools (uv, pip, virtualenv, the interpreter) get: from the server's environment,
# the basics, locale, proxies and certificates; from the app's settings only what configures
# them (never all settings: a big value would keep them from starting, and HOME, USER and the
# other computed names are piku's, not the repo ENV's). PIKU_* settings are piku's own.
PROXY_NAMES = tuple(n for p in ("http", "https", "no", "all") for n in (f"{p}_proxy", f"{p.upper()}_PROXY"))
BUILD_SERVER_NAMES = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
                      "SSL_CERT_FILE", "SSL_CERT_DIR") + PROXY_NAMES
BUILD_SETTING_NAMES = ("SSL_CERT_FILE", "SSL_CERT_DIR") + PROXY_NAMES
BUILD_PREFIXES = ("UV_", "PIP_", "VIRTUALENV_")


def build_env(paths, app, settings, environ):
    """Environment for build tools: the server's basics (no git hook variables), the app's
    build settings, uv's paths (see BUILD_SERVER_NAMES)."""
    env = {k: v for k, v in clean_env(environ).items()
           if k in BUILD_SERVER_NAMES or k.startswith(BUILD_PREFIXES + ("LC_", "XDG_"))}
    env.update({k: v for k, v in settings.items() if k in BUILD_SETTING_NAMES or k.startswith(BUILD_PREFIXES)
                or (k.startswith("PIKU_") and k in SETTING)})
    env["PATH"] = settings.get("PATH") or env.get("PATH") or os.defpath
    env.setdefault("UV_PYTHON_PREFERENCE", DEFAULTS["UV_PYTHON_PREFERENCE"])
    env.setdefault("UV_CACHE_DIR", paths.uv_cache)
    # Server-wide uv settings live where uv itself looks (~/.config/uv/uv.toml, /etc/uv/uv.toml):
    # uv merges them under each project's own [tool.uv], which wins. (UV_CONFIG_FILE would make
    # uv skip the project's settings, a private index included.)
    return env


def tool_run(b, argv, what, cwd=None, env=None):
    """Run a build tool, output captured; shown on failure (or always when verbose)."""
    import time
    t0 = time.monotonic()
    proc = run(argv, cwd=cwd or b.release_dir, env={**b.env, **(env or {})}, capture="merged", check=False)
    if b.verbose or proc.returncode != 0:
        for line in proc.stdout.splitlines()[-60:]:
            (detail if proc.returncode == 0 else warn)(line)
    if proc.returncode != 0:
        err = PikuError(f"{what} failed (exit {proc.returncode})", proc.returncode)
        err.output = proc.stdout
        raise err
    return proc.stdout, time.monotonic() - t0


def python_request(settings, release_dir):
    """(uv request, source) from PYTHON_VERSION, then .python-version; (None, None) if neither."""
    if settings.get("PYTHON_VERSION", "").strip():
        return parse_python_version(settings["PYTHON_VERSION"]), "ENV"
    text = read_text(os.path.join(release_dir, ".python-version"))
    if text and text.strip():
        try:
            return parse_python_version(text), ".python-version"
        except PikuError as e:
            raise PikuError(f".python-version: {e}")
    return None, None


ENTRY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
ENTRY_TARGET_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def parse_project_scripts(pyproject_text):
    """[project.scripts] of a pyproject.toml -> ({name: 'module:attr'}, [problems])."""
    table, problems = {}, []
    section = None
    for raw in split_lines(pyproject_text or ""):
        line = raw.split(" #")[0].strip()
        if line.startswith("["):
            section = line.strip("[] ").replace(" ", "")
            continue
        if section != "project.scripts" or "=" not in line:
            continue
        name, _, value = line.partition("=")
        name, value = name.strip().strip("\"'"), value.strip().strip("\"'")
        target = value.split("[")[0].strip()  # `mod:func [extra]`
        if ENTRY_NAME_RE.fullmatch(name) and ENTRY_TARGET_RE.fullmatch(target):
            table[name] = target
        else:
            problems.append(f"[project.scripts] {name} = {value!r} is not `module:function`: skipped")
    return table, problems


def render_entry_point(python, app_dir, target):
    """A console script for [project.scripts] that runs the app's code (the project itself is
    not installed into the virtualenv). It runs the release of the process that starts it
    ($PIKU_APP_DIR, set for every process), else the live release (apps/<app>)."""
    module, attr = target.split(":")
    return (f"#!{python}\n# written by piku.py from [project.scripts] of the app\n"
            "import importlib\nimport os\nimport sys\n"
            f"app_dir = os.environ.get('PIKU_APP_DIR') or {app_dir!r}\n"
            "sys.path[0:0] = [d for d in (app_dir, os.path.join(app_dir, 'src')) if os.path.isdir(d)]\n"
            f"target = importlib.import_module({module!r})\n"
            f"for part in {attr!r}.split('.'):\n    target = getattr(target, part)\n"
            "sys.exit(target())\n")


def parse_requires_python(pyproject_text):
    """The `requires-python` specifier of a pyproject.toml, or None."""
    m = re.search(r"""^requires-python\s*=\s*["']([^"']+)["']""", pyproject_text or "", re.M)
    return m.group(1).strip() if m else None


def no_interpreter_error(request, requires=None, download_error=None):
    """The error for a Python that cannot be found, with the fixes that apply (pure)."""
    why = f" (uv could not download it: {download_error})" if download_error else ""
    if request is None and requires:
        return PikuError(
            f"No installed Python satisfies requires-python = \"{requires}\" of pyproject.toml{why}. "
            f"Fixes: (1) install one on the server as the piku user: `uv python install '{requires}'`; "
            f"(2) choose an installed version that fits: `config:set APP PYTHON_VERSION=<version>` "
            f"(see `uv python list --only-installed`); (3) relax requires-python and push again")
    label = request or "(uv default)"
    return PikuError(
        f"No interpreter found for Python {label}{why}. Fixes: (1) install it on the server as the "
        f"piku user: `uv python install{' ' + request if request else ''}`; (2) choose an installed version: "
        f"`config:set APP PYTHON_VERSION=<version>` (see `uv python list --only-installed`); "
        f"(3) let uv download it: `config:set APP UV_PYTHON_PREFERENCE=managed "
        f"UV_PYTHON_DOWNLOADS=automatic` on a server that can reach them")


def find_python(b, request):
    """Path of the interpreter for request (uv's default when None)."""
    if not b.uv:
        return find_python_on_path(b.env, request)
    argv = [b.uv, "python", "find", "--no-progress"] + ([request] if request else [])
    proc = run(argv, cwd=b.release_dir, env=b.env, capture=True, check=False)
    download_error = None
    if proc.returncode != 0 and request and b.env.get("UV_PYTHON_DOWNLOADS") != "never" \
            and b.env.get("UV_PYTHON_PREFERENCE") not in ("only-system", "system"):
        inst = run([b.uv, "python", "install", "--no-progress", request], cwd=b.release_dir, env=b.env,
                   capture="merged", check=False)
        if inst.returncode != 0:
            lines = [l.strip() for l in inst.stdout.splitlines() if l.strip()]
            download_error = (lines[-1] if lines else f"exit {inst.returncode}")[:200]
        proc = run(argv, cwd=b.release_dir, env=b.env, capture=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        requires = parse_requires_python(read_text(os.path.join(b.release_dir, "pyproject.toml"), ""))
        raise no_interpreter_error(request, requires, download_error)
    return proc.stdout.strip().splitlines()[-1]


def find_python_on_path(env, request):
    """Without uv: the newest python3.X on PATH whose version satisfies request (None: python3)."""
    import glob
    if not request:
        path = which("python3", env)
        if not path:
            raise no_interpreter_error("3")
        return path
    minors = set()
    for d in (env.get("PATH") or "").split(":"):
        for exe in glob.glob(os.path.join(d, "python3.[0-9]*")):
            m = re.fullmatch(r"python3\.(\d+)", os.path.basename(exe))
            if m and os.access(exe, os.X_OK):
                minors.add(int(m.group(1)))
    for minor in sorted(minors, reverse=True):
        exe = which(f"python3.{minor}", env)
        if python_satisfies(python_version_of(exe), request):
            return exe
    raise no_interpreter_error(request)


def python_satisfies(version, request):
    """Does 'X.Y.Z' meet a request from parse_python_version ('3', '3.12', '3.12.1', '>=3.11,<3.13')?"""
    have = tuple(int(x) for x in version.split(".")[:3])
    if not re.match(r"^[<>=!~]", request):
        want = tuple(int(x) for x in request.rstrip("t").split("."))
        return have[:len(want)] == want
    for clause in request.split(","):
        m = re.fullmatch(r"(==|!=|<=|>=|~=|<|>)(\d+(?:\.\d+)*)(\.\*)?", clause.strip())
        if not m:
            return False
        op, ver, star = m.group(1), tuple(int(x) for x in m.group(2).split(".")), m.group(3)
        full = (ver + (0, 0, 0))[:3]  # PEP 440: 3.11 means 3.11.0, except with a .* prefix
        same = have[:len(ver)] == ver if star else have == full
        ok = {"==": same, "!=": not same, "<=": have <= full, ">=": have >= full, "<": have < full,
              ">": have > full, "~=": have >= full and have[:len(ver) - 1] == ver[:-1]}[op]
        if not ok:
            return False
    return True


def python_version_of(interpreter):
    return capture([interpreter, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])


def venv_python_version(venv):
    """'X.Y.Z' of a working venv, or None when it is missing or broken."""
    cfg = parse_pyvenv_cfg(read_text(os.path.join(venv, "pyvenv.cfg"), "")) if venv else {}
    py = os.path.join(venv or "", "bin", "python")
    if not cfg.get("version_info") or not os.path.exists(py) or not os.access(py, os.X_OK):
        return None
    return ".".join(cfg["version_info"].split(".")[:3])


VENV_MARK = ".piku-venv.json"  # written last: a virtualenv without it was cut off half-way


def venv_dir(paths, app, fp):
    return os.path.join(paths.venvs, app, fp[:16])


def venv_complete(venv):
    """Did piku finish building this virtualenv (and is it still usable)?"""
    return bool(venv) and os.path.exists(os.path.join(venv, VENV_MARK)) and venv_python_version(venv) is not None


def venv_packages(venv):
    """{name: version} of the distributions installed in a virtualenv (its *.dist-info)."""
    out = {}
    for site in glob_paths(os.path.join(venv or "/nonexistent", "lib", "python*", "site-packages")):
        for name in os.listdir(site):
            m = re.fullmatch(r"([A-Za-z0-9_.]+)-([^-]+)\.dist-info", name)
            if m:
                out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def glob_paths(pattern):
    import glob
    return glob.glob(pattern)


def plan_package_diff(old, new):
    """['+ six==1.16', '- six==1.15', ...] from two {name: version} maps (pure)."""
    lines = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            if name in old:
                lines.append(f"- {name}=={old[name]}")
            if name in new:
                lines.append(f"+ {name}=={new[name]}")
    return lines


def announce_venv_diff(live_venv, venv):
    """What the new virtualenv has that the live one does not, and the reverse."""
    lines = plan_package_diff(venv_packages(live_venv), venv_packages(venv))
    for line in lines:
        detail(line)
    added, removed = sum(l[0] == "+" for l in lines), sum(l[0] == "-" for l in lines)
    detail(f"{added} added, {removed} removed, compared with the live release" if lines else
           "the same packages as the live release")


def uv_settings_part(b):
    return sorted((k, v) for k, v in b.settings.items() if k.startswith("UV_"))


def python_inputs(b, tool, request, committed):
    """What a Python app's virtualenv is made from, known before any interpreter is looked for:
    the dependency files (with their includes and local packages), the tool, the Python asked
    for, the UV_* settings and what decides the wsgi mode. Equal inputs: the live virtualenv
    serves the new release as it is (no copy, no sync, no interpreter discovery)."""
    d = b.release_dir
    if tool == "uv":
        lock_text = read_text(os.path.join(d, "uv.lock"), "")
        local = local_sources_digest(d, parse_lock_local_sources(lock_text))
        files = ("uv", read_text(os.path.join(d, "pyproject.toml"), ""), lock_text, committed)
    else:
        reqs = requirements_with_includes(d)
        local = local_sources_digest(d, parse_requirement_local_paths(reqs))
        files = ("requirements", reqs, "uv" if b.uv else "pip",
                 is_fully_pinned(read_text(os.path.join(d, "requirements.txt"), "")))
    wsgi = ("wsgi", setting(b.settings, "PIKU_PYUWSGI"), uwsgi_python_plugin(b.env)[1]) if "wsgi" in b.workers else ()
    return fingerprint(*files, local, request or "", uv_settings_part(b), wsgi)


def prepare_uv_lock(b):
    """True when the repo commits a uv.lock (used as it is, `--locked`). Without one, the lock
    the live release was built with is copied in, so dependencies stay where they were until
    pyproject.toml changes (uv then updates the copy; the next release copies that)."""
    lock = os.path.join(b.release_dir, "uv.lock")
    if os.path.lexists(lock):
        return True
    live_dir = b.live.get("dir")
    for source in ([os.path.join(live_dir, "uv.lock")] if live_dir else []) + [os.path.join(b.state, "uv.lock")]:
        text = read_text(source)
        if text:
            write_atomic(lock, text)
            break
    return False


def keep_live_python(b, request, source):
    """An app that asks for no Python keeps the one its live virtualenv has, as long as that
    satisfies requires-python: an interpreter installed later for another app must not move it."""
    version = b.live.get("python")
    if request or not version:
        return request, source
    requires = parse_requires_python(read_text(os.path.join(b.release_dir, "pyproject.toml"), ""))
    try:
        if requires and not python_satisfies(version, requires.replace(" ", "")):
            detail(f"the live release's Python {version} does not satisfy requires-python {requires}")
            return None, None
    except (ValueError, KeyError):
        return None, None
    return version, "the live release: no version asked for"


def announce_unused_live_venv(b):
    """Why the live virtualenv is not used: the original piku built it, or it is broken."""
    if b.live.get("runtime") == "legacy" and venv_python_version(b.live["venv"]):
        detail(f"the live virtualenv (Python {b.live['python']}) was built by the original piku: "
               "the new one is built beside it")
    else:
        warn("the live virtualenv is broken (no working bin/python): a new one is built")


def find_interpreter(b, tool, request):
    """A requirements.txt app that asks for no version gets the server's python3, as with the
    original piku; a pyproject.toml app gets uv's choice (which honours requires-python)."""
    if request is None and (tool == "requirements" or not b.uv):
        found = which("python3", b.env)
        if found:
            return found
    return find_python(b, request)


def wsgi_needs_pyuwsgi(b, version):
    if "wsgi" not in b.workers:
        return False
    mode, _ = plan_wsgi_mode(setting(b.settings, "PIKU_PYUWSGI"), version, uwsgi_python_plugin(b.env)[1])
    return mode == "pyuwsgi"


def build_python(b, tool):
    """Python app: find or build the virtualenv for these dependencies, beside the live one."""
    import json
    import time
    committed = prepare_uv_lock(b) if tool == "uv" else None
    request, source = python_request(b.settings, b.release_dir)
    b.inputs = python_inputs(b, tool, request, committed)
    if b.live.get("inputs") == b.inputs and venv_complete(b.live.get("venv")):
        b.venv, b.python, b.fingerprint = b.live["venv"], b.live["python"], b.live["fingerprint"]
        step(f"Dependencies unchanged: using the live virtualenv (Python {b.python})")
        install_entry_points(b)  # (only a script that went missing is written again)
        return
    if b.live.get("venv") and not venv_complete(b.live["venv"]):
        announce_unused_live_venv(b)
    asked = request
    request, source = keep_live_python(b, request, source)
    if request:
        step(f"Using Python {request} (from {source})")
    interpreter = find_interpreter(b, tool, request)
    b.python = python_version_of(interpreter)
    b.wants_pyuwsgi = wsgi_needs_pyuwsgi(b, b.python)
    b.fingerprint = fingerprint(b.inputs, b.python, b.wants_pyuwsgi)
    b.venv = venv_dir(b.paths, b.app, b.fingerprint)
    if venv_complete(b.venv):
        step(f"Dependencies unchanged: using the virtualenv of an earlier release (Python {b.python})")
        return
    if b.venv == b.live.get("venv"):  # the live one, broken by hand: the new one goes beside it
        b.venv += "-" + fingerprint(time.time())[:6]
    step(f"Building a virtualenv with Python {b.python} (the live one is not touched)")
    remove_path(b.venv)  # what a build cut off half-way left
    ensure_dirs(os.path.dirname(b.venv))
    try:
        (sync_uv if tool == "uv" else install_requirements)(b, interpreter, committed)
        announce_venv_diff(b.live.get("venv"), b.venv)
        if b.wants_pyuwsgi:
            install_pyuwsgi(b)
        install_entry_points(b)
        if tool == "uv" and not committed:  # uv wrote the lock the next release starts from
            b.inputs = python_inputs(b, tool, asked, committed)
        write_atomic(os.path.join(b.venv, VENV_MARK), json.dumps(
            {"python": b.python, "fingerprint": b.fingerprint, "created": int(time.time())}) + "\n")
    except BaseException:
        remove_path(b.venv)
        raise


def sync_uv(b, interpreter, committed):
    step("Syncing dependencies with uv" + (" (uv.lock)" if committed else ""))
    # --no-editable: a local package is copied into the venv, never linked to this release
    # directory (which is pruned later, and a rollback must not see the new code).
    argv = [b.uv, "sync", "--no-progress", "--no-dev", "--no-install-project", "--no-editable",
            "--python", interpreter] + (["--locked"] if committed else [])
    try:
        out, secs = tool_run(b, argv, "uv sync", env={"UV_PROJECT_ENVIRONMENT": b.venv})
    except PikuError as e:
        if committed and "needs to be updated" in getattr(e, "output", ""):
            why = [l.strip() for l in e.output.splitlines() if "due to" in l][:1]
            settings = uv_settings_part(b)
            raise PikuError("uv.lock does not match pyproject.toml" + (
                f" with this app's uv settings ({', '.join(k for k, _ in settings)})" if settings else "")
                + ": run `uv lock`" + (" with the same settings" if settings else "") + ", commit "
                "uv.lock and push again (piku never rewrites a committed lock)"
                + (f"; uv says: {why[0][:200]}" if why else ""))
        raise
    detail(f"Synced in {secs:.1f}s")
    if not committed:
        detail("No uv.lock in the repo: the server's lock is kept with the release for the next deploys; "
               "commit one (`uv lock`) for reproducible builds")


def install_requirements(b, interpreter, committed=None):
    """requirements.txt app: a new virtualenv, then uv pip (or pip) installs the file."""
    py = os.path.join(b.venv, "bin", "python")
    if not b.uv:
        tool_run(b, [sys.executable, "-m", "virtualenv", "--quiet", "--python", interpreter, b.venv],
                 "creating the virtualenv (virtualenv)")
        step("Installing requirements with pip" + (" (PIKU_USE_UV=false)" if not setting_bool(
            b.settings, "PIKU_USE_UV") else " (uv not found)"))
        out, secs = tool_run(b, [py, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                                 "-r", "requirements.txt"], "pip install")
        detail(f"Installed in {secs:.1f}s")
        return
    tool_run(b, [b.uv, "venv", "--no-progress", "--python", interpreter, b.venv], "creating the virtualenv")
    install = [b.uv, "pip", "install", "--exact", "--no-editable", "-r", "requirements.txt", "--python", py,
               "--no-progress"]
    if not is_fully_pinned(read_text(os.path.join(b.release_dir, "requirements.txt"), "")):
        step("Installing requirements with uv")
        detail(f"Installed in {tool_run(b, install, 'installing requirements')[1]:.1f}s")
        return
    # a complete lock (pip freeze, uv pip compile): installed exactly as it is
    step("Installing requirements with uv (exact sync, fully pinned)")
    detail(f"Installed in {tool_run(b, [b.uv, 'pip', 'sync', 'requirements.txt', '--python', py, '--no-progress'], 'installing requirements')[1]:.1f}s")
    check = run([b.uv, "pip", "check", "--python", py], cwd=b.release_dir, env=b.env, capture="merged",
                check=False)
    missing = parse_missing_requirements(check.stdout)
    if missing:  # pins only some packages: their dependencies are needed too
        step(f"requirements.txt pins packages without their dependencies ({', '.join(missing[:5])}"
             f"{', ...' if len(missing) > 5 else ''}): installing those too")
        detail(f"Installed in {tool_run(b, install, 'installing requirements')[1]:.1f}s")


def install_entry_points(b):
    """Console scripts of [project.scripts] in the virtualenv's bin/, as installing the project
    would make them (a Procfile may name them). A program a package installed is kept."""
    scripts, problems = parse_project_scripts(read_text(os.path.join(b.release_dir, "pyproject.toml"), ""))
    for problem in problems:
        warn(problem)
    bindir = os.path.join(b.venv, "bin")
    for name, target in sorted(scripts.items()):
        path = os.path.join(bindir, name)
        if os.path.lexists(path):
            if "written by piku.py from [project.scripts]" not in (read_text(path, "") or "")[:200]:
                warn(f"[project.scripts] {name}: the virtualenv already has a program of that name: kept it")
            continue
        write_atomic(path, render_entry_point(os.path.join(bindir, "python"),
                                              os.path.join(b.paths.apps, b.app), target), mode=0o755)
        detail(f"script {name} -> {target}")


def build_uv(b):
    """pyproject.toml app: `uv sync` into its own virtualenv, honouring a committed uv.lock."""
    if not b.uv and not setting_bool(b.settings, "PIKU_USE_UV"):
        raise PikuError("PIKU_USE_UV=false, but this app has a pyproject.toml and no requirements.txt: "
                        "piku builds pyproject apps with uv only; unset PIKU_USE_UV or add a "
                        "requirements.txt")
    if not b.uv:
        raise PikuError("this app has a pyproject.toml but uv is not installed for the piku user: "
                        "install it with `pip install --user uv` (on Debian 12 / Ubuntu 24.04: "
                        "`pipx install uv`, or add --break-system-packages), or Astral's standalone "
                        "installer, then push again; or add a requirements.txt")
    build_python(b, "uv")


def build_requirements(b):
    """requirements.txt app: uv pip (or virtualenv + pip) into its own virtualenv."""
    if os.path.exists(os.path.join(b.release_dir, "pyproject.toml")):
        detail("requirements.txt present: it decides the dependencies (pyproject.toml not used)")
    build_python(b, "requirements")


def local_sources_digest(base, rels):
    """Fingerprint part for local packages: every file under each path (a file: itself), so a
    change to a library kept in the repo re-syncs it. Hidden folders, caches and what a build
    writes into a source tree (build/, dist/, *.egg-info, target/) are skipped."""
    import hashlib
    h = hashlib.sha256()
    skip = {"__pycache__", "node_modules", "build", "dist", "target"}
    for rel in rels:
        top = os.path.normpath(os.path.join(base, rel))
        h.update(f"\0{rel}\0".encode())
        walk = [(os.path.dirname(top), [], [os.path.basename(top)])] if os.path.isfile(top) else os.walk(top)
        for d, dirs, files in walk:
            dirs[:] = sorted(x for x in dirs if x not in skip and not x.startswith(".")
                             and not x.endswith(".egg-info"))
            for name in sorted(files):
                if name.endswith((".pyc", ".pyo")):
                    continue
                path = os.path.join(d, name)
                try:
                    with open(path, "rb") as f:
                        h.update(os.path.relpath(path, top).encode() + b"\0" + hashlib.sha256(f.read()).digest())
                except OSError:
                    continue
    return h.hexdigest() if rels else ""


def requirements_with_includes(release_dir, name="requirements.txt", seen=None):
    """requirements.txt and every file it includes (-r/-c, recursively), for the fingerprint."""
    seen = set() if seen is None else seen
    path = os.path.realpath(os.path.join(release_dir, name))
    if path in seen or len(seen) > 50:
        return ""
    seen.add(path)
    text = read_text(path, "")
    parts = [f"# {name}\n{text}"]
    for inc in parse_requirement_includes(text):
        parts.append(requirements_with_includes(os.path.dirname(path), inc, seen))
    return "".join(parts)


# === 13. Builders: other runtimes, and the table of runtimes ===

# --- Other runtimes. A build writes into the new release and into content-keyed cache entries
# (state/<app>/<kind>/<key>/, complete once they hold CACHE_DONE, never changed after): nothing
# the live release uses is touched, so a failed push leaves it as it was.

CACHE_DONE = ".piku-complete"
CACHE_KEY_RE = re.compile(r"[0-9a-f]{64}")


def need_tools(b, tools):
    """Paths of (binary, Debian package) pairs on the build PATH; a missing one rejects the push.
    (A `package` with spaces is the whole hint: the tool has no usable Debian package.)"""
    found = []
    for binary, package in tools:
        path = which(binary, b.env)
        if not path:
            raise PikuError(f"{binary} is not installed: " + (package if " " in package else
                                                                f"as root, apt-get install {package}"))
        found.append(path)
    return found


def cache_entry(b, kind, key):
    """(directory, complete) of the cache entry state/<app>/<kind>/<key>; an entry a build left
    incomplete (the push was cut off) is emptied for a fresh start."""
    d = os.path.join(b.state, kind, key)
    if os.path.exists(os.path.join(d, CACHE_DONE)):
        return d, True
    remove_path(d)
    ensure_dirs(d)
    return d, False


def fill_cache(entry, fill):
    """Run fill() to make a cache entry complete; a failure removes the half-made entry (so a
    rejected push leaves no trace). Returns fill()'s result."""
    try:
        result = fill()
    except BaseException:
        remove_path(entry)
        raise
    write_atomic(os.path.join(entry, CACHE_DONE), "")
    return result


def cache_used(b, kind, key):
    """Record that this release uses entry `key`, and remove the entries of `kind` that no
    release directory uses any more (their releases were pruned)."""
    base, releases = os.path.join(b.state, kind), os.path.join(b.paths.releases, b.app)
    users = os.path.join(base, "used-by")
    ensure_dirs(users)
    write_atomic(os.path.join(users, os.path.basename(b.release_dir)), key + "\n")
    keep, existing = {key}, set(os.listdir(releases)) if os.path.isdir(releases) else set()
    for rid in os.listdir(users):
        if rid in existing:
            keep.add((read_text(os.path.join(users, rid)) or "").strip())
        else:
            remove_path(os.path.join(users, rid))
    for name in os.listdir(base):
        if CACHE_KEY_RE.fullmatch(name) and name not in keep:
            remove_path(os.path.join(base, name))


def link_tree(src, dst):
    """Copy a directory tree as hard links (symbolic links stay links): instant, no extra disk.
    Across file systems the files are copied."""
    import shutil

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, symlinks=True, copy_function=link)


def keyed_settings(settings, names=(), prefixes=()):
    """The settings that change what a tool installs, for a cache key."""
    return sorted((k, v) for k, v in settings.items() if k in names or k.upper().startswith(prefixes))


def nodeenv_dir(state, settings):
    """Where nodeenv put NODE_VERSION for this app, if it did (else None)."""
    want = settings.get("NODE_VERSION", "").strip()
    d = os.path.join(state, "nodeenv", parse_node_version(want)) if want else None
    return d if d and os.path.exists(os.path.join(d, CACHE_DONE)) else None


def setup_node(b):
    """The Node.js the build (and the app) uses: NODE_VERSION's nodeenv install when there is
    one, else the server's node if it matches, else nodeenv installs it. Returns `vX.Y.Z`."""
    want = b.settings.get("NODE_VERSION", "").strip()
    system = which("node", b.env) or which("nodejs", b.env)
    have = capture([system, "--version"], env=b.env) if system else ""
    if want and not nodeenv_dir(b.state, b.settings) and not node_version_matches(have, want):
        nodeenv = which("nodeenv", b.env)
        if not nodeenv:
            raise PikuError(f"NODE_VERSION={want}, but the server's Node.js is {have or 'not installed'} and "
                            "nodeenv is not there to install another: as root, apt-get install nodeenv "
                            "(or unset NODE_VERSION to use the server's)")
        d, _ = cache_entry(b, "nodeenv", parse_node_version(want))
        step(f"Installing Node.js {want} with nodeenv")
        _, secs = fill_cache(d, lambda: tool_run(b, [nodeenv, "--prebuilt", f"--node={parse_node_version(want)}",
                                                     "--clean-src", "--force", d], "nodeenv"))
        detail(f"Installed in {secs:.1f}s")
    installed = nodeenv_dir(b.state, b.settings)
    if installed:
        b.env["PATH"] = os.path.join(installed, "bin") + ":" + b.env["PATH"]
        system = os.path.join(installed, "bin", "node")
        have = capture([system, "--version"], env=b.env)
    if not system:
        raise PikuError("node is not installed: as root, apt-get install nodejs npm")
    detail(f"Node.js {have}" + (f" (NODE_VERSION={want})" if want else ""))
    return have


def package_manager_path(b, tool):
    """npm, yarn or pnpm on the build PATH; yarn and pnpm are installed with npm into
    state/<app>/node-tools/ when the server has none (as the original piku did)."""
    found = which(tool, b.env) or (which("yarnpkg", b.env) if tool == "yarn" else None)
    if found:
        return found
    (npm,) = need_tools(b, (("npm", "npm"),))
    d, ready = cache_entry(b, "node-tools", tool)
    if not ready:
        step(f"Installing {tool} with npm (NODE_PACKAGE_MANAGER)")
        fill_cache(d, lambda: tool_run(b, [npm, "install", "--no-audit", "--no-fund", "--prefix", d, tool],
                                       f"installing {tool}"))
    return os.path.join(d, "node_modules", ".bin", tool)


def count_node_packages(node_modules):
    n = 0
    for name in os.listdir(node_modules) if os.path.isdir(node_modules) else []:
        scope = os.path.join(node_modules, name)
        n += len(os.listdir(scope)) if name.startswith("@") and os.path.isdir(scope) else not name.startswith(".")
    return n


def build_node(b):
    """package.json: its packages are installed (`npm ci` with a lockfile) into a cache entry
    keyed by their inputs, then hard-linked into the release's node_modules."""
    import shutil
    import time
    files = set(os.listdir(b.release_dir))
    manager = parse_package_manager(b.settings.get("NODE_PACKAGE_MANAGER"))
    version = setup_node(b)
    if "node_modules" in files:
        detail("node_modules is committed in the repository: used as it is, nothing installed")
        return
    argv, lock = plan_node_install(manager, files)
    argv[0] = package_manager_path(b, manager[0])
    if not lock and manager[0] == "npm" and ({"yarn.lock", "pnpm-lock.yaml"} & files):
        detail("a yarn or pnpm lockfile is here: set NODE_PACKAGE_MANAGER=yarn (or pnpm) to install with it")
    inputs = [n for n in ("package.json", lock, ".npmrc") if n and n in files]
    key = fingerprint("node", manager, *(n + "\0" + read_text(os.path.join(b.release_dir, n), "") for n in inputs),
                      version, keyed_settings(b.settings, ("NODE_ENV",), ("NPM_CONFIG_", "YARN_")))
    entry, ready = cache_entry(b, "node", key)
    t0 = time.monotonic()
    if ready:
        step(f"Node.js packages unchanged ({lock or 'package.json, no lockfile'}): reusing an earlier install")
    else:
        step(f"Installing Node.js packages: {manager[0]} {argv[1]}" + (f" ({lock})" if lock else " (no lockfile)"))
        for name in inputs:
            shutil.copy(os.path.join(b.release_dir, name), os.path.join(entry, name))
        fill_cache(entry, lambda: tool_run(b, argv, f"{manager[0]} {argv[1]}", cwd=entry))
    if os.path.isdir(os.path.join(entry, "node_modules")):
        link_tree(os.path.join(entry, "node_modules"), os.path.join(b.release_dir, "node_modules"))
    cache_used(b, "node", key)
    count = count_node_packages(os.path.join(b.release_dir, "node_modules"))
    detail(f"{count} package{'s' * (count != 1)} in node_modules ({'reused' if ready else 'installed'} in "
           f"{time.monotonic() - t0:.1f}s)")


def build_ruby(b):
    """Gemfile: `bundle install` into a cache entry keyed by Gemfile, Gemfile.lock and the Ruby;
    the release's .bundle/config points there."""
    import shutil
    ruby, bundle = need_tools(b, (("ruby", "ruby"), ("bundle", "ruby-bundler")))
    version = capture([ruby, "-e", "print RUBY_VERSION, ' ', RUBY_PLATFORM"], env=b.env)
    lock = os.path.join(b.release_dir, "Gemfile.lock")
    committed = os.path.exists(lock)
    key = fingerprint("ruby", read_text(os.path.join(b.release_dir, "Gemfile"), ""), read_text(lock, ""),
                      version, keyed_settings(b.settings, prefixes=("BUNDLE_",)))
    detail(f"Ruby {version}")
    tool_run(b, [bundle, "config", "set", "--local", "path", os.path.join(b.state, "ruby", key)], "bundle config")
    entry, ready = cache_entry(b, "ruby", key)
    if ready:
        step(f"Gems unchanged ({'Gemfile.lock' if committed else 'Gemfile'}): reusing an earlier install")
        if not committed and os.path.exists(os.path.join(entry, "Gemfile.lock")):
            shutil.copy(os.path.join(entry, "Gemfile.lock"), lock)
    else:
        step("Installing gems: bundle install" + ("" if committed else " (no Gemfile.lock)"))

        def install():
            out = tool_run(b, [bundle, "install"], "bundle install")
            if not committed and os.path.exists(lock):
                shutil.copy(lock, os.path.join(entry, "Gemfile.lock"))
            return out
        _, secs = fill_cache(entry, install)
        detail(f"Installed in {secs:.1f}s")
    cache_used(b, "ruby", key)


def go_env(state, settings):
    """Go's module and build caches per app (both content-addressed by Go itself)."""
    return {"GOPATH": settings.get("GOPATH") or os.path.join(state, "go"),
            "GOCACHE": settings.get("GOCACHE") or os.path.join(state, "go-build"),
            # modules readable and removable (destroy), not read-only as Go makes them
            "GOFLAGS": " ".join(f for f in (settings.get("GOFLAGS", ""), "-modcacherw") if f)}


def rust_env(state, settings):
    return {"CARGO_HOME": settings.get("CARGO_HOME") or os.path.join(state, "cargo")}


def build_go(b):
    """go.mod (or .go files): `go build -o bin/` in the release: a compile error rejects the push."""
    import time
    (go,) = need_tools(b, (("go", "golang-go"),))
    b.env.update(go_env(b.state, b.settings))
    argv = plan_go_build(set(os.listdir(b.release_dir)))
    if argv is None:
        detail("no go.mod and no .go files at the top of the repository: nothing to build")
        return
    step(f"Building: {' '.join(argv[:5])}{' ...' if len(argv) > 5 else ''}")
    t0 = time.time()
    _, secs = tool_run(b, [go] + argv[1:], "go build")
    bindir = os.path.join(b.release_dir, "bin")
    built = sorted(n for n in (os.listdir(bindir) if os.path.isdir(bindir) else [])
                   if os.path.getmtime(os.path.join(bindir, n)) >= t0 - 1)
    detail(f"Built {', '.join('bin/' + n for n in built) or 'no program (no main package)'} in {secs:.1f}s")


def build_with_tool(b, argv, tools, env=None):
    """A runtime built by one command in the release (Maven, Gradle, Clojure, Rust)."""
    need_tools(b, tools)
    b.env.update(env or {})
    step(f"Building: {' '.join(argv)}")
    _, secs = tool_run(b, argv, " ".join(argv))
    detail(f"Built in {secs:.1f}s")


def build_maven(b):
    build_with_tool(b, *TOOL_BUILDS["maven"])


def build_gradle(b):
    argv = plan_gradle_build(set(os.listdir(b.release_dir)))
    build_with_tool(b, argv, (JAVA,) + ((("gradle", "gradle"),) if argv[0] == "gradle" else ()))


def build_clojure_cli(b):
    build_with_tool(b, *TOOL_BUILDS["clojure-cli"])


def build_leiningen(b):
    build_with_tool(b, *TOOL_BUILDS["leiningen"])


def build_rust(b):
    build_with_tool(b, *TOOL_BUILDS["rust"], env=rust_env(b.state, b.settings))


def php_docroot(release_dir):
    """The document root the release's Procfile gives its `php:` line ('.': the app itself)."""
    workers, _ = parse_procfile(read_text(os.path.join(release_dir, "Procfile"), ""))
    return parse_php_docroot(workers.get("php", "."))


def build_php(b):
    """A `php:` line: checks uWSGI's php plugin and the document root; nothing is installed."""
    need_tools(b, (("uwsgi", "uwsgi-core"),))
    if not any(os.path.exists(os.path.join(d, "php_plugin.so")) for d in uwsgi_plugin_dirs(b.env)):
        raise PikuError("the Procfile's php: line needs uWSGI's php plugin: as root, apt-get install uwsgi-plugin-php")
    docroot = php_docroot(b.release_dir)
    if not os.path.isdir(os.path.join(b.release_dir, docroot)):
        raise PikuError(f"php: {docroot} is not a directory of the app")
    detail(f"uWSGI's php plugin serves {docroot if docroot != '.' else 'the app'}/ as the web process")
    if os.path.exists(os.path.join(b.release_dir, "composer.json")):
        detail("composer.json: composer is not run; commit vendor/, or run it in a release: command")


def runtime_env(paths, app, release_dir, runtime, settings, env):
    """What a runtime adds to the environment of the app's processes (and of its release and
    preflight commands): the release's tool directories first on PATH, and tool caches.
    Settings the app gives itself win, except PATH and GOFLAGS, which are extended."""
    parts, state, out, bins = runtime.split("+"), os.path.join(paths.state, app), {}, []
    if "node" in parts:
        node_dir = nodeenv_dir(state, settings)
        bins += [os.path.join(release_dir, "node_modules", ".bin")] + ([os.path.join(node_dir, "bin")] if node_dir else [])
        out["NODE_PATH"] = os.path.join(release_dir, "node_modules")
    if "go" in parts:
        out.update(go_env(state, settings))
        bins.append(os.path.join(release_dir, "bin"))
    if "rust" in parts:
        out.update(rust_env(state, settings))
    if "php" in parts:
        out["PIKU_PHP_DOCROOT"] = os.path.normpath(os.path.join(release_dir, php_docroot(release_dir)))
    out = {k: v for k, v in out.items() if k.startswith("PIKU_") or k == "GOFLAGS" or k not in settings}
    if bins:
        out["PATH"] = ":".join(bins + [env["PATH"]])
    return out


def build_generic(b):
    detail("nothing to build: the Procfile's commands run as they are")


def build_static(b):
    detail("static files are served by nginx")


# The order is the original piku's: the first runtime whose detector matches builds the app
# (plus its COMPANIONS); a toolchain that is missing rejects the push.
RUNTIMES = (
    ("python-requirements", "Python (requirements.txt) app detected", detect_requirements, build_requirements),
    ("python-uv", "Python (uv) app detected", detect_pyproject, build_uv),
    ("ruby", "Ruby app detected", detect_ruby, build_ruby),
    ("node", "Node.js app detected", detect_node, build_node),
    ("maven", "Java (Maven) app detected", detect_maven, build_maven),
    ("gradle", "Java (Gradle) app detected", detect_gradle, build_gradle),
    ("go", "Go app detected", detect_go, build_go),
    ("clojure-cli", "Clojure (deps.edn) app detected", detect_clojure_cli, build_clojure_cli),
    ("leiningen", "Clojure (Leiningen) app detected", detect_leiningen, build_leiningen),
    ("php", "PHP app detected", detect_php, build_php),
    ("rust", "Rust app detected", detect_rust, build_rust),
    ("generic", "Generic app detected", detect_generic, build_generic),
    ("static", "Static app detected", detect_static, build_static),
)


def uwsgi_plugin_dirs(environ):
    return [d for d in (environ.get("PIKU_UWSGI_PLUGIN_DIR"), "/usr/lib/uwsgi/plugins",
                        "/usr/lib64/uwsgi", "/usr/local/lib/uwsgi/plugins") if d]


def uwsgi_python_plugin(environ=None):
    """(plugin name, 'X.Y') of the system uWSGI python3 plugin, or (None, None)."""
    for d in uwsgi_plugin_dirs(environ or os.environ):
        path = os.path.join(d, "python3_plugin.so")
        if os.path.exists(path):
            with open(path, "rb") as f:
                return "python3", parse_plugin_python(f.read())
    return None, None


LOOP_PLUGINS = {"UWSGI_GEVENT": (("gevent_python3", "uwsgi-plugin-gevent-python3"),),
                "UWSGI_ASYNCIO": (("asyncio_python3", "uwsgi-plugin-asyncio-python3"),
                                  ("greenlet_python3", "uwsgi-plugin-greenlet-python3"))}


def native_loop_plugins(settings, dirs):
    """The system uWSGI plugins UWSGI_GEVENT / UWSGI_ASYNCIO need; rejects the deploy with the
    package to install when one is missing (uWSGI would silently ignore the option)."""
    wanted = []
    if setting_count(settings, "UWSGI_GEVENT"):
        wanted += LOOP_PLUGINS["UWSGI_GEVENT"]
    elif int(setting(settings, "UWSGI_ASYNCIO") or 0) > 0:
        wanted += LOOP_PLUGINS["UWSGI_ASYNCIO"]
    for plugin, package in wanted:
        if not any(os.path.exists(os.path.join(d, f"{plugin}_plugin.so")) for d in dirs):
            raise PikuError(f"{'UWSGI_GEVENT' if plugin.startswith('gevent') else 'UWSGI_ASYNCIO'} needs "
                            f"uWSGI's {plugin} plugin: as root, `apt-get install {package}`")
    return [plugin for plugin, _ in wanted]


def install_pyuwsgi(b):
    """pyuwsgi (uWSGI built for the venv's own Python) in a virtualenv being built."""
    py = os.path.join(b.venv, "bin", "python")
    detail("installing pyuwsgi into the virtualenv")
    if b.uv:
        tool_run(b, [b.uv, "pip", "install", "--no-progress", "--python", py, "pyuwsgi"], "installing pyuwsgi")
    else:
        tool_run(b, [py, "-m", "pip", "install", "-q", "pyuwsgi"], "installing pyuwsgi")


# === 14. Orchestration: the recipes, releases, the target state, ports ===
# A deploy is a short recipe over the layers above: build a release (its code and its own
# virtualenv), work out the target state (a Target record), then `switch` to it in one
# transaction: the new release's serving workers start beside the live ones (their own sockets
# and ports), answer a real HTTP request, take the traffic, and only then do the old ones stop.
# Every operation that changes workers goes through `switch`; OPERATIONS says which steps each
# takes. A failure at any point restores every file the operation wrote.

Operation = namedtuple("Operation", "name build release_cmd new_code restart on_failure")
#   build:       check a revision out and build it (dependencies into a virtualenv of its own)
#   release_cmd: run the Procfile's `release:` command before any worker starts
#   new_code:    the target is another release than the live one (apps/<app> moves)
#   restart:     which running workers restart: "auto" (as PIKU_AUTO_RESTART says), "always",
#                "changed" (only the kinds whose counts change)
#   on_failure:  what the user gets back
OPERATIONS = {
    "deploy": Operation("deploy", True, True, True, "auto", "the push is rejected; the live release serves on"),
    "rollback": Operation("rollback", False, False, True, "always", "the live release serves on"),
    "reconfigure": Operation("reconfigure", False, False, False, "auto", "the previous settings are restored"),
    "restart": Operation("restart", False, False, False, "always", "the running workers serve on"),
    "scale": Operation("scale", False, False, False, "changed", "SCALING and the workers are as before"),
    "maintenance": Operation("maintenance", False, False, False, "changed", "nginx serves as before"),
}


def setup_nginx(paths):
    """setup's part for nginx: the default server (checked first), and what nginx needs to
    reach the app sockets. Returns notes for the admin."""
    notes = []
    try:
        check_nginx(paths, None, None)
        write_default_server(paths)
    except PikuError as e:
        notes.append(f"the default server was not written: {e}")
    features = nginx_features(paths)
    foreign = foreign_default_listens(paths, features)
    for path in sorted(set(foreign.values())):
        notes.append(f"nginx: {path} is the default server of {', '.join(sorted(k for k in foreign if foreign[k] == path))}"
                     ": names no app has get its answer there, not piku's 404 (disable that site to change it)")
    if features and not share_nginx_dir(paths):
        group = nginx_worker_group(paths, features) or "www-data"
        notes.append(f"nginx: as root, give nginx's workers (group {group}) the app sockets: `chgrp {group} "
                     f"{paths.nginx} && chmod 2755 {paths.nginx}` (see docs/INSTALL.md)")
    return notes


def deploy_hooks(recipe):
    """Around the deploy recipe: its notice to PIKU_DEPLOY_WEBHOOK whatever the outcome, and
    after a successful one the `postdeploy:` command and the server's post-deploy hook
    (with_deploy_hooks, under `deploy hooks and notifications` below)."""
    import functools

    @functools.wraps(recipe)
    def deploy_with_hooks(paths, app, rev, ref, environ):
        return with_deploy_hooks(recipe, paths, app, rev, ref, environ)
    return deploy_with_hooks


@deploy_hooks
def deploy(paths, app, rev, ref, environ):
    """A push (or `deploy`): build rev into a new release, run its release command, switch."""
    import time
    t0 = time.monotonic()
    recover(paths, app)
    release = build_release(paths, app, rev, ref, environ)
    try:
        target = plan_target(paths, app, release, environ, OPERATIONS["deploy"])
        run_server_hook(target, "pre-deploy")
        with MaintenanceDuringRelease(target):
            run_phase(target, "release")
        step("Releasing")
        waited = switch(target)
    except BaseException as e:
        release_failed(paths, app, release, e)
        raise
    return finish(target, t0, waited)


def rollback(paths, app, release_id, environ):
    """`rollback APP [ID]`: switch back to a kept release; no build, no release command."""
    import time
    t0 = time.monotonic()
    recover(paths, app)
    release = rollback_release(paths, app, release_id)
    warn(f"rolling back to {release.id}: code and dependencies only; the release command is not run, "
         "so database migrations are not undone")
    target = plan_target(paths, app, release, environ, OPERATIONS["rollback"])
    waited = switch(target)
    return finish(target, t0, waited)


def reconfigure(paths, app, environ, op="reconfigure", scaling=None):
    """config:set / config:unset (op reconfigure), restart, ps:scale: the live release with the
    current settings (and scaling), switched to like a deploy."""
    import time
    t0 = time.monotonic()
    recover(paths, app)
    release = live_record(paths, app)
    if release is None:
        if op == "reconfigure":
            detail("not deployed yet: the settings apply on the first push")
            return None
        raise PikuError(f"{app} has never been deployed: push to it first")
    target = plan_target(paths, app, release, environ, OPERATIONS[op], scaling)
    waited = switch(target)
    finish(target, t0, waited, deployed=False)
    return target


# -- releases: what a release is and where it is recorded -------------------------------------

Release = namedtuple("Release", "id dir rev ref created runtime python venv fingerprint inputs status "
                                "reason rollback_of code_kb venv_kb")
#   id, dir:      releases/<app>/<id>, the checked-out code (never changed after the build)
#   rev, ref:     the git revision and branch it was built from
#   runtime:      the RUNTIMES row that built it; python/venv/fingerprint: its virtualenv
#   inputs:       the dependency inputs (equal inputs reuse the virtualenv without a look around)
#   status:       building, built, live, previous, old, failed (reason says why), pruned
#   rollback_of:  the release that was live when a rollback made this one live again
#   code_kb, venv_kb: disk it costs (venv_kb 0 when it shares an earlier release's virtualenv)


def release_from(record):
    return Release(**{f: record.get(f) for f in Release._fields})


def manifest_path(paths, app):
    return os.path.join(paths.state, app, "releases.json")


def load_manifest(paths, app):
    """The app's release records, newest first ([] when none or unreadable)."""
    import json
    try:
        data = json.loads(read_text(manifest_path(paths, app)) or "[]")
        return [r for r in data if isinstance(r, dict) and r.get("id")] if isinstance(data, list) else []
    except ValueError:
        warn(f"{manifest_path(paths, app)} is not valid JSON: starting a new release history")
        return []


def save_manifest(paths, app, records, keep=50):
    import json
    ensure_dirs(os.path.join(paths.state, app))
    write_atomic(manifest_path(paths, app), json.dumps(records[:keep], indent=1, sort_keys=True) + "\n")


def update_release(paths, app, rid, **fields):
    records = load_manifest(paths, app)
    for r in records:
        if r["id"] == rid:
            r.update(fields)
    save_manifest(paths, app, records)


def live_state(paths, app):
    """{"release": id, "slot": "a"|"b"|None, "gen": its vassals' generation} of what serves now ({}
    before the first deploy)."""
    import json
    try:
        data = json.loads(read_text(os.path.join(paths.state, app, "live.json")) or "{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def live_record(paths, app):
    """The live release, or None. A release made by piku.py before releases had records (or by
    the original piku) is described from what is on disk, so config:set and restart work."""
    rid = live_state(paths, app).get("release")
    for r in load_manifest(paths, app):
        if r["id"] == rid:
            return release_from(r)
    d = live_release(paths, app)
    if not d:
        return None
    venv = os.path.join(paths.envs, app)
    return release_from({"id": os.path.basename(d), "dir": d, "status": "live", "runtime": "legacy",
                         "venv": venv if venv_python_version(venv) else None,
                         "python": venv_python_version(venv)})


def new_release(paths, app, rev, ref, environ):
    """Check rev out into releases/<app>/<id> and record it as `building`; a failed checkout
    (a full disk) leaves nothing behind."""
    import time
    rid = time.strftime("%Y%m%d-%H%M%S") + "-" + rev[:10]
    base = os.path.join(paths.releases, app)
    ensure_dirs(base, os.path.join(paths.state, app))
    target, i = os.path.join(base, rid), 1
    while os.path.exists(target):
        i += 1
        target = os.path.join(base, f"{rid}.{i}")
    rid = os.path.basename(target)
    records = load_manifest(paths, app)
    save_manifest(paths, app, [{"id": rid, "dir": target, "rev": rev, "ref": ref, "created": int(time.time()),
                                "status": "building"}] + records)
    env = dict(environ)  # keeps git's quarantine variables: the new objects live there
    env["GIT_DIR"], env["GIT_WORK_TREE"] = os.path.join(paths.repos, app), target
    env["GIT_INDEX_FILE"] = os.path.join(paths.state, app, f"index-{os.getpid()}")
    try:
        os.mkdir(target, 0o755)
        run(["git", "read-tree", rev], env=env, capture=True)
        run(["git", "checkout-index", "-a", "-f"], env=env, capture=True)
    except BaseException as e:
        remove_path(target)
        update_release(paths, app, rid, status="failed", reason=f"checkout: {str(e)[:200]}")
        raise checkout_failure(e, base)
    finally:
        remove_path(env["GIT_INDEX_FILE"])
    protect_repo_env(target)
    return rid, target


def checkout_failure(error, folder):
    """The one error line for a checkout that failed (git says it once per file it could not
    write): a full disk (or no inode left) says so, with the space left."""
    import errno
    if not isinstance(error, (OSError, PikuError)):
        return error  # an interrupt, a bug: as it is
    why = error.strerror if isinstance(error, OSError) else \
        next((l for l in str(error).splitlines() if l.strip()), "").split("): ", 1)[-1]
    try:
        st = os.statvfs(folder)
        free, full = st.f_bavail * st.f_frsize // 1024, st.f_bavail == 0 or (st.f_files and not st.f_favail)
    except OSError:
        free, full = None, False
    if full or getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
        return PikuError(f"could not check the revision out: no space left in {folder} "
                         f"({'?' if free is None else free} KiB free): free some disk space and push again")
    return PikuError(f"could not check the revision out: {why.strip()[:300]}")


def prune_staging_leftovers(paths, app):
    """Remove what failed pushes of an older piku.py left in releases/<app> (they counted as
    kept releases, and the next pushes tripped over them), unless a process works there."""
    base = os.path.join(paths.releases, app)
    if not os.path.isdir(base):
        return
    records, live = load_manifest(paths, app), live_release(paths, app)
    recorded = {os.path.basename(r.get("dir") or "") for r in records}
    live_name = os.path.basename(live) if live and os.path.dirname(live) == os.path.realpath(base) else None
    went_live = any(r.get("status") not in ("building", "failed") for r in records)
    doomed = [os.path.join(base, n) for n in plan_staging_leftovers(os.listdir(base), recorded, live_name, went_live)]
    busy = releases_in_use(doomed) if doomed else set()
    gone = [d for d in doomed if d not in busy and os.path.isdir(d) and not os.path.islink(d)]
    for d in gone:
        remove_path(d)
    if gone:
        detail(f"removed {len(gone)} director{'y' if len(gone) == 1 else 'ies'} a failed push left in {base}")


def build_release(paths, app, rev, ref, environ):
    """A new release of rev: code checked out, dependencies built; recorded as `built`."""
    rid, release_dir = new_release(paths, app, rev, ref, environ)
    try:
        check_repo_links(release_dir)
        workers, warnings = read_procfile(release_dir)
        for w in warnings:
            warn(w)
        settings = release_settings(paths, app, release_dir, environ)
        check_app_paths(release_dir, workers, settings)
        live = live_record(paths, app)
        b = Build(paths, app, release_dir, settings, workers, environ, live._asdict() if live else None)
        ensure_data_dirs(paths, app)  # the release command may write there
        runtime, label, builder = plan_runtime(set(os.listdir(release_dir)), workers, RUNTIMES)
        step(label)
        if "preflight" in workers:
            run_phase_in(paths, app, release_dir, workers, settings, b.venv, environ, "preflight")
        builder(b)
    except BaseException as e:
        release_failed(paths, app, release_from({"id": rid, "dir": release_dir}), e)
        raise
    record = {"runtime": runtime, "python": b.python, "venv": b.venv, "fingerprint": b.fingerprint,
              "inputs": b.inputs, "status": "built", "code_kb": disk_kb(release_dir)[0],
              "venv_kb": disk_kb(b.venv)[0] if b.venv and b.venv != (live.venv if live else None) else 0}
    update_release(paths, app, rid, **record)
    return release_from({**next(r for r in load_manifest(paths, app) if r["id"] == rid), **record})


def release_failed(paths, app, release, error):
    """A release that did not go live: its directory goes, its record says why."""
    if live_state(paths, app).get("release") != release.id and live_release(paths, app) != release.dir:
        remove_path(release.dir)
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        update_release(paths, app, release.id, status="failed", reason=reason)


def rollback_release(paths, app, release_id):
    """The release `rollback` switches to: the given one, else the one that served before the
    live one (`previous` in `releases`), else the newest one below the live one that went
    live; it must still have its code and its virtualenv."""
    live = live_state(paths, app).get("release")
    records = load_manifest(paths, app)
    ok = [r for r in records if r.get("status") in ("live", "previous", "old") and r["id"] != live]
    if release_id:
        found = [r for r in records if r["id"] == release_id]
        if not found:
            raise PikuError(f"no release {release_id} of {app} (see `releases {app}`)")
        if release_id == live:
            raise PikuError(f"{release_id} is the live release already")
        r = found[0]
    elif ok:
        live_at = next((i for i, r in enumerate(records) if r["id"] == live), -1)
        r = next((x for x in ok if x.get("status") == "previous" and os.path.isdir(x.get("dir") or "")), None) \
            or next((x for x in records[live_at + 1:] if x in ok), ok[0])
    else:
        raise PikuError(f"{app} has no earlier release to roll back to (see `releases {app}`)")
    if r.get("status") in ("failed", "building"):
        raise PikuError(f"release {r['id']} never went live ({r.get('reason') or r['status']}): cannot roll back to it")
    if not os.path.isdir(r.get("dir") or "") or r.get("status") == "pruned":
        raise PikuError(f"release {r['id']} was pruned (PIKU_RELEASES_KEPT): its code is gone; deploy its "
                        f"revision {str(r.get('rev'))[:10]} again instead")
    if r.get("venv") and not venv_complete(r["venv"]):
        raise PikuError(f"release {r['id']}'s virtualenv was pruned: deploy its revision "
                        f"{str(r.get('rev'))[:10]} again instead (nothing was changed)")
    return release_from(r)


def disk_kb(path):
    """(KiB of files only this tree holds, KiB it shares through hard links, e.g. with uv's cache)."""
    own = shared = 0
    seen = set()
    for d, dirs, files in os.walk(path or "/nonexistent"):
        for n in files:
            try:
                st = os.lstat(os.path.join(d, n))
            except OSError:
                continue
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            if st.st_nlink > 1:
                shared += st.st_blocks // 2
            else:
                own += st.st_blocks // 2
    return own, shared


# -- the target state of an operation ---------------------------------------------------------

Target = namedtuple("Target", "paths app op release workers settings scaling live slot restart ports env "
                              "wsgi_mode python_plugin extra_plugins names cert stamp front gen router",
                    defaults=(None, None))
#   release:   the Release the workers run; workers: its Procfile ({kind: command})
#   settings:  repo ENV < config:set values, validated; env: what every process gets
#   scaling:   {kind: count}; live: live_state() before the operation
#   slot:      where the serving kind's instances run after the switch ("a"/"b"; None when it has
#              none or is restarted in place); restart: the kinds whose workers (re)start
#   ports:     {"port": PORT, "web": {"a": [...], "b": [...]}} (web instances behind nginx)
#   names:     NGINX_SERVER_NAME split; cert: TLS files exist; stamp: a label that changes
#              every operation (a vassal whose text changes is restarted by the emperor)
#   front:     what the app's nginx server block depends on besides settings (nginx_inputs:
#              the installed nginx, the include file's directives, maintenance mode, ...)
#   gen:       the slot's generation, in its vassals' names (vassal_name): a name the emperor
#              has never seen starts at once (it throttles a name that stopped before it had
#              served a request: every web or pyuwsgi vassal, one second more each time)
#   router:    True when nginx reaches the web instances through their masters' routers
#              (web_routed): a switch then moves links, like wsgi's, and nginx is not reloaded


def release_settings(paths, app, release_dir, environ):
    base = env_file_base(paths, app, environ)
    return validate_settings(merge_settings(read_repo_env(paths, app, release_dir, base), load_config(paths, app), base))


def plan_target(paths, app, release, environ, op, scaling=None):
    """Work out everything the switch to `release` needs (certificates are made here)."""
    import time
    workers, _ = read_procfile(release.dir)
    settings = release_settings(paths, app, release.dir, environ)
    check_app_paths(release.dir, workers, settings)
    names = split_names(settings.get("NGINX_SERVER_NAME", ""))
    scaling = scaling or plan_scaling(workers, load_scaling(paths, app), bool(names))
    live = live_state(paths, app)
    restart = plan_restart(paths, app, op, settings, scaling, live)
    serving_kind = next((k for k in scaling if serving(k) and scaling[k]), None)
    pinned = bool(settings.get("PORT"))
    if serving_kind == "web" and scaling["web"] > 1 and not plan_blue_green("web", settings, pinned):
        raise PikuError(f"web={scaling['web']}: each web process needs a port of its own behind nginx, but "
                        + ("PORT gives them all the same one: `config:unset APP PORT`" if pinned else
                           "PIKU_PREBOOT=false restarts a single one in place: set it to true"))
    bg = serving_kind and plan_blue_green(serving_kind, settings, pinned)
    slot = (other_slot(live.get("slot")) if serving_kind in restart else live.get("slot") or "a") if bg else None
    ports = plan_ports(paths, app, settings, scaling, slot if bg and serving_kind == "web" else None)
    port = ports["web"][slot][0] if bg and serving_kind == "web" else ports["port"]
    base = env_file_base(paths, app, environ)
    files = set(os.listdir(release.dir))
    env = dict(settings) | computed_env(
        paths, app, settings, port, base["HOME"], base["USER"], base["PATH"], venv=release.venv,
        app_dir=release.dir, src_layout=bool(release.venv) and "src" in files
        and os.path.isdir(os.path.join(release.dir, "src")))
    env.update(runtime_env(paths, app, release.dir, release.runtime or "", settings, env))
    wsgi_mode = plugin = extra = None
    if "wsgi" in scaling:
        wsgi_mode, plugin, extra = choose_wsgi_mode(release, settings, environ)
    cert = ensure_certificate({"paths": paths, "app": app, "settings": settings}) if names else False
    stamp = f"{release.id} {op.name} {time.time():.3f}"
    gen = (fingerprint(stamp)[:6] if serving_kind in restart else live.get("gen")) if bg else None
    router = bool(names) and serving_kind == "web" and bool(bg) and setting_bool(settings, "PIKU_WEB_ROUTER") \
        and web_routed(paths, app, environ, restart, slot)
    t = Target(paths, app, op, release, workers, settings, scaling, live, slot, restart, ports, env,
               wsgi_mode, plugin, extra, names, cert, stamp, {}, gen, router)
    return t._replace(front=nginx_inputs(plan_dict(t))) if names else t


def web_routed(paths, app, environ, restart, slot):
    """Does nginx reach a blue/green web app behind it through routers? Each web master then
    also runs uWSGI's rawrouter on a unix socket in nginx/ that forwards to its instance's
    port, and nginx connects to links to the live slot's routers (live_socket_link): a switch
    moves the links, with no nginx reload (a reload parses every app's config and TLS keys:
    ~1 ms an app). Needs uWSGI's rawrouter plugin (package uwsgi-core); web instances that keep
    running (not restarted by this operation) are routed only if they were started so."""
    if not any(os.path.exists(os.path.join(d, "rawrouter_plugin.so")) for d in uwsgi_plugin_dirs(environ)):
        return False
    return "web" in restart or os.path.exists(router_socket(paths, app, 1, slot))


def plan_restart(paths, app, op, settings, scaling, live):
    """The kinds whose workers (re)start: every one, or (PIKU_AUTO_RESTART=false, ps:scale) only
    those that are not running yet or whose count changes."""
    enabled = {parse_vassal_name(app, n) for n in vassals_of(paths, app)} - {None}
    running = {kind for kind, _, _ in enabled}
    if op.restart == "always" or (op.restart == "auto" and setting_bool(settings, "PIKU_AUTO_RESTART")):
        return set(scaling)
    counts = {}
    for kind, n, slot in enabled:
        if slot in (None, live.get("slot")):
            counts[kind] = counts.get(kind, 0) + 1
    if op.restart == "changed":
        return {k for k in scaling if counts.get(k, 0) != scaling[k]} | (running - set(scaling))
    return {k for k in scaling if k not in running}


def choose_wsgi_mode(release, settings, environ):
    """(mode, python plugin name, extra plugins) for the release's wsgi workers."""
    if not release.python:
        raise PikuError("a wsgi worker needs a Python app (requirements.txt or pyproject.toml)")
    name, plugin_version = uwsgi_python_plugin(environ)
    mode, notice = plan_wsgi_mode(setting(settings, "PIKU_PYUWSGI"), release.python, plugin_version)
    if notice:
        step(notice[0].upper() + notice[1:])
    if mode == "pyuwsgi" and not os.path.exists(os.path.join(release.venv or "", "bin", "uwsgi")):
        raise PikuError(f"release {release.id}'s virtualenv has no pyuwsgi, which Python {release.python} "
                        "needs here (the system uWSGI changed?): `deploy APP` builds one that has it")
    extra = native_loop_plugins(settings, uwsgi_plugin_dirs(environ)) if mode == "native" else None
    return mode, name, extra


# -- ports: piku's own record, so no other app's files are ever parsed ------------------------

def read_ports(paths, app):
    """state/<app>/ports.json as parse_ports gives it: (ports, [problems])."""
    try:
        return parse_ports(read_text(os.path.join(paths.state, app, "ports.json")))
    except OSError as e:  # a directory, no permission...
        return {}, [f"cannot be read ({e.strerror})"]


def load_ports(paths, app):
    """state/<app>/ports.json: {"port": PORT, "web": {"a": [...], "b": [...]}} ({} if none; only
    its well-formed parts: the operation writes it anew)."""
    return read_ports(paths, app)[0]


def ports_of_app(paths, app):
    """Every port another app holds, and whether that answer came from its ports.json alone
    (well-formed), so that ports_of_other_apps may keep it. Reading another app's state never
    fails this operation: what cannot be read is skipped with a warning naming the app."""
    saved, problems = read_ports(paths, app)
    for problem in problems:
        warn(f"app {app}: its state/{app}/ports.json {problem}: "
             + ("that part is skipped" if saved else "its LIVE_ENV is read instead"))
    found = [saved.get("port")] + [p for ps in (saved.get("web") or {}).values() for p in ps]
    if not saved:  # an app deployed by an older piku.py: its LIVE_ENV and standby port
        try:
            found.append(load_live_env(paths, app).get("PORT"))
        except (PikuError, OSError) as e:
            warn(f"app {app}: {e}: its ports are not known (skipped)")
        found.append((read_text(os.path.join(paths.state, app, "standby_port"), "") or "").strip())
    return {int(p) for p in found if str(p).isascii() and str(p).isdigit()}, bool(saved) and not problems


def file_key(path):
    """What tells one version of a file from another without reading it: piku replaces its
    files (a new inode each time), so inode, size and mtime change with every write."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def ports_of_other_apps(paths, app):
    """{port: app} for every port another app holds. With many apps, reading every ports.json
    costs more than the rest of a switch's own work: state/_ports.json keeps what each one held,
    with the file_key it was read at, and only apps whose file changed since are read again."""
    import json
    index = os.path.join(paths.state, "_ports.json")  # (no app name starts with "_")
    try:
        cached = json.loads(read_text(index, "") or "{}").get("apps")
    except (ValueError, AttributeError, OSError):
        cached = None
    cached = cached if isinstance(cached, dict) else {}
    out, keep = {}, {}
    for other in known_apps(paths):
        record = os.path.join(paths.state, other, "ports.json")
        key = file_key(record)
        entry = cached.get(other)
        hit = isinstance(entry, list) and len(entry) == 2 and entry[0] == key and key is not None \
            and isinstance(entry[1], list) and all(type(p) is int for p in entry[1])
        if hit:
            keep[other] = entry
        if other == app:  # (its own entry stays as it was: the others read it again once it changed)
            continue
        if hit:
            ports = set(entry[1])
        else:
            try:
                ports, whole = ports_of_app(paths, other)
            except OSError as e:  # (a standby_port that is a directory...)
                warn(f"app {other}: its state cannot be read ({e}): its ports are not known (skipped)")
                continue
            if whole and file_key(record) == key:
                keep[other] = [key, sorted(ports)]  # (else not kept: read again next time)
        for port in ports:
            out.setdefault(port, other)
    if keep != cached:  # (an app read again, or one destroyed)
        try:
            write_atomic(index, json.dumps({"apps": keep}, sort_keys=True) + "\n", mode=0o600)
        except OSError:  # (a cache: the next operation reads the apps' files again)
            pass
    return out


def live_port(paths, app):
    """The PORT the app has ('' if none yet)."""
    port = load_ports(paths, app).get("port")
    if port:
        return str(port)
    try:
        return load_live_env(paths, app).get("PORT", "")
    except PikuError:
        return ""


def choose_port(paths, app, settings, taken):
    """PORT from settings, else the one the app had (a web app keeps its port), else a free one.
    A port another app has, or (when it is not the app's own already) one something else
    listens on, is refused: the health check would take that listener for the app."""
    bind = setting(settings, "BIND_ADDRESS")
    old = live_port(paths, app)
    if settings.get("PORT"):
        port = parse_int(settings["PORT"], "PORT", 1, 65535)
        if port in taken:
            raise PikuError(f"PORT {port} is already used by app {taken[port]}: choose another one, or unset "
                            "PORT and piku picks a free one")
        if str(port) != old and not port_free(bind, port):
            raise PikuError(f"PORT {port} cannot be used on {bind}: something else listens there"
                            + (" (or, below 1024, it needs root)" if port < 1024 else "")
                            + "; choose another one, or unset PORT and piku picks a free one")
        return port
    if old.isdigit() and int(old) not in taken and (int(old) >= 1024 or os.geteuid() == 0):
        return int(old)
    return pick_free_port(bind, taken)


def pick_free_port(bind, taken, also=()):
    port = free_port(bind)
    while port in taken or port in also:
        port = free_port(bind)
    return port


def plan_ports(paths, app, settings, scaling, web_slot):
    """The app's ports: PORT, and for web instances behind nginx one port per instance and slot
    (the slot that is about to start gets free ones where its saved ones are taken)."""
    bind = setting(settings, "BIND_ADDRESS")
    listens = any(serving(k) and n for k, n in scaling.items())
    taken = ports_of_other_apps(paths, app) if listens else {}
    saved = load_ports(paths, app)
    ports = {"port": choose_port(paths, app, settings, taken) if listens else saved.get("port"),
             "web": {s: list((saved.get("web") or {}).get(s) or []) for s in ("a", "b")}}
    if web_slot:
        count = scaling.get("web", 0)
        other = other_slot(web_slot)
        mine = set(ports["web"][other]) | {ports["port"]}
        fresh = []
        for i in range(count):
            old = ports["web"][web_slot][i] if i < len(ports["web"][web_slot]) else None
            ok = old and old not in taken and old not in mine and old not in fresh and port_free(bind, old)
            fresh.append(old if ok else pick_free_port(bind, taken, mine | set(fresh)))
        ports["web"][web_slot] = fresh
        # the other slot keeps (or is given) ports too: nginx lists them as backups from the first
        # deploy on, so an nginx worker still on this config never finds nothing to send to
        while len(ports["web"][other]) < count:
            ports["web"][other].append(pick_free_port(bind, taken, set(fresh) | set(ports["web"][other])))
    return ports


def read_procfile(release_dir):
    text = read_text(os.path.join(release_dir, "Procfile"))
    if text is None:
        raise PikuError("no Procfile in the pushed revision: add one, e.g. `wsgi: app:application` "
                        "or `web: gunicorn -b $BIND_ADDRESS:$PORT app:app`, commit and push again")
    return map_legacy_kinds(*parse_procfile(text))


def env_file_base(paths, app, environ):
    """What `$VAR` in a repo ENV file may refer to besides earlier keys, as in the original
    piku: APP, DATA_ROOT, LOG_ROOT, HOME, USER, VIRTUAL_ENV and the server's PATH (so
    `PATH=$PATH:/opt/bin` and `DB=$DATA_ROOT/db.sqlite` work)."""
    home, path = os.path.expanduser("~"), clean_env(environ).get("PATH", os.defpath)
    env = computed_env(paths, app, {}, 0, home, environ.get("USER") or os.path.basename(home), path)
    return {k: env[k] for k in ("APP", "DATA_ROOT", "LOG_ROOT", "HOME", "USER", "VIRTUAL_ENV")} | {"PATH": path}


def read_repo_env(paths, app, release_dir, base):
    env = parse_env(read_text(os.path.join(release_dir, "ENV"), "") if release_dir else "", base,
                    source="ENV (in the repo)")
    check_env_limits(env, "ENV (in the repo)")
    return env


def ensure_data_dirs(paths, app):
    private_dirs(os.path.join(paths.data, app), os.path.join(paths.logs, app))


def process_env(env, kind, index=1, environ=None):
    """The environment a worker or phase command sees: system basics + the app's env + PROC_TYPE."""
    out = {k: v for k, v in clean_env(environ if environ is not None else os.environ).items()
           if k in INHERITED_ENV}
    out.update(env)
    out["PROC_TYPE"] = kind
    out["PROC_INDEX"] = str(index)
    return out


def run_phase(t, kind):
    """The Procfile's release command, in the new release, before any worker starts."""
    if kind in t.workers:
        run_phase_in(t.paths, t.app, t.release.dir, t.workers, t.settings, None, None, kind, env=t.env)


def run_phase_in(paths, app, release_dir, workers, settings, venv, environ, kind, env=None):
    """Run a phase command (release, preflight); failure rejects the push."""
    import subprocess
    cmd = workers[kind]
    step(f"Running {kind}: {cmd}")
    if env is None:
        base = env_file_base(paths, app, environ)
        env = dict(settings) | computed_env(paths, app, settings, 0, base["HOME"], base["USER"], base["PATH"],
                                            venv=venv, app_dir=release_dir)
    try:
        proc = subprocess.run(supervised(["/bin/sh", "-c", cmd]), cwd=release_dir, stdin=subprocess.DEVNULL,
                              env=process_env(env, kind), preexec_fn=_die_with_parent)
    except OSError as e:
        raise PikuError(f"{kind} command could not start: {e.strerror}")
    if proc.returncode != 0:
        raise PikuError(f"{kind} command failed (exit {proc.returncode}); nothing was changed, "
                        "the previous release keeps serving")


# === 15. nginx: the app's files, the default server, maintenance ===

def render_app_nginx(t, upstream, token=None, app_dir=None):
    """nginx conf text for the target, or None when NGINX_SERVER_NAME is unset. Files of the
    app are referred to through apps/<app> (the live link) unless app_dir says otherwise."""
    if not t.names:
        return None
    s, p, app = t.settings, t.paths, t.app
    has_backend = bool(t.scaling.get("wsgi") or t.scaling.get("web"))
    return render_nginx({"app": app, "settings": s, "paths": p, "kinds": t.workers,
                         "sockets": [a for a, _ in upstream if a.startswith("unix:")] if t.scaling.get("wsgi") else [],
                         "upstream": upstream,
                         "port": t.env["PORT"], "app_dir": app_dir or os.path.join(p.apps, app),
                         "cert": t.cert, "has_backend": has_backend, "switch_token": token,
                         **(t.front or {})})


def piku_argv(paths):
    """How uWSGI calls back into this very file (exec-worker): through a small launcher script
    (ensure_launcher) that imports piku.py from its cached bytecode, where `python3 piku.py`
    would compile the whole file at every worker start (~60 ms)."""
    return [sys.executable, launcher_path(paths), "piku", os.path.abspath(__file__)]


def launcher_path(paths):
    return os.path.join(paths.uwsgi, "piku-launch.py")


def supervisor_path(paths):
    return os.path.join(paths.uwsgi, "piku-supervise.py")


def ensure_launcher(paths):
    write_atomic(launcher_path(paths), "# written by piku.py: runs piku.py's main() from its cached bytecode\n"
                 + LAUNCHER.replace(";", "\n") + "\n", only_if_changed=True)
    write_atomic(supervisor_path(paths), SUPERVISOR, only_if_changed=True)


def setup_tree(paths):
    """Create the PIKU_ROOT tree and the emperor ini (idempotent)."""
    ensure_dirs(*paths[1:])
    for d in (paths.root, paths.nginx, paths.apps, paths.releases, paths.acme, paths.cache, paths.state):
        # nginx (www-data) must reach sockets, static files and certificates. The setgid bit root
        # gives nginx/ (its sockets get nginx's group: docs/INSTALL.md, section 5) must stay, and
        # Linux clears it at any chmod by a user outside that group: chmod only what needs it
        mode = os.stat(d).st_mode & 0o7777
        if mode & ~0o2000 != 0o755:
            os.chmod(d, 0o755 | (mode & 0o2000))
    write_atomic(os.path.join(paths.uwsgi, "uwsgi.ini"), render_emperor_ini(paths), only_if_changed=True)
    write_atomic(os.path.join(paths.nginx, "_piku.conf"), render_nginx_map(), only_if_changed=True)
    ensure_launcher(paths)
    share_nginx_dir(paths)
    for name in os.listdir(paths.nginx):  # confs of piku.py 0.1 used a map name admins use too
        path = os.path.join(paths.nginx, name)
        text = read_text(path, "") if name.endswith(".conf") else ""
        if "upstream piku-" in text and "Connection $connection_upgrade;" in text:
            write_atomic(path, text.replace("Connection $connection_upgrade;", "Connection $piku_connection_upgrade;"))


def live_release(paths, app):
    """Directory of the live release (apps/<app>), or None."""
    path = os.path.join(paths.apps, app)
    return os.path.realpath(path) if os.path.isdir(path) else None


def adopt_legacy_checkout(paths, app):
    """apps/<app> as the original piku (or `downgrade`) leaves it, a git checkout, becomes a
    release like any other: releases/<app>/legacy-<date>, apps/<app> a link to it. The two
    swap places in one step, so nginx and the running workers never miss a file in it."""
    import time
    path = os.path.join(paths.apps, app)
    if os.path.islink(path) or not os.path.isdir(path):
        return None
    base = os.path.join(paths.releases, app)
    ensure_dirs(base)
    legacy, i = os.path.join(base, "legacy-" + time.strftime("%Y%m%d-%H%M%S")), 1
    while os.path.lexists(legacy):
        i += 1
        legacy = os.path.join(base, f"legacy-{time.strftime('%Y%m%d-%H%M%S')}.{i}")
    os.symlink(legacy, legacy)  # (names itself: once swapped, apps/<app> names the directory)
    try:
        exchange_paths(path, legacy)
    except OSError:  # no RENAME_EXCHANGE (an old kernel or another filesystem): a moment without it
        os.unlink(legacy)
        os.rename(path, legacy)
        os.symlink(legacy, path)
    detail(f"apps/{app} was a checkout of the original piku: kept as release {os.path.basename(legacy)}")
    return legacy


def exchange_paths(a, b):
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); OSError where it cannot."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(38, "renameat2 is not available")
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def read_quietly(path):
    """A file's text, or None when it is missing or unreadable (files piku does not own)."""
    try:
        return read_text(path)
    except OSError:
        return None


def nginx_features(paths):
    """What the installed nginx supports (parse_nginx_v), or None without nginx. `nginx -V` runs
    once per nginx binary: the answer is kept in state/_nginx.json until the binary changes."""
    import json
    binary = nginx_binary()
    if not binary:
        return None
    st = os.stat(binary)
    key = f"{binary}:{st.st_size}:{st.st_mtime_ns}"
    cache = os.path.join(paths.state, "_nginx.json")
    try:
        saved = json.loads(read_text(cache) or "{}")
    except ValueError:
        saved = {}
    if saved.get("key") == key:
        return saved.get("features")
    features = parse_nginx_v(run([binary, "-V"], capture="merged", check=False).stdout)
    ensure_dirs(paths.state)
    write_atomic(cache, json.dumps({"key": key, "features": features}, sort_keys=True) + "\n")
    return features


def nginx_main_confs(paths, features):
    """{path: text} of nginx's own config files (nginx.conf and what it includes), piku's
    folder excepted; unreadable ones count as empty."""
    import glob
    start = (features or {}).get("conf_path")
    own, seen, out, todo = os.path.realpath(paths.nginx), set(), {}, [start] if start else []
    while todo and len(out) < 500:
        path = todo.pop(0)
        real = os.path.realpath(path)
        if real in seen or os.path.dirname(real) == own:
            continue
        seen.add(real)
        out[path] = read_quietly(real) or ""
        for pattern in parse_nginx_conf_refs(out[path])[0]:
            todo += sorted(glob.glob(os.path.join(os.path.dirname(start), pattern)))
    return out


def foreign_default_listens(paths, features):
    """address:ports a server of the admin's own config is the default of (Debian's default
    site: 0.0.0.0:80 and [::]:80). nginx refuses two defaults for one address, so piku's default
    server leaves those out: {address:port: file}."""
    return {key: path for path, text in nginx_main_confs(paths, features).items()
            for key in parse_nginx_conf_refs(text)[1]}


def app_confs(paths):
    """{app: text} of the apps' nginx configs on disk (piku's own files start with `_`)."""
    names = os.listdir(paths.nginx) if os.path.isdir(paths.nginx) else []
    return {n[:-5]: read_text(os.path.join(paths.nginx, n), "") for n in sorted(names)
            if n.endswith(".conf") and not n.startswith("_")}


def default_server_text(paths, candidate=None):
    """nginx/_default.conf for the addresses the apps' configs listen on: those on disk, with
    a `candidate` {app: text, or None for none} about to be written in place of its own."""
    confs = {**app_confs(paths), **(candidate or {})}
    features = nginx_features(paths)
    listens = plan_default_listens([t for t in confs.values() if t], foreign_default_listens(paths, features))
    cert = None
    if any("ssl" in f for f in listens.values()) and not nginx_has(features, NGINX_REJECT_HANDSHAKE):
        cert = ensure_default_certificate(paths)
    return render_default_server(listens, features, cert)


def write_default_server(paths, candidate=None, tx=None):
    """(Re)write piku's http-level files in nginx/: _piku.conf and the default server (through
    an operation's Transaction, when given: a failure puts the previous ones back)."""
    for name, text in (("_piku.conf", render_nginx_map()), ("_default.conf", default_server_text(paths, candidate))):
        path = os.path.join(paths.nginx, name)
        if tx is not None:
            tx.write(path, text)
        else:
            write_atomic(path, text, only_if_changed=True)


def self_signed(names, days=3650):
    """(certificate, key) PEM texts of a new self-signed RSA certificate for names, or None
    without openssl."""
    import tempfile
    openssl = which("openssl")
    if not openssl:
        return None
    tmp = tempfile.mkdtemp(prefix="piku-cert-")
    try:
        san = ",".join(f"DNS:{n}" for n in names)
        run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days), "-subj",
             f"/CN={names[0]}", "-addext", f"subjectAltName={san}", "-keyout", f"{tmp}/k",
             "-out", f"{tmp}/c"], capture=True)
        return read_text(f"{tmp}/c"), read_text(f"{tmp}/k")
    finally:
        remove_path(tmp)


def ensure_default_certificate(paths):
    """For nginx older than 1.19.4 (no ssl_reject_handshake): the default server's own
    certificate, for the name `invalid`, which no app has. (crt, key) paths or None."""
    crt, key = os.path.join(paths.nginx, "_default.crt"), os.path.join(paths.nginx, "_default.key")
    if not (os.path.exists(crt) and os.path.exists(key)):
        pair = self_signed(["invalid"])
        if not pair:
            return None
        write_atomic(key, pair[1], mode=0o600)
        write_atomic(crt, pair[0])
    return crt, key


def nginx_worker_group(paths, features):
    """The group nginx's workers run as (the `user` directive of nginx.conf), or None."""
    conf = (features or {}).get("conf_path")
    return parse_nginx_user(read_quietly(conf)) if conf else None


def share_nginx_dir(paths):
    """Give nginx/ the group of nginx's workers and the setgid bit, so that the app sockets
    (0660) and password files (0640) made there are theirs to use and nobody else's. The piku
    user can do it when it is in that group (the original piku's `adduser --ingroup
    www-data`); else root does it once (docs/INSTALL.md). True when nginx/ is set up so."""
    import grp
    import stat
    st = os.stat(paths.nginx)
    if st.st_mode & stat.S_ISGID:
        return True
    try:
        gid = grp.getgrnam(nginx_worker_group(paths, nginx_features(paths)) or "").gr_gid
    except KeyError:
        return False
    if gid not in os.getgroups() and gid != os.getegid():
        return False
    os.chown(paths.nginx, -1, gid)
    os.chmod(paths.nginx, 0o2755)
    return bool(os.stat(paths.nginx).st_mode & stat.S_ISGID)


def htpasswd_text(plan):
    """The password file NGINX_BASIC_AUTH asks for (checked), or None. A file named there is
    read from the release being deployed, and must stay inside it."""
    value = plan["settings"].get("NGINX_BASIC_AUTH")
    if not value:
        return None
    parsed = parse_basic_auth_setting(value, "NGINX_BASIC_AUTH")
    if isinstance(parsed, str):
        return parsed
    base = os.path.realpath(plan["release_dir"])
    real = os.path.realpath(os.path.join(base, parsed[1]))
    if not real.startswith(base + os.sep) or not os.path.isfile(real):
        raise PikuError(f"NGINX_BASIC_AUTH: {parsed[1]} is not a file of the app's repository")
    return parse_htpasswd(read_quietly(real), f"NGINX_BASIC_AUTH ({parsed[1]})")


def nginx_inputs(plan):
    """What an app's server block depends on besides its settings: the installed nginx, the
    directives its include file sets, maintenance mode, its password file and log folder.
    Files come from the release being deployed, and are checked before anything is written."""
    p, app, s = plan["paths"], plan["app"], plan["settings"]
    include = s.get("NGINX_INCLUDE_FILE")
    text = read_quietly(os.path.join(plan["release_dir"], safe_path(include, "NGINX_INCLUDE_FILE"))) \
        if include else None
    return {"nginx": nginx_features(p), "include_directives": parse_nginx_directive_names(text),
            "maintenance": read_maintenance(p, app), "logs": os.path.join(p.logs, app),
            "htpasswd": os.path.join(p.nginx, f"{app}.htpasswd") if htpasswd_text(plan) else None}


def write_nginx_companions(plan, text, tx=None, default_server=True):
    """Before the app's nginx config `text` (None: none) is written: the files it refers to
    (password file, log files, capped at NGINX_LOG_MAXSIZE) and the default server for the
    addresses it listens on (through the operation's Transaction, when given; default_server
    False: the config is the one on disk already, so its addresses are too)."""
    import stat
    p, app, s = plan["paths"], plan["app"], plan["settings"]
    pw = os.path.join(p.nginx, f"{app}.htpasswd")
    content = htpasswd_text(plan) if text is not None else None
    if content:
        write_atomic(pw, content, mode=0o640, only_if_changed=True)
        if not os.stat(p.nginx).st_mode & stat.S_ISGID:
            warn(f"NGINX_BASIC_AUTH: {p.nginx} does not have nginx's group, so nginx may not read {app}'s "
                 "password file (answering 500): see docs/INSTALL.md, section 5")
    elif os.path.exists(pw):  # the live config may still name it until nginx reloads: emptied first
        live = pw in read_text(os.path.join(p.nginx, f"{app}.conf"), "")
        write_atomic(pw, "", mode=0o640) if live else os.unlink(pw)
    if text is not None:
        close_app_sockets(p, app)
        cap_nginx_logs(p, app, setting_int(s, "NGINX_LOG_MAXSIZE"))
        if setting_count(s, "NGINX_HSTS") and (read_cert_record(p, app) or {}).get("source") == "self-signed":
            warn("NGINX_HSTS is set but the certificate is self-signed: browsers that saw the header "
                 "refuse the site until a CA-signed certificate is served")
    if default_server:  # (it reads every app's config)
        write_default_server(p, {app: text}, tx)


def close_app_sockets(paths, app):
    """Sockets made by earlier piku versions (0666) outlive deploys (uWSGI keeps them across
    reloads): once nginx/ has nginx's group (setgid), give them that group and mode 0660."""
    import stat
    folder = os.stat(paths.nginx)
    if not folder.st_mode & stat.S_ISGID:
        return  # (nginx may reach them only through the world bits: setup tells the admin)
    mine = re.compile(re.escape(app) + r"\.\d+\.sock")
    for name in os.listdir(paths.nginx):
        path = os.path.join(paths.nginx, name)
        if name.startswith(app + ".") and mine.fullmatch(name) and os.lstat(path).st_mode & 0o007:
            try:
                os.chown(path, -1, folder.st_gid)
                os.chmod(path, 0o660)
            except OSError:
                continue


def cap_nginx_logs(paths, app, maxsize):
    """Make sure logs/<app>/nginx.*.log exist, owned by piku (nginx appends to them), and keep
    each under maxsize bytes (0: no cap): a bigger one is copied to .old and emptied (one that
    nginx's own log rotation gave to its workers' user is moved to .old instead: nginx opens a
    new one at its next reload or log reopen)."""
    import shutil
    d = os.path.join(paths.logs, app)
    ensure_dirs(d)
    for name in NGINX_LOG_FILES:
        path = os.path.join(d, name)
        st = os.stat(path) if os.path.exists(path) else None
        if st and maxsize and st.st_size > maxsize:
            if st.st_uid == os.geteuid():
                shutil.copyfile(path, path + ".old")
                os.truncate(path, 0)
            else:
                os.replace(path, path + ".old")
        if not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640))


def maintenance_file(paths, app):
    return os.path.join(paths.state, app, "maintenance.json")


def read_maintenance(paths, app):
    """The app's maintenance record ({page, since, by}), or None when it is not in maintenance."""
    import json
    try:
        record = json.loads(read_text(maintenance_file(paths, app)) or "null")
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def write_maintenance(paths, app, record):
    import json
    path = maintenance_file(paths, app)
    if record is None:
        remove_path(path)
    else:
        ensure_dirs(os.path.dirname(path))
        write_atomic(path, json.dumps(record, sort_keys=True) + "\n")


def plan_dict(t):
    """The parts of a Target that the nginx helpers read, as the dict they take."""
    return {"paths": t.paths, "app": t.app, "settings": t.settings, "release_dir": t.release.dir,
            "workers": t.workers, "scaling": t.scaling}


def refresh_app_nginx(t):
    """Render, check and write the app's nginx config alone (no worker is restarted)."""
    p, app = t.paths, t.app
    t = t._replace(front=nginx_inputs(plan_dict(t)))  # (maintenance mode may have changed since)
    upstream = upstream_of(t, t.slot)
    text = render_app_nginx(t, upstream)
    if text is None:
        raise PikuError(f"{app} has no NGINX_SERVER_NAME: maintenance mode is nginx's answer for the "
                        f"app's names (config:set {app} NGINX_SERVER_NAME=...)")
    text = render_app_nginx(t, upstream, content_name(text))
    check_nginx(p, app, render_app_nginx(t, upstream, "check", t.release.dir))
    tx = Transaction(p, app)
    point_live_links(t, tx, t.scaling.get("wsgi", 0))  # (an app that has not switched since an older piku)
    tx.commit()
    write_nginx_companions(plan_dict(t), text)
    write_atomic(os.path.join(p.nginx, f"{app}.conf"), text, only_if_changed=True)


def wait_for_maintenance(plan, on, timeout=10.0):
    """Wait until nginx serves the app's config with maintenance mode on (or off), so the
    command returns when it is in effect; warn if nginx never reloads."""
    served = served_names(plan["settings"])[0]
    if not served or not nginx_binary():
        return
    if not challenge_served(plan, probe_host(served[0]), timeout, settle=0.5,
                            want=lambda resp: (resp.getheader("X-Piku-Maintenance") == "on") == on):
        warn(f"nginx has not loaded {plan['app']}'s config after {timeout:.0f}s: is it reloaded when "
             f"{plan['paths'].nginx} changes? See docs/TROUBLESHOOTING.md")


def switch_maintenance(paths, app, record, environ):
    """Turn the app's maintenance mode on (`record`) or off (None) without a deploy: its nginx
    config is rewritten (checked first); on any failure the previous state stays."""
    release = live_release(paths, app)
    if not release:
        raise PikuError(f"{app} has not been deployed yet: push it first")
    page = (record or {}).get("page")
    if page:
        real = os.path.realpath(os.path.join(release, safe_path(page, "--page")))
        if page.startswith("/") or not real.startswith(os.path.realpath(release) + os.sep) \
                or not os.path.isfile(real):
            raise PikuError(f"--page: {page} is not a file of {app}'s repository (a path like "
                            "maintenance.html, relative to its top)")
    old = read_maintenance(paths, app)
    write_maintenance(paths, app, record)
    try:
        t = plan_target(paths, app, live_record(paths, app), environ, OPERATIONS["maintenance"])
        refresh_app_nginx(t)
    except BaseException:
        write_maintenance(paths, app, old)
        raise
    wait_for_maintenance(plan_dict(t), record is not None)


class MaintenanceDuringRelease:
    """Wrapped around a deploy's `release:` command: with PIKU_MAINTENANCE_DURING_RELEASE=true,
    the app's names get the maintenance page while it runs (unless maintenance mode is on
    already) and the config from before is back afterwards, whatever the outcome; the deploy
    then writes the new release's."""

    def __init__(self, t):
        self.t, self.conf, self.before = t, None, None

    def __enter__(self):
        t = self.t
        p, app, s = t.paths, t.app, t.settings
        record = read_maintenance(p, app)
        if "release" not in t.workers or not setting_bool(s, "PIKU_MAINTENANCE_DURING_RELEASE") or not t.names \
                or (record and record.get("by") != "release"):  # (one left by a deploy cut off is taken over)
            return self
        import time
        self.conf = os.path.join(p.nginx, f"{app}.conf")
        self.before = read_text(self.conf)
        write_maintenance(p, app, {"by": "release", "since": int(time.time()), "page": None})
        try:
            refresh_app_nginx(t)
        except BaseException:
            self.__exit__()
            raise
        detail("maintenance mode on while the release command runs")
        wait_for_maintenance(plan_dict(t), True)
        return self

    def __exit__(self, *exc):
        if self.conf is None:
            return False
        write_maintenance(self.t.paths, self.t.app, None)
        if self.before is None:
            remove_path(self.conf)
        else:
            write_atomic(self.conf, self.before)
        write_default_server(self.t.paths)
        self.conf = None
        return False


# === 16. Certificates, and checking nginx's config ===

def cert_paths(paths, app):
    return (os.path.join(paths.nginx, f"{app}.crt"), os.path.join(paths.nginx, f"{app}.key"),
            os.path.join(paths.state, app, "certificate.json"))


def read_cert_record(paths, app):
    import json
    try:
        return json.loads(read_text(cert_paths(paths, app)[2]) or "null")
    except ValueError:
        return None


def install_certificate(paths, app, crt_text, key_text, record):
    """Key first, then certificate, each replaced atomically; nginx-watch reloads nginx."""
    import json
    crt, key, rec = cert_paths(paths, app)
    ensure_dirs(os.path.dirname(rec))
    write_atomic(key, key_text, mode=0o600)
    write_atomic(crt, crt_text, mode=0o644)
    write_atomic(rec, json.dumps(record, sort_keys=True) + "\n", mode=0o600)


def cert_not_after(crt_text):
    proc = run([which("openssl") or "openssl", "x509", "-enddate", "-noout"], input=crt_text,
               capture=True, check=False)
    return parse_openssl_enddate(proc.stdout)


def ensure_certificate(plan):
    """True when nginx/<app>.crt and .key exist for the app's names; makes a self-signed pair
    when there is none (or piku's own one covers other names). A certificate piku did not make
    (no record) is the admin's: it is kept as it is."""
    p, app, s = plan["paths"], plan["app"], plan["settings"]
    crt, key, _ = cert_paths(p, app)
    names = split_names(s.get("NGINX_SERVER_NAME", ""))
    record = read_cert_record(p, app)
    if os.path.exists(crt) and os.path.exists(key) and (record is None or record.get("names") == names):
        return True
    if record is None and (os.path.exists(crt) or os.path.exists(key)):
        warn(f"{crt} or {key} is missing: the admin's certificate is incomplete, serving HTTP only")
        return False
    pair = self_signed(names) if names else None
    if not pair:
        return False
    install_certificate(p, app, pair[0], pair[1], {"names": names, "source": "self-signed"})
    detail(f"self-signed certificate made for {', '.join(names)}")
    plan["cert_made"] = True
    return True


def find_acme_client(settings):
    """(name, path) of the ACME client to use, or None. auto: acme.sh (as the original piku)
    when installed for this user, else Debian's dehydrated."""
    choice = setting(settings, "ACME_CLIENT")
    if choice == "none":
        return None
    home_acmesh = os.path.expanduser("~/.acme.sh/acme.sh")
    found = {"acme.sh": which("acme.sh") or (os.access(home_acmesh, os.X_OK) and home_acmesh) or None,
             "dehydrated": which("dehydrated") or (os.access("/usr/bin/dehydrated", os.X_OK)
                                                  and "/usr/bin/dehydrated") or None}
    if choice != "auto":
        if not found[choice]:
            warn(f"ACME_CLIENT={choice} but {choice} is not installed: keeping the current certificate")
            return None
        return choice, found[choice]
    for name in ("acme.sh", "dehydrated"):
        if found[name]:
            return name, found[name]
    return None


def challenge_served(plan, name, timeout=15.0, want=None, settle=0.0):
    """True once nginx serves acme/<app>/.well-known/acme-challenge/ for `name` (nginx reloads a
    moment after its config is written, and the CA must find the challenge there), with a
    response `want(response)` accepts, on every connection for `settle` seconds (right after a
    reload, a worker with the old config may still take a connection or two)."""
    import http.client
    import secrets
    import time
    p, app, s = plan["paths"], plan["app"], plan["settings"]
    d = os.path.join(p.acme, app, ".well-known", "acme-challenge")
    ensure_dirs(d)
    token = "piku-probe-" + secrets.token_hex(8)
    write_atomic(os.path.join(d, token), token)
    addr = connect_host(setting(s, "NGINX_IPV4_ADDRESS"))
    deadline, good_since = time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline:
            ok = False
            try:
                conn = http.client.HTTPConnection(addr, setting_int(s, "NGINX_HTTP_PORT"), timeout=2)
                conn.request("GET", f"/.well-known/acme-challenge/{token}", headers={"Host": name})
                resp = conn.getresponse()
                ok = resp.status == 200 and resp.read().decode("ascii", "replace").strip() == token \
                    and (want is None or want(resp))
            except OSError:
                pass
            good_since = (good_since or time.monotonic()) if ok else None
            if ok and time.monotonic() - good_since >= settle:
                return True
            time.sleep(0.02 if ok else 0.2)
        return False
    finally:
        remove_path(os.path.join(d, token))


def acme_env(settings):
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": os.path.expanduser("~"), "LC_ALL": "C"}
    if settings.get("ACME_CA_BUNDLE"):
        env["CURL_CA_BUNDLE"] = settings["ACME_CA_BUNDLE"]  # how the CA's own TLS is trusted
    return env


def client_failure(proc):
    lines = [l.strip() for l in proc.stdout.splitlines() if l.strip()]
    errors = [l for l in lines if "ERROR" in l or "rror" in l] or lines or ["no output"]
    return f"exit {proc.returncode}: {errors[-1][:300]}"


def issue_with_dehydrated(plan, binary, names, ca, force=False):
    p, app, s = plan["paths"], plan["app"], plan["settings"]
    base = os.path.join(p.state, "_acme", "dehydrated")  # accounts and keys: not web-served
    ensure_dirs(base)
    os.chmod(base, 0o700)
    conf = os.path.join(base, f"{app}.conf")
    write_atomic(conf, render_dehydrated_config(ca, base, os.path.join(p.acme, app, ".well-known",
                                                                      "acme-challenge"),
                                                s.get("ACME_EMAIL")), mode=0o600)
    argv = [binary, "--cron", "--accept-terms", "--config", conf, "--alias", app,
            "--out", os.path.join(base, "certs")] + (["--force"] if force else [])
    for n in names:
        argv += ["--domain", n]
    import shutil
    import tempfile
    tmp = tempfile.mkdtemp(prefix="tmp-", dir=base)  # dehydrated's temporary files (it leaves some)
    try:
        proc = run(argv, env=acme_env(s) | {"TMPDIR": tmp}, capture="merged", check=False, timeout=600)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise PikuError(client_failure(proc))
    out = os.path.join(base, "certs", app)
    return read_text(os.path.join(out, "fullchain.pem")), read_text(os.path.join(out, "privkey.pem"))


def issue_with_acmesh(plan, binary, names, ca, force=False):
    import tempfile
    p, app, s = plan["paths"], plan["app"], plan["settings"]
    env, common = acme_env(s), ["--server", ca]
    if s.get("ACME_CA_BUNDLE"):
        common += ["--ca-bundle", s["ACME_CA_BUNDLE"]]
    if s.get("ACME_EMAIL"):
        run([binary, "--register-account", "-m", s["ACME_EMAIL"]] + common, env=env, capture="merged",
            check=False, timeout=300)
    argv = [binary, "--issue", "-w", os.path.join(p.acme, app), "--keylength", "ec-256"] + common \
        + (["--force"] if force else [])
    for n in names:
        argv += ["-d", n]
    proc = run(argv, env=env, capture="merged", check=False, timeout=600)
    if proc.returncode not in (0, 2):  # 2: the certificate is not due for renewal yet
        raise PikuError(client_failure(proc))
    tmp = tempfile.mkdtemp(prefix="piku-acme-", dir=os.path.join(p.state, app))
    try:
        proc = run([binary, "--install-cert", "-d", names[0], "--ecc", "--key-file", f"{tmp}/key",
                    "--fullchain-file", f"{tmp}/crt"], env=env, capture="merged", check=False, timeout=120)
        if proc.returncode != 0:
            raise PikuError(client_failure(proc))
        return read_text(f"{tmp}/crt"), read_text(f"{tmp}/key")
    finally:
        remove_path(tmp)


ACME_ISSUERS = {"acme.sh": issue_with_acmesh, "dehydrated": issue_with_dehydrated}
ACME_RENEW_DAYS = 30


def acme_certificate(plan, force=False):
    """Get (or renew) a CA-signed certificate over HTTP-01 once the app's nginx config is live.
    Never fatal: on any failure the current (self-signed) certificate keeps serving."""
    import time
    p, app, s = plan["paths"], plan["app"], plan["settings"]
    names = split_names(s.get("NGINX_SERVER_NAME", ""))
    if not names:
        return None
    ca, public = parse_acme_ca(setting(s, "ACME_ROOT_CA"))
    record = read_cert_record(p, app)
    if record is None and os.path.exists(cert_paths(p, app)[0]):
        return None  # a certificate piku did not make is the admin's: never replaced
    record = record or {}
    if (not force and record.get("source") == "acme" and record.get("names") == names
            and record.get("ca") == ca
            and (record.get("not_after") or 0) - time.time() > ACME_RENEW_DAYS * 86400):
        return record  # valid for long enough: nothing to do (and no time spent)
    client = find_acme_client(s)
    if not client:
        return None
    if not acme_names(names, public):
        if plan.get("cert_made"):
            detail(f"no ACME certificate for {', '.join(names)} (wildcard, IP or private-use name): "
                   "self-signed")
        return None
    step(f"Requesting a certificate for {', '.join(names)} from {ca} ({client[0]})")
    if not challenge_served(plan, names[0]):
        warn(f"nginx does not serve {p.acme}/{app} for {names[0]} on port "
             f"{setting(s, 'NGINX_HTTP_PORT')} (is nginx running and reloaded by piku?): "
             "keeping the current certificate")
        return None
    try:
        crt_text, key_text = ACME_ISSUERS[client[0]](plan, client[1], names, ca, force)
    except Exception as e:  # PikuError, a timeout, an unreadable file: never fatal here
        warn(f"{client[0]} could not get a certificate ({e}): keeping the current certificate")
        return None
    if not crt_text or not key_text:
        warn(f"{client[0]} left no certificate files: keeping the current certificate")
        return None
    record = {"names": names, "source": "acme", "ca": ca, "client": client[0],
              "not_after": cert_not_after(crt_text)}
    install_certificate(p, app, crt_text, key_text, record)
    detail(f"certificate installed, valid until "
           f"{time.strftime('%Y-%m-%d', time.gmtime(record['not_after'] or 0))}")
    return record


CHECK_CERT_DIRECTIVES = {"ssl_certificate": 0, "ssl_certificate_key": 1}


def nginx_directive_args(text):
    """[(name, [(start, end) of each argument])] of every directive of an nginx config, at any
    depth, read as nginx reads it: any spacing and line breaks, comments, quoted arguments."""
    out, current = [], None
    for m in NGINX_TOKEN_RE.finditer(text or ""):
        tok = m.group(0)
        if tok[0].isspace() or tok[0] == "#":
            continue
        if tok in ("{", "}", ";"):
            current = None
        elif current is None:
            current = (tok, [])
            out.append(current)
        else:
            current[1].append((m.start(), m.end()))
    return out


def relisten_for_check(text, ports, scratch, stand_in=None):
    """An nginx config (piku's or any other tool's) as `nginx -t` can check it as the piku user:
    every listen address on a free loopback port (the same address on the same port, however it
    is written), log files in the scratch folder (nginx opens them, and after nginx's own log
    rotation an app's logs belong to its workers' user), and a certificate or key file replaced
    by what `stand_in(path, 0 for the certificate | 1 for the key)` returns instead of None."""
    edits = []
    for name, args in nginx_directive_args(text):
        if not args:
            continue
        start, end = args[0]
        value = text[start:end]
        value = value[1:-1] if value[:1] in "\"'" and len(value) > 1 else value
        if name == "listen":
            key = listen_key(value)
            if key not in ports:
                ports[key] = free_port("127.0.0.1")
            edits.append((start, end, f"127.0.0.1:{ports[key]}"))
        elif name in ("access_log", "error_log") and value not in ("off", "stderr") \
                and not value.startswith(("syslog:", "memory:")):
            edits.append((start, end, scratch))
        elif name in CHECK_CERT_DIRECTIVES and stand_in and "$" not in value:
            other = stand_in(value, CHECK_CERT_DIRECTIVES[name])
            if other:
                edits.append((start, end, other))
    for start, end, replacement in reversed(edits):
        text = text[:start] + replacement + text[end:]
    return text


def stand_in_certificate(paths, path, index):
    """For `nginx -t` as the piku user: the default server's own certificate (0) or key (1) in
    place of a file piku cannot read (another tool's, readable by root only), else None."""
    if os.access(path, os.R_OK):
        return None
    pair = ensure_default_certificate(paths)
    return pair[index] if pair else None


def nginx_binary():
    """nginx's path (it is in /usr/sbin, often not on the piku user's PATH), or None."""
    return which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def check_nginx(paths, app, text):
    """`nginx -t` on the full piku config with this app's candidate `text` in place of its
    current one (app None: the configs as they are), piku's own files as it will write them."""
    import shutil
    import tempfile
    others = {n: read_text(os.path.join(paths.nginx, n), "") for n in sorted(os.listdir(paths.nginx))
              if n.endswith(".conf") and n not in (f"{app}.conf", "_piku.conf", "_default.conf")}
    # nginx only warns about a name two server blocks claim, and gives it to the first one
    owners = server_name_owners({n[:-5]: t for n, t in others.items() if not n.startswith("_")})
    for name in server_name_owners({app: text or ""}):
        if name in owners:
            raise PikuError(f"NGINX_SERVER_NAME: {name} is already served by app {owners[name]}: "
                            f"remove it there first (config:set {owners[name]} NGINX_SERVER_NAME=...)")
    nginx = nginx_binary()
    if not nginx:
        warn("nginx is not installed: its config was written but not checked")
        return
    others.update({"_piku.conf": render_nginx_map(), "_default.conf": default_server_text(paths, {app: text})})
    tmp = tempfile.mkdtemp(prefix="piku-nginx-")
    try:
        # nginx -t binds the listen addresses: test on free loopback ports, one per address.
        ports = {}
        confs = list(others.items()) + ([("candidate.conf", text)] if text is not None else [])
        for name, body in confs:
            write_atomic(os.path.join(tmp, "check-" + name),
                         relisten_for_check(body, ports, f"{tmp}/logs.log", lambda f, i: stand_in_certificate(paths, f, i)))
        candidate = os.path.join(tmp, "check-candidate.conf")
        conf = os.path.join(tmp, "nginx.conf")
        write_atomic(conf, render_nginx_check_conf(tmp, [os.path.join(tmp, "check-" + n) for n, _ in confs]))
        proc = run([nginx, "-t", "-q", "-p", tmp, "-c", conf, "-e", os.path.join(tmp, "error.log")],
                   capture="merged", check=False)
        if proc.returncode != 0:
            msg = [l for l in proc.stdout.splitlines() if "emerg" in l or "error" in l] or [proc.stdout]
            raise PikuError("nginx rejected the new config, the old one stays live: "
                            + msg[0].replace(candidate, f"{app}.conf").replace(f"{tmp}/check-", "").strip())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# === 17. The transaction, and what a target state is on disk ===

# -- the transaction: every file an operation writes, restorable (also after a kill -9) --------

class Transaction:
    """Records what each path held before the operation changed it, in a journal on disk first,
    so `rollback` (or the next operation, after a kill) puts every file, link and vassal back."""

    def __init__(self, paths, app):
        self.paths, self.journal = paths, os.path.join(paths.state, app, "switch.journal")
        self.saved = {}

    def _save(self, path):
        import json
        if path in self.saved:
            return
        if os.path.islink(path):
            old = {"link": os.readlink(path)}
        elif os.path.isfile(path):
            old = {"text": read_text(path), "mode": os.stat(path).st_mode & 0o7777}
        else:
            old = None
        self.saved[path] = old
        with open(self.journal, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(json.dumps({"path": path, "old": old}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write(self, path, text, mode=0o644):
        """Write (atomically) unless the file holds exactly that already; True if written."""
        if read_text(path) == text and not os.path.islink(path):
            return False
        self._save(path)
        ensure_dirs(os.path.dirname(path))
        if path.startswith(self.paths.uwsgi_enabled + os.sep):
            write_vassal(path, text)
        else:
            write_atomic(path, text, mode=mode)
        return True

    def link(self, path, target):
        if os.path.islink(path) and os.readlink(path) == target:
            return
        self._save(path)
        replace_link(path, target)

    def remove(self, path):
        if os.path.lexists(path) and not os.path.isdir(path) or os.path.islink(path):
            self._save(path)
            os.unlink(path)

    def rollback(self):
        restore_journal(self.paths, list(self.saved.items()))
        remove_path(self.journal)
        self.saved = {}

    def commit(self):
        remove_path(self.journal)
        self.saved = {}


def replace_link(path, target):
    tmp = path + ".piku-new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def restore_journal(paths, entries):
    """Put back what each path held (the newest change is undone first)."""
    done = set()
    for path, old in reversed(entries):
        if path in done:
            continue
        done.add(path)
        if old is None:
            if os.path.lexists(path) and not os.path.isdir(path) or os.path.islink(path):
                os.unlink(path)
        elif "link" in old:
            replace_link(path, old["link"])
        elif path.startswith(paths.uwsgi_enabled + os.sep):
            write_vassal(path, old["text"])
        else:
            write_atomic(path, old["text"], mode=old.get("mode", 0o644))


def recover(paths, app):
    """Start of every operation (under the app lock): undo what an operation killed half-way
    left (its journal), stop the workers of a slot that never went live, and drop release
    directories and virtualenvs that a killed build left."""
    import json
    refuse_when_downgraded(paths)
    journal = os.path.join(paths.state, app, "switch.journal")
    text = read_text(journal)
    if text is not None:
        entries = []
        for line in text.splitlines():
            try:
                e = json.loads(line)
                entries.append((e["path"], e["old"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut off by the kill: that change was not made
        restore_journal(paths, entries)
        remove_path(journal)
        warn(f"an earlier operation on {app} was interrupted: undone (the live release serves on)")
    live_slot = live_state(paths, app).get("slot")
    orphans = [n for n in vassals_of(paths, app) if (parse_vassal_name(app, n) or (0, 0, None))[2]
               not in (None, live_slot)]
    for name in orphans:
        remove_path(os.path.join(paths.uwsgi_enabled, name))
        remove_path(os.path.join(paths.uwsgi_available, name))
    if orphans:
        nudge_emperor(paths)
        detail(f"stopped workers an interrupted operation had started: {', '.join(orphans)}")
    live = live_state(paths, app).get("release")
    for r in load_manifest(paths, app):  # nothing builds or switches now: we hold the lock
        if r.get("status") in ("building", "built") and r["id"] != live:
            if live_release(paths, app) != r.get("dir"):
                remove_path(r.get("dir") or "")
            update_release(paths, app, r["id"], status="failed", reason="interrupted")
    prune_staging_leftovers(paths, app)
    base = os.path.join(paths.venvs, app)
    for name in os.listdir(base) if os.path.isdir(base) else []:
        if not os.path.exists(os.path.join(base, name, VENV_MARK)) and name != "legacy":
            remove_path(os.path.join(base, name))
    adopt_legacy_checkout(paths, app)


def nudge_emperor(paths):
    """Ask the uWSGI emperor to scan its vassals now (its master FIFO command E), instead of at
    its next once-a-second scan. Harmless when the emperor has no FIFO (older emperor.ini)."""
    return fifo_send(os.path.join(paths.uwsgi, "emperor.fifo"), b"E")


# -- what a target state is on disk (pure) ----------------------------------------------------

def worker_file(t, *parts):
    return os.path.join(t.paths.state, t.app, *parts)


def slot_dir(t, slot):
    return worker_file(t, f"slot-{slot}")


def fifo_dir(t, slot):
    """Where a worker's master FIFO lives: its slot's directory, or run/ (both 0700)."""
    return slot_dir(t, slot) if slot else worker_file(t, "run")


def master_fifo_name(kind, n, gen=None):
    """A worker master's FIFO: <kind>.<n>.master.fifo; a `web` master in a slot has its
    generation in the name too, because the slot may start again while the last master there
    still stops (uWSGI waits a second after it has stopped a daemon; the port is free at once)."""
    return f"{kind}.{n}.{gen}.master.fifo" if kind == "web" and gen else f"{kind}.{n}.master.fifo"


def slot_ports_free(t, timeout=10.0):
    """Wait until nothing listens on the new slot's web ports any more (the commands the last
    masters of this slot ran exit at once when they are stopped). False at the timeout."""
    import time
    ports = t.ports.get("web", {}).get(t.slot, [])[:t.scaling.get("web", 0)]
    deadline = time.monotonic() + timeout
    while any(listen_sockets(port) for port in ports):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def content_name(text, suffix=""):
    return fingerprint(text)[:16] + suffix


def nginx_socket(t, n, slot):
    return os.path.join(t.paths.nginx, f"{t.app}.{n}.{slot}.sock" if slot else f"{t.app}.{n}.sock")


def router_socket(paths, app, n, slot):
    """The unix socket of web instance n's router in `slot` (web_routed); `slot` "live": the
    link nginx connects to. (`web<n>` never ends in digits alone: no wsgi socket has its name.)"""
    return os.path.join(paths.nginx, f"{app}.web{n}.{slot}.sock")


def live_socket_link(paths, app, n):
    """What nginx connects to for wsgi instance n: a symbolic link to the live slot's socket. A
    switch replaces the link (one rename), so the conf stays the same and nginx needs no reload:
    each new connection follows the link. (A name no older piku wrote: the sockets of their
    workers, which remove their socket path when they exit, are `<app>.<n>.sock`.)"""
    return os.path.join(paths.nginx, f"{app}.{n}.live.sock")


def upstream_of(t, slot, links=True):
    """The nginx upstream servers for the app's serving kind in `slot`. wsgi: the links to the live
    slot's sockets, with both slots' sockets as backups (a connection that reached the old slot
    as it stopped goes on to the live one); the same conf for either slot. web with routers
    (web_routed): the same, with the routers' sockets. web else: the slot's ports, the other
    slot's as backups (a request an old nginx worker still sends to a stopped slot goes on to
    the live one)."""
    kind = next((k for k in t.scaling if serving(k) and t.scaling[k]), None)
    if not kind:
        return []
    count = t.scaling[kind]
    if kind == "wsgi" and links:
        return [("unix:" + live_socket_link(t.paths, t.app, n), False) for n in range(1, count + 1)] + [
            ("unix:" + nginx_socket(t, n, s), True) for s in ("a", "b") for n in range(1, count + 1)]
    if kind == "web" and links and t.router:
        return [("unix:" + router_socket(t.paths, t.app, n, s), s != "live") for s in ("live", "a", "b")
                for n in range(1, count + 1)]
    if kind == "wsgi":  # (for the original piku, which keeps no links: `downgrade`)
        return [("unix:" + nginx_socket(t, n, s), s != slot) for s in (slot, other_slot(slot))
                for n in range(1, count + 1)]
    bind = connect_host(setting(t.settings, "BIND_ADDRESS"))
    if not slot:  # restarted in place, on PORT
        return [(host_port(bind, t.ports["port"]), False)]
    return [(host_port(bind, p), s != slot) for s in (slot, other_slot(slot))
            for p in t.ports["web"][s][:count]]


def render_release_files(t, links=True):
    """Every file the target state consists of: {path: (text, mode)}. Pure: the same target gives
    the same files (golden tests in tests/unit show them). links=False: nginx names the wsgi
    sockets themselves (upstream_of)."""
    p, app = t.paths, t.app
    files = {}
    env_text = render_env(t.env)
    env_file = worker_file(t, "env", content_name(env_text))
    files[env_file] = (env_text, 0o600)
    files[os.path.join(p.envs, app, "LIVE_ENV")] = (env_text, 0o600)
    files[os.path.join(p.envs, app, "SCALING")] = (render_scaling(t.scaling), 0o600)
    boot = None
    if t.wsgi_mode:
        boot_text = render_wsgi_boot(t.release.venv, t.release.dir, t.workers["wsgi"], {**t.env, "PROC_TYPE": "wsgi"},
                                     ".".join(t.release.python.split(".")[:2]))
        boot = worker_file(t, "boot", content_name(boot_text, ".py"))
        files[boot] = (boot_text, 0o600)
    for kind, count in t.scaling.items():
        for n in range(1, count + 1):
            files.update(worker_files(t, kind, n, env_file, boot))
    text = render_app_nginx(t, upstream_of(t, t.slot, links))
    if text is not None:
        text = render_app_nginx(t, upstream_of(t, t.slot, links), content_name(text))
        files[os.path.join(p.nginx, f"{app}.conf")] = (text, 0o644)
    return files


def worker_spec(t, kind, n, env_file, boot):
    """The render_vassal dict of one worker instance."""
    bg = t.slot if serving(kind) and t.slot else None
    nginx_on = bool(t.names)
    v = {"app": t.app, "kind": kind, "index": n, "paths": t.paths, "settings": t.settings,
         "port": None if nginx_on and kind == "wsgi" else t.ports["port"], "piku": piku_argv(t.paths),
         "python_plugin": t.python_plugin, "extra_plugins": t.extra_plugins, "release": t.stamp,
         "dir": t.release.dir, "env_file": env_file, "mode": t.wsgi_mode if kind == "wsgi" else "daemon",
         "master_fifo": os.path.join(fifo_dir(t, bg), master_fifo_name(kind, n, t.gen if bg else None))}
    if kind == "wsgi":
        v.update(boot=boot, socket=nginx_socket(t, n, bg) if nginx_on else None,
                 check_socket=None if nginx_on else os.path.join(slot_dir(t, bg), f"wsgi.{n}.sock"))
    if kind == "web" and bg:
        v["worker_port"] = t.ports["web"][bg][n - 1]
        if t.router:
            v["router"] = router_socket(t.paths, t.app, n, bg)
    if v["mode"] == "daemon" and not kind.startswith("cron"):
        env = t.env | {"PROC_TYPE": kind, "PROC_INDEX": str(n)} | \
            ({"PORT": str(v["worker_port"])} if v.get("worker_port") else {})
        v["launch_text"] = render_launch(t.release.dir, ["/bin/sh", "-c", t.workers[kind]], env)
        v["launch"] = worker_file(t, "launch", content_name(v["launch_text"]))
    if v["mode"] == "pyuwsgi":
        v.update(inner=os.path.join(slot_dir(t, bg), f"wsgi.{n}.ini"),
                 fifo=os.path.join(slot_dir(t, bg), f"wsgi.{n}.fifo"))
    return v


def worker_files(t, kind, n, env_file, boot):
    """The vassal (and, for pyuwsgi, the inner ini) of one worker instance."""
    v = worker_spec(t, kind, n, env_file, boot)
    out = {v["inner"]: (render_inner_ini(v), 0o600)} if v["mode"] == "pyuwsgi" else {}
    if v.get("launch"):
        out[v["launch"]] = (v["launch_text"], 0o600)
    name = vassal_name(t.app, kind, n, t.slot if serving(kind) and t.slot else None, t.gen)
    text = render_vassal(v)
    out[os.path.join(t.paths.uwsgi_enabled, name)] = (text, 0o644)
    out[os.path.join(t.paths.uwsgi_available, name)] = (text, 0o644)
    return out


def render_trial_ini(t, env_file, boot):
    """The ini of a trial run of the new release's wsgi worker, for an app without nginx: all
    its options but PORT (the live workers' port, which a broken release must never take), with
    a private socket the health check uses. Returns (ini text, uWSGI binary, socket)."""
    v = worker_spec(t, "wsgi", 1, env_file, boot)
    sock = os.path.join(slot_dir(t, t.slot), "wsgi.trial.sock")
    v.update(port=None, check_socket=sock, master_fifo=None, fifo=os.path.join(slot_dir(t, t.slot), "wsgi.trial.fifo"),
             log=os.path.join(slot_dir(t, t.slot), "wsgi.trial.log"))
    if v["mode"] == "pyuwsgi":  # (its output goes to the log of the command that runs it)
        return render_inner_ini(v), os.path.join(t.release.venv, "bin", "uwsgi"), sock, v["log"]
    return render_vassal(v), which("uwsgi") or "/usr/bin/uwsgi", sock, v["log"]


# === 18. The switch: new workers beside the live ones, then traffic moves ===

# -- the switch ---------------------------------------------------------------------------------

Check = namedtuple("Check", "name kind log offset target in_place")
#   target: ("uwsgi", socket path) | ("http", host, port); in_place: the worker was restarted on
#   the port the old one had (its log must say it started before the port counts)


def switch(t):
    """Move the app to the target state: (1) the new release's serving workers start beside the
    live ones and must answer; (2) nginx, apps/<app> and the other workers move to it; (3) the
    old serving workers stop, and envs/<app> names the new virtualenv. Returns the seconds spent
    waiting for workers."""
    import time
    files = render_release_files(t)
    conf = os.path.join(t.paths.nginx, f"{t.app}.conf")
    if conf in files and (t.settings.get("NGINX_INCLUDE_FILE") or not same_nginx_conf(read_text(conf), files[conf][0])):
        check_nginx(t.paths, t.app, render_app_nginx(t, upstream_of(t, t.slot), "check", t.release.dir))
    tx, waited = Transaction(t.paths, t.app), 0.0
    ensure_dirs(os.path.join(t.paths.state, t.app), os.path.join(t.paths.logs, t.app))
    ensure_launcher(t.paths)
    ensure_data_dirs(t.paths, t.app)
    try:
        port = shared_port(t)  # (what listens there now is the live masters': stop_old waits for it to go)
        held = {inode for inode, _ in listen_sockets(port)} if port else set()
        t0 = time.monotonic()
        new = start_beside(t, tx, files)
        failure = health_check(t, new)
        waited += time.monotonic() - t0
        if failure:
            raise PikuError(failure_message(t, failure, checks=new))
        if t.names and t.slot and "wsgi" in t.restart:
            check_nginx_reaches(t, [nginx_socket(t, n, t.slot) for n in range(1, t.scaling.get("wsgi", 0) + 1)])
        if t.router and "web" in t.restart:
            check_routers(t)
        restarted = commit_switch(t, tx, files)
        t0 = time.monotonic()
        failure = health_check(t, restarted)
        if failure:
            raise PikuError(failure_message(t, failure, checks=restarted))
        quiesce = wait_for_nginx(t, tx, (files.get(conf) or (None,))[0])
        later = stops_later(t, held, quiesce)
        if not later:
            stop_old(t, tx, held)  # (the old masters' graceful exit is workers' time too)
        waited += time.monotonic() - t0
        if t.release.venv:  # (only now: workers of an older piku.py still import from envs/<app>)
            link_live_venv(t, tx)
    except BaseException:
        tx.rollback()
        nudge_emperor(t.paths)
        raise
    tx.commit()
    if later:
        in_background_holding_lock(lambda: stop_old_web_later(t, later))
    return waited


def stops_later(t, held, quiesce):
    """The old serving workers that may stop after the operation has returned: `web` workers
    behind nginx, once the nginx workers that still had the old config have quiesced (about
    100 ms after a reload: nginx's master gives the new workers that long before it asks the
    old ones to finish), or once the requests in flight through their routers have ended.
    Traffic has moved by then (wait_for_nginx saw the new config answer, or moved the links);
    the app lock stays held until they are stopped, so the next operation finds them gone.
    Returns the (since, timeout) of the nginx quiesce, or None: stop them now."""
    import time
    gone = [n for n in vassals_of(t.paths, t.app) if old_serving(t, n)]
    if not gone or held or shared_port(t):
        return None
    if any((parse_vassal_name(t.app, n) or ("",))[0] != "web" for n in gone):
        return None
    if quiesce:
        return quiesce
    routers = old_routers(t, gone) if t.names else set()
    if routers:
        time.sleep(LINK_SETTLE_SECONDS)  # (a connection that followed the link just before it moved)
        if unix_connections(read_text("/proc/net/unix", ""), routers):
            return (time.time(), 0)  # requests in flight through the old routers (no nginx to wait for)
    return None


def stop_old_web_later(t, quiesce):
    """(In the background, the app lock held:) wait until nginx has quiesced, then stop the old
    web workers as stop_old does (which waits for their routers' requests)."""
    nginx_drained(*quiesce, quiesced=True)
    stop_old(t, None)


def in_background_holding_lock(work):
    """Run work() in a child of its own session, with no terminal, stdin, stdout or stderr (the
    ssh session and git must not wait for it); it inherits the app lock's file descriptor, so
    the lock stays held until work() is done. The caller goes on at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            work()
        except BaseException:  # (nobody reads what it would say; the next operation tidies up)
            pass
        finally:
            os._exit(0)


def same_nginx_conf(old, new):
    """Do two confs differ only in what a switch changes (upstream servers, probe token)? Then the
    new one needs no `nginx -t`: the old one passed it."""
    if old is None:
        return False
    strip = lambda text: re.sub(r"  server (unix:)?\S+( backup)? max_fails=0;\n|piku-switch/\w+", "", text)  # noqa: E731
    return strip(old) == strip(new)


def start_beside(t, tx, files):
    """Write the new slot's files and its serving workers' vassals: the emperor starts them
    beside the live ones. (A serving kind restarted in place is first tried on a private port,
    a canary.) Returns the checks that say when they answer."""
    kind = next((k for k in t.restart if serving(k) and t.scaling.get(k)), None)
    if not kind:
        return []
    if not t.slot:
        canary(t, kind)
        return []
    d = private_dir(slot_dir(t, t.slot))  # the private check sockets, FIFOs and pyuwsgi inis
    fifos = [os.path.join(d, n) for n in os.listdir(d) if n.endswith(".fifo")]
    web = [f for f in fifos if re.fullmatch(r"web\.\d+(\.[0-9a-f]{6})?\.master\.fifo", os.path.basename(f))]
    # (a web master of an earlier generation may still be stopping: only its ports count)
    left = wait_masters_gone([f for f in fifos if f not in web])
    for fifo in web:
        if not fifo_send(fifo, b"\n"):
            remove_path(fifo)  # (its master is gone)
    if left:
        warn(f"workers that last ran in slot {t.slot} are still shutting down: {', '.join(left)}")
    if kind == "web" and not slot_ports_free(t):
        warn(f"a port of slot {t.slot} is still in use by an earlier web command; the new one may not start")
    remove_path(os.path.join(d, "stopping"))  # (left when this slot last stopped)
    for path, (text, mode) in files.items():
        if path.startswith(tuple(x + os.sep for x in (worker_file(t, "env"), worker_file(t, "boot"),
                                                      worker_file(t, "launch"), d))):
            tx.write(path, text, mode)
    if kind == "wsgi" and not t.names:  # the new workers will share PORT with the live ones
        trial_run(t, files)
        if t.live.get("slot") and (read_text("/proc/sys/net/ipv4/tcp_migrate_req") or "1").strip() == "0":
            detail("net.ipv4.tcp_migrate_req is 0: a connection queued to the old workers as they stop "
                   "may be reset (see docs/INSTALL.md: one sysctl, as root)")
    checks = []
    for n in range(1, t.scaling[kind] + 1):
        check = log_check(t, kind, n, t.slot)
        if check.target[0] == "uwsgi":  # a socket a killed or lingering worker left: the check must reach the new one
            remove_path(check.target[1])
        if kind == "web" and t.router:  # (likewise for nginx: the link must reach the new router)
            remove_path(router_socket(t.paths, t.app, n, t.slot))
        checks.append(check)
        for folder in (t.paths.uwsgi_available, t.paths.uwsgi_enabled):
            path = os.path.join(folder, vassal_name(t.app, kind, n, t.slot, t.gen))
            tx.write(path, files[path][0])
    nudge_emperor(t.paths)
    step(f"Starting the new release beside the live one: {kind} x{t.scaling[kind]} (slot {t.slot})")
    return checks


def trial_run(t, files):
    """Start the new release's wsgi worker once outside the emperor, on a private socket only,
    and health-check it: a release that cannot answer never binds the PORT the live workers
    serve on (the kernel would hand it part of their requests)."""
    import subprocess
    env_file = next(p for p in files if p.startswith(worker_file(t, "env") + os.sep))
    boot = next((p for p in files if p.startswith(worker_file(t, "boot") + os.sep)), None)
    text, binary, sock, log = render_trial_ini(t, env_file, boot)
    ini = os.path.join(slot_dir(t, t.slot), "wsgi.trial.ini")
    write_atomic(ini, text, mode=0o600)
    for path in (sock, log):
        remove_path(path)
    check = Check("wsgi (trial)", "wsgi", log, 0, ("uwsgi", sock), False)
    env = {k: v for k, v in clean_env(os.environ).items() if not k.startswith("UWSGI_")}
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen([binary, "--ini", ini], cwd=t.release.dir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)
    except OSError as e:
        raise PikuError(f"cannot start {binary} for a trial of the new release: {e.strerror}")
    try:
        failure = health_check(t, [check])
    finally:
        stop_process_group(proc, grace=3)
    tail = [f"wsgi (trial): {l}" for l in (read_text(log, "") or "").splitlines()[-15:]]
    for path in (sock, ini, log, os.path.join(slot_dir(t, t.slot), "wsgi.trial.fifo")):
        remove_path(path)
    if failure:
        raise PikuError(failure_message(t, failure, tail))


def log_check(t, kind, n, slot):
    """A Check for one worker instance, reading its log from where it ends now."""
    log = os.path.join(t.paths.logs, t.app, f"{kind}.{n}.log")
    offset = os.path.getsize(log) if os.path.exists(log) else 0
    return Check(f"{kind}.{n}", kind, log, offset, check_target(t, kind, n, slot), slot is None)


ALIVE_SECONDS = 2.0  # a worker ps:scale starts must run this long without exiting


def check_target(t, kind, n, slot):
    import time
    if kind_of(kind).health == "alive":
        return ("alive", time.monotonic())
    if kind == "wsgi":
        return ("uwsgi", nginx_socket(t, n, slot) if t.names else os.path.join(slot_dir(t, slot), f"wsgi.{n}.sock"))
    port = t.ports["web"][slot][n - 1] if slot else t.ports["port"]
    return ("http", connect_host(setting(t.settings, "BIND_ADDRESS")), port)


def old_serving(t, name):
    """Is this vassal a serving worker the switch replaces (stopped once traffic has moved)?"""
    kind, n, slot = parse_vassal_name(t.app, name) or (None, 0, None)
    if not kind or not serving(kind):
        return False
    return kind not in t.scaling or (kind in t.restart and bool(t.slot) and slot != t.slot)


def commit_switch(t, tx, files):
    """Traffic moves to the target: every file but the nginx conf (wait_for_nginx writes it once
    this is done) and but the vassals of workers that do not restart. Workers that are not
    blue/green restart here. Returns checks for serving workers restarted in place."""
    p, app = t.paths, t.app
    checks, names = [], set()
    conf = os.path.join(p.nginx, f"{app}.conf")
    for path, (text, mode) in files.items():
        parsed = parse_vassal_name(app, os.path.basename(path)) \
            if os.path.dirname(path) in (p.uwsgi_enabled, p.uwsgi_available) else None
        if parsed:
            names.add(os.path.basename(path))
            kind, n, slot = parsed
            if kind not in t.restart:
                continue  # kept running as it is (PIKU_AUTO_RESTART=false, ps:scale of another kind)
            if os.path.dirname(path) == p.uwsgi_enabled and (serving(kind) and not slot or (
                    t.op.name == "scale" and kind_of(kind).health == "alive")):
                checks.append(log_check(t, kind, n, None))  # restarted in place: checked below
        if path != conf:
            tx.write(path, text, mode)
    if live_release(p, app) != t.release.dir:
        tx.link(os.path.join(p.apps, app), t.release.dir)
    private_dir(fifo_dir(t, None))
    write_state(t, tx)
    for name in vassals_of(p, app):  # kinds and instances the target does not have
        kind, n, _ = parse_vassal_name(app, name) or (None, 0, None)
        if name in names or old_serving(t, name) or (kind in t.scaling and kind not in t.restart):
            continue
        tx.remove(os.path.join(p.uwsgi_enabled, name))
        tx.remove(os.path.join(p.uwsgi_available, name))
    nudge_emperor(p)
    return checks


def write_state(t, tx):
    import json
    tx.write(worker_file(t, "live.json"), json.dumps({"release": t.release.id, "slot": t.slot, "gen": t.gen},
                                                     sort_keys=True) + "\n")
    tx.write(worker_file(t, "ports.json"), json.dumps(t.ports, sort_keys=True) + "\n")


def link_live_venv(t, tx):
    """envs/<app> stays the path of the live virtualenv: its entries (bin, lib, pyvenv.cfg...)
    are links through envs/<app>/.live, which points at the release's virtualenv. A real
    virtualenv an older piku built there is moved to venvs/<app>/legacy, once."""
    envdir = os.path.join(t.paths.envs, t.app)
    ensure_dirs(envdir)
    legacy = os.path.join(t.paths.venvs, t.app, "legacy")
    for name in os.listdir(envdir):
        path = os.path.join(envdir, name)
        if name in PIKU_FILES_IN_ENV_DIR or name.startswith(".") or os.path.islink(path):
            continue
        ensure_dirs(legacy)
        remove_path(os.path.join(legacy, name))
        os.rename(path, os.path.join(legacy, name))
    for name in os.listdir(t.release.venv):
        if name != VENV_MARK and name not in PIKU_FILES_IN_ENV_DIR:
            tx.link(os.path.join(envdir, name), os.path.join(".live", name))
    tx.link(os.path.join(envdir, ".live"), t.release.venv)


def stop_old(t, tx, held=frozenset()):
    """The replaced serving workers stop once traffic has moved, gracefully: requests in flight
    finish. Old wsgi workers share PORT with the new ones: wait until they have let go of it
    (`held`: the inodes of the sockets that listened on it before the new ones started), so
    that every request after the operation gets the new release."""
    import time
    gone = [n for n in vassals_of(t.paths, t.app) if old_serving(t, n)]
    if gone and t.names and t.scaling.get("wsgi"):
        # nginx's links point at the new sockets now, but a connection made just before may still
        # wait in an old socket's queue: let the old workers take all of it first (a graceful stop
        # lets them finish what they have taken; what still waits then is reset)
        time.sleep(LINK_SETTLE_SECONDS)
        kinds = [parse_vassal_name(t.app, n) for n in gone]
        old_sockets = {nginx_socket(t, k[1], k[2]) for k in kinds if k and k[0] == "wsgi"}
        deadline = time.monotonic() + QUEUE_DRAIN_SECONDS
        while unix_queued(read_text("/proc/net/unix", ""), old_sockets) and time.monotonic() < deadline:
            time.sleep(0.01)
    routers = old_routers(t, gone) if t.names else set()
    if routers:
        # nginx connects to the new routers (the links moved): the old ones stop once the requests
        # they forward have ended (their master's stop ends a router at once, mid-request)
        deadline = time.monotonic() + WORKER_STOP_MERCY_SECONDS
        while unix_connections(read_text("/proc/net/unix", ""), routers) and time.monotonic() < deadline:
            time.sleep(0.01)
    web_ports = [t.ports["web"][k[2]][k[1] - 1] for k in (parse_vassal_name(t.app, n) for n in gone)
                 if k and k[0] == "web" and k[2] and t.names and k[1] <= len(t.ports["web"].get(k[2], []))
                 and router_socket(t.paths, t.app, k[1], k[2]) not in routers]
    if web_ports:
        # nginx sends nothing new there (wait_for_nginx): what an old nginx worker connected just
        # before waits in the old port's queue; it is taken before the old command stops, or the
        # stop resets it (nginx never sends a POST that failed so to another server)
        deadline = time.monotonic() + QUEUE_DRAIN_SECONDS
        while any(sum(listen_queues(port)) for port in web_ports) and time.monotonic() < deadline:
            time.sleep(0.01)
    fifos = stop_gracefully(t.paths, gone, tx)
    port = shared_port(t)
    if gone and port and held:
        release_shared_port(t, port, held, fifos)
    elif wait_masters_gone(fifos):  # (traffic has moved: they only finish what they had)
        detail(f"old workers still finishing their requests after 10s: {', '.join(gone)} (they stop on their own)")


# === 19. Stopping old workers: shared ports, sockets, master FIFOs ===

SHARED_PORT_SETTLE_SECONDS = 0.5  # (an idle old master lets go of PORT in well under this)
SHARED_PORT_GRACE_SECONDS = 10.0  # (where its socket cannot be closed for it: how long it may keep PORT)


def release_shared_port(t, port, held, fifos):
    """The old wsgi masters on a shared PORT were told to stop gracefully: return once none of
    the sockets that listened there before the new masters started (`held`) listens any more,
    so that every connection after the operation reaches the new release. (A master leaves its
    FIFO before its last worker has closed the socket: the sockets are what counts.) An old
    worker still busy with a request keeps its socket, and the kernel would go on handing it a
    share of the new connections, which it no longer accepts: after a moment its socket is
    closed for it (the request finishes), or, where the kernel does not allow that, its
    processes are killed after SHARED_PORT_GRACE_SECONDS."""
    import time
    t0 = time.monotonic()
    left = held & {inode for inode, _ in listen_sockets(port)}
    tried = False
    while left:
        waited = time.monotonic() - t0
        if waited >= SHARED_PORT_GRACE_SECONDS:
            stop_stale_listeners(t, port, left)
            return
        if waited >= SHARED_PORT_SETTLE_SECONDS and not tried:
            tried = True
            if shut_listeners(t, left):
                detail(f"a request still runs on the old release: its socket on PORT {port} was closed so that it "
                       "gets no new connection, and it finishes in the background")
        fifos = [f for f in fifos if fifo_send(f, b"\n")]  # (a master acts on its stop at once, not at its next tick)
        time.sleep(0.01)
        left = held & {inode for inode, _ in listen_sockets(port)}


def shut_listeners(t, inodes):
    """Stop these listening sockets of this app's processes from taking connections, while the
    processes keep the connections they have: a copy of each socket is taken from its holder
    (pidfd_getfd, Linux 5.6+, allowed where the kernel lets this user trace its own processes)
    and shut down, which takes it out of the kernel's SO_REUSEPORT group (the connections
    waiting in its queue go to the other listeners when net.ipv4.tcp_migrate_req is 1).
    Returns the inodes it shut."""
    import ctypes
    import socket
    shut = set()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd_open = os.pidfd_open
    except (OSError, AttributeError):
        return shut
    for pid, (_, fds) in socket_holders(inodes, t.app).items():
        for inode, fd in fds.items():
            if inode in shut:
                continue
            try:
                pidfd = pidfd_open(pid)
            except OSError:
                break
            try:
                copy = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd (the same number on every architecture)
            finally:
                os.close(pidfd)
            if copy < 0:
                return shut  # (not allowed, or no such call: the caller falls back)
            with socket.socket(fileno=copy) as sock:
                try:
                    sock.shutdown(socket.SHUT_RD)
                    shut.add(inode)
                except OSError:
                    pass
    return shut


def stop_stale_listeners(t, port, inodes):
    """The last resort of a switch on a shared PORT: this app's processes that still hold a
    socket from before the switch after SHARED_PORT_GRACE_SECONDS (where shut_listeners could not
    close it for them) are killed, and the push says so."""
    import signal
    import time
    holders = {pid: title for pid, (title, _) in socket_holders(inodes, t.app).items()}
    for pid in holders:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 2  # (until the kernel has closed their sockets)
    while set(holders) & set(socket_holders(inodes)) and time.monotonic() < deadline:
        time.sleep(0.02)
    who = ", ".join(f"{title} (pid {pid})" for pid, title in sorted(holders.items())) or "no process of this app"
    warn(f"the old release still listened on PORT {port} {SHARED_PORT_GRACE_SECONDS:g} s after its graceful "
         f"stop: killed {who}")


def socket_holders(inodes, app=None):
    """{pid: (process title, {inode: fd})} of this user's processes (of this app's, by their
    titles, when given) that hold one of these sockets (by inode)."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    out = {}
    for pid, cmdline in own_processes():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        title = b" ".join(cmdline).decode("utf-8", "replace").strip()
        if app and not title.startswith(f"{app}:"):
            continue
        for fd in fds:
            try:
                inode = wanted.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:  # (the fd was closed, or the process is gone)
                continue
            if inode is not None:
                out.setdefault(pid, (title, {}))[1].setdefault(inode, int(fd))
    return out


def own_processes():
    """(pid, argv as bytes) of each process running as this user (its title, for a uWSGI)."""
    me = os.getuid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != me:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                yield int(pid), f.read().rstrip(b"\0").split(b"\0")
        except OSError:
            continue


def shared_port(t):
    """The PORT a wsgi app without nginx serves on, which its old and new masters share during a
    switch (SO_REUSEPORT), or None."""
    port = str(t.env.get("PORT", ""))
    return int(port) if not t.names and t.scaling.get("wsgi") and port.isdigit() else None


LINK_SETTLE_SECONDS = 0.01  # (a connect() that resolved the link just before it moved: then the queue check)
QUEUE_DRAIN_SECONDS = 3.0
NGINX_QUIESCE_SECONDS = 3.0


def old_routers(t, names):
    """The router sockets (web_routed) of these web vassals that have one."""
    out = set()
    for name in names:
        kind, n, slot = parse_vassal_name(t.app, name) or (None, 0, None)
        if kind == "web" and slot and "\nrawrouter = " in read_text(os.path.join(t.paths.uwsgi_enabled, name), ""):
            out.add(router_socket(t.paths, t.app, n, slot))
    return out


def unix_connection_inodes(proc_net_unix, sockets):
    """The inodes of the connections these listening unix sockets have, accepted or waiting,
    given the text of /proc/net/unix: each is listed with its listener's path, a waiting one
    with no inode ("0"); the listener itself is flagged as accepting (00010000)."""
    out, ends = [], tuple(" " + s for s in sockets)
    for line in proc_net_unix.splitlines()[1:]:
        if not line.endswith(ends):  # (most lines, cheaply: a host's other sockets)
            continue
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] in sockets and fields[3] != "00010000":
            out.append(fields[6])
    return out


def unix_connections(proc_net_unix, sockets):
    """How many connections, accepted or waiting, these listening unix sockets have."""
    return len(unix_connection_inodes(proc_net_unix, sockets))


def unix_queued(proc_net_unix, sockets):
    """How many connections wait, not yet accepted, on these listening unix sockets."""
    return unix_connection_inodes(proc_net_unix, sockets).count("0")


def listen_queues(port):
    """The accept queue length (connections made, not yet accepted) of each TCP socket listening
    on this port."""
    return [queue for _, queue in listen_sockets(port)]


def listen_sockets(port):
    """[(inode, accept queue length)] of each TCP socket listening on this port. Asked of the
    kernel through netlink (sock_diag), which lists listening sockets alone; /proc/net/tcp where
    that is not available: it lists every socket, and with the tens of thousands in TIME_WAIT of
    a busy server one read takes a tenth of a second."""
    found = diag_listen_sockets(port)
    if found is None:
        found = [x for table in ("/proc/net/tcp", "/proc/net/tcp6")
                 for x in parse_listen_sockets(read_text(table, "") or "", port)]
    return found

def diag_listen_sockets(port):
    """listen_sockets through NETLINK_SOCK_DIAG (inet_diag), or None when the kernel refuses."""
    import socket
    import struct
    out = []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
            nl.settimeout(2)
            for family in (socket.AF_INET, socket.AF_INET6):
                # inet_diag_req_v2: family, IPPROTO_TCP, no extensions, states = 1 << TCP_LISTEN
                req = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, 1 << 10) + bytes(48)
                # nlmsghdr: SOCK_DIAG_BY_FAMILY (20), NLM_F_REQUEST | NLM_F_DUMP
                nl.send(struct.pack("=IHHII", 16 + len(req), 20, 0x301, 1, 0) + req)
                done = False
                while not done:
                    data = nl.recv(65536)
                    offset = 0
                    while offset + 16 <= len(data):
                        length, kind = struct.unpack_from("=IH", data, offset)
                        if kind == 3:  # NLMSG_DONE
                            done = True
                            break
                        if kind == 2 or length < 16:  # NLMSG_ERROR
                            return None
                        msg = offset + 16  # inet_diag_msg: 4 bytes, sockid (sport first, big-endian), ...
                        sport = struct.unpack_from("!H", data, msg + 4)[0]
                        rqueue = struct.unpack_from("=I", data, msg + 56)[0]  # idiag_rqueue
                        inode = struct.unpack_from("=I", data, msg + 68)[0]  # idiag_inode
                        if sport == port:
                            out.append((inode, rqueue))
                        offset += (length + 3) & ~3
    except (OSError, struct.error):
        return None
    return out

def parse_listen_sockets(text, port):
    """parse one /proc/net/tcp table: (inode, rx_queue) of each socket in LISTEN (0A) on port."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[3] == "0A" and fields[1].rsplit(":", 1)[-1] == f"{port:04X}":
            out.append((int(fields[9]), int(fields[4].rsplit(":", 1)[-1], 16)))
    return out


def stop_gracefully(paths, names, tx=None):
    """Remove these vassals of one app so that their requests in flight finish: the uWSGI that
    holds the sockets first gets a graceful shutdown through its master FIFO (q), and only then
    does the emperor stop the vassal (its stop alone kills workers mid-request; a master shutting
    down gracefully ignores it). Returns the FIFOs of the masters that are on their way out."""
    fifos = []
    for name in names:
        text = read_text(os.path.join(paths.uwsgi_enabled, name), "")
        inner = re.search(r"--uwsgi (\S+)", text)
        if inner:  # a respawn of the inner uWSGI by its vassal must not start the old release again
            write_atomic(os.path.join(os.path.dirname(inner.group(1)), "stopping"), "")
        for fifo in listening_fifos(paths, text):
            if fifo_send(fifo, b"q"):
                fifos.append(fifo)
        for folder in (paths.uwsgi_enabled, paths.uwsgi_available):
            (tx.remove if tx else remove_path)(os.path.join(folder, name))
    if names:
        nudge_emperor(paths)
    return fifos


def fifo_send(fifo, data):
    """Write to a uWSGI master FIFO; False when no master reads it (gone, or never started)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader; ENOENT: none
        return False
    try:
        os.write(fd, data)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def private_dir(path):
    ensure_dirs(path)
    os.chmod(path, 0o700)
    return path


def listening_fifos(paths, vassal_text):
    """Master FIFOs of the uWSGI that holds a wsgi vassal's sockets: the vassal's own (native), or
    its inner uWSGI's (pyuwsgi). Vassals of older piku.py versions have none."""
    fifos = re.findall(r"^master-fifo = (\S+)$", vassal_text, re.M)
    inner = re.search(r"--uwsgi (\S+)", vassal_text)
    if inner:
        return re.findall(r"^master-fifo = (\S+)$", read_text(inner.group(1), ""), re.M)
    return fifos if "\nwsgi-file = " in vassal_text else []


def wait_masters_gone(fifos, timeout=10.0):
    """Wake each uWSGI master (a byte that is no command, on its FIFO) until it has exited: a
    master acts on a stop at its next once-a-second tick otherwise. A FIFO nobody reads any
    more means its master is gone. Returns the ones still there at the timeout."""
    import time
    deadline = time.monotonic() + timeout
    pending = list(fifos)
    while pending and time.monotonic() < deadline:
        pending = [f for f in pending if fifo_send(f, b"\n")]
        time.sleep(0.02)
    return pending


# === 20. Moving nginx's traffic ===

def wait_for_nginx(t, tx, text, timeout=10.0):
    """Move nginx's traffic to the target: point the wsgi links, write the app's nginx conf and,
    when it changed, wait until nginx serves it (it reloads a moment after nginx/ changes), so
    the push returns when the new release answers by name, and the old workers stop only then.
    A conf from before blue/green (no backup servers) also waits for the old nginx workers to
    finish. Returns (since, timeout) for nginx_drained(quiesced=True) when old web workers must
    wait for the nginx workers of the old config to quiesce before they stop, else None."""
    import time
    conf = os.path.join(t.paths.nginx, f"{t.app}.conf")
    old = read_text(conf)
    # (the default server follows the addresses the apps listen on: a switch moves no listen line,
    # and rendering it again reads every app's config)
    write_nginx_companions(plan_dict(t), text, tx, default_server=text != old and (
        old is None or text is None or parse_listens(text) != parse_listens(old)
        or not os.path.exists(os.path.join(t.paths.nginx, "_default.conf"))))
    if text is None:
        tx.remove(conf)
        point_live_links(t, tx, on=False)
        return
    point_live_links(t, tx)  # (wsgi traffic, and routed web traffic, moves here and only here)
    if not tx.write(conf, text) or not nginx_binary():
        return
    written = os.stat(conf).st_mtime
    t0 = time.monotonic()
    if not nginx_answers(t.settings, probe_host(t.names[0]), switch_probe_path(text), 204, timeout):
        warn(f"nginx has not loaded {t.app}'s config after {timeout:.0f}s: is nginx running, and is it "
             f"reloaded when {t.paths.nginx} changes (piku-nginx.path, or `piku.py nginx-watch`)? "
             "See docs/TROUBLESHOOTING.md")
        return
    if old and " backup " not in old and (t.live or replaces_unslotted(t)):
        nginx_drained(written, timeout - (time.monotonic() - t0))
    elif any(old_serving(t, n) and n.startswith(f"{t.app}_web.") for n in vassals_of(t.paths, t.app)):
        # the old web workers stop only once no nginx worker with the old conf takes new requests
        # (nginx's master lets those run on for 100 ms beside the new ones): what they still send
        # to the old port would be reset when it stops. The caller waits for that (nginx_drained).
        return written, min(NGINX_QUIESCE_SECONDS, timeout - (time.monotonic() - t0))


def point_live_links(t, tx, on=True):
    """Point the links nginx connects to (live_socket_link, router_socket) at the sockets of the
    wsgi instances, or of the routed web instances, in the target's slot; remove the others."""
    wsgi = t.scaling.get("wsgi", 0) if on else 0
    web = t.scaling.get("web", 0) if on and t.router else 0
    link = re.compile(re.escape(t.app) + r"\.(web)?(\d+)\.live\.sock")
    for name in os.listdir(t.paths.nginx):  # (with many apps: hundreds of names, most of others)
        m = link.fullmatch(name) if name.startswith(t.app + ".") else None
        if m and int(m.group(2)) > (web if m.group(1) else wsgi):
            tx.remove(os.path.join(t.paths.nginx, name))
    for n in range(1, wsgi + 1):
        tx.link(live_socket_link(t.paths, t.app, n), os.path.basename(nginx_socket(t, n, t.slot)))
    for n in range(1, web + 1):
        tx.link(router_socket(t.paths, t.app, n, "live"), os.path.basename(router_socket(t.paths, t.app, n, t.slot)))


def replaces_unslotted(t):
    """Does the switch replace serving workers that have no slot (the original piku's, or an
    older piku.py's)? nginx's previous config has no backup for them: old nginx workers may
    still have requests in flight to them, so those must finish before they stop."""
    kinds = [parse_vassal_name(t.app, n) for n in vassals_of(t.paths, t.app)]
    return any(k and k[2] is None and serving(k[0]) for k in kinds)


def nginx_answers(settings, host, path, status, timeout, refused=False):
    """Poll nginx (NGINX_HTTP_PORT) for `path` with Host `host` until it answers `status` (or,
    with `refused`, until nothing listens there)."""
    import http.client
    import time
    addr, port = connect_host(setting(settings, "NGINX_IPV4_ADDRESS")), setting_int(settings, "NGINX_HTTP_PORT")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(addr, port, timeout=2)
            conn.request("GET", path, headers={"Host": host})
            if conn.getresponse().status == status:
                return True
        except ConnectionRefusedError:
            if refused:
                return True
        except OSError:
            pass
        time.sleep(0.005)  # (nginx answers the new config a moment after its reload)
    return False


def nginx_drained(since, timeout, quiesced=False):
    """Wait (at most timeout) until every worker of the nginx that reloaded is of its newest
    generation, started after `since` (epoch seconds: when the new config was written), i.e.
    none still serves an older config. That nginx is the parent of the workers started since
    (other nginx instances on the machine do not count; when none is found, every nginx worker
    counts). A generation started a moment before the newest one may still hold an older
    config: a reload that read it just before `since` (its workers quit at once, but not
    before they have seen the master's signal). quiesced: an older worker that is shutting down
    counts as gone (it takes no new connection; it finishes what it has, however long)."""
    import time
    deadline = time.monotonic() + max(0.0, timeout)
    while time.monotonic() < deadline:
        workers, newest = nginx_workers(), {}
        for _, ppid, started, _ in workers:
            newest[ppid] = max(newest.get(ppid, 0.0), started)
        fresh = {ppid for ppid, started in newest.items() if started >= since - 0.01}

        def stale(ppid, started, title):
            if fresh and ppid not in fresh:
                return False  # (another nginx)
            if b"shutting down" in title:
                return not quiesced
            return started < since - 0.01 or started < newest[ppid] - 0.1
        if not any(stale(ppid, started, title) for _, ppid, started, title in workers):
            return
        time.sleep(0.01 if quiesced else 0.05)


def nginx_worker_credentials():
    """[(uid, primary gid, {every gid})] of the nginx worker processes running on this machine."""
    out = []
    for pid, _, _, _ in nginx_workers():
        try:
            status = read_text(f"/proc/{pid}/status", "").splitlines()
            fields = dict(line.split(":", 1) for line in status if ":" in line)
            uid, gid = int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1])  # (effective ids)
            out.append((uid, gid, {int(g) for g in fields["Groups"].split()} | {gid}))
        except (KeyError, ValueError, IndexError):
            continue
    return out


def socket_reachable_by(st, uid, gids):
    """May a process with these credentials connect to a unix socket of this stat (it needs
    write permission)?"""
    if uid == 0:
        return True
    if uid == st.st_uid:
        return bool(st.st_mode & 0o200)
    if st.st_gid in gids:
        return bool(st.st_mode & 0o020)
    return bool(st.st_mode & 0o002)


def check_routers(t):
    """The new web instances answered on their ports: their routers must be there too, and
    reachable by nginx, before nginx is pointed at them."""
    sockets = [router_socket(t.paths, t.app, n, t.slot) for n in range(1, t.scaling["web"] + 1)]
    missing = [s for s in sockets if not os.path.exists(s)]
    if missing:
        raise PikuError(f"the new web workers answer, but their router socket {os.path.basename(missing[0])} is "
                        f"missing: see {os.path.join(t.paths.logs, t.app, 'web.1.log')}")
    check_nginx_reaches(t, sockets, lambda n: router_socket(t.paths, t.app, n, "live"))


def check_nginx_reaches(t, sockets, live_link=None):
    """Before nginx is pointed at the new wsgi sockets: refuse when no nginx worker on this
    machine may connect to them, which would answer every request with 502 (nginx/ lost the
    group and setgid bit of docs/INSTALL.md, e.g. under an earlier piku.py that cleared it at
    every push). Nothing is refused where no nginx worker runs (nginx stopped, or elsewhere)."""
    import grp
    import pwd
    workers = None
    for n, sock in enumerate(sockets, 1):
        try:
            st = os.stat(sock)
        except OSError:
            continue  # (it answered the health check a moment ago: not ours to judge here)
        try:
            live = os.stat(live_link(n) if live_link else live_socket_link(t.paths, t.app, n))  # (what nginx uses now)
            if (live.st_gid, live.st_mode & 0o777) == (st.st_gid, st.st_mode & 0o777):
                continue  # the same group and mode as the one nginx reaches (no need to look at /proc)
        except OSError:
            pass
        workers = nginx_worker_credentials() if workers is None else workers
        if not workers or any(socket_reachable_by(st, uid, gids) for uid, _, gids in workers):
            continue
        # name the nginx meant to serve piku's apps: the one whose group nginx/ has, else the one
        # nginx.conf's `user` names, else any (a machine may run several nginx)
        folder_gid = os.stat(t.paths.nginx).st_gid
        try:
            conf_gid = grp.getgrnam(nginx_worker_group(t.paths, nginx_features(t.paths)) or "").gr_gid
        except KeyError:
            conf_gid = None
        uid, gid, _ = next((w for w in workers if w[1] == folder_gid), None) or \
            next((w for w in workers if w[1] == conf_gid), workers[0])
        names = []
        for lookup, key, attr in ((pwd.getpwuid, uid, "pw_name"), (grp.getgrgid, gid, "gr_name"),
                                  (grp.getgrgid, st.st_gid, "gr_name")):
            try:
                names.append(getattr(lookup(key), attr))
            except KeyError:
                names.append(str(key))
        user, group, sock_group = names
        raise PikuError(f"nginx (its workers run as {user}) could not connect to {os.path.basename(sock)} "
                        f"(mode {st.st_mode & 0o777:o}, group {sock_group}): {t.paths.nginx} must have nginx's "
                        f"group and the setgid bit. As root: `chgrp {group} {t.paths.nginx} && chmod 2755 "
                        f"{t.paths.nginx}`, then push again (docs/INSTALL.md, section 5)")


def nginx_workers():
    """[(pid, parent pid, start time (epoch s), title)] of every nginx worker process."""
    import time
    tick, boot = os.sysconf("SC_CLK_TCK"), time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read()
            if not title.startswith(b"nginx: worker process"):
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out.append((int(pid), int(fields[1]), boot + int(fields[19]) / tick, title))
        except (OSError, ValueError, IndexError):
            continue
    return out


# === 21. Health checks ===

# -- health checks: a real HTTP request to the new workers ------------------------------------

def parse_status_spec(value):
    """PIKU_HEALTHCHECK_STATUS ('200', '200-399', '200,204', '' = below 500) -> [(lo, hi)]."""
    if not (value or "").strip():
        return [(100, 499)]
    ranges = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*([1-5][0-9][0-9])\s*(?:-\s*([1-5][0-9][0-9])\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise PikuError(f"PIKU_HEALTHCHECK_STATUS: expected statuses like 200, 200-399 or 200,204, got {value!r}")
        ranges.append((int(m.group(1)), int(m.group(2) or m.group(1))))
    return ranges


def parse_health_path(value, key="PIKU_HEALTHCHECK_PATH"):
    if not re.fullmatch(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,500}", value or ""):
        raise PikuError(f"{key}: expected a URL path starting with /, got {value!r}")
    return value


def encode_uwsgi_request(variables):
    """A uwsgi-protocol request packet (modifier1 0: a WSGI request) carrying `variables`."""
    body = b""
    for k, v in variables.items():
        kb, vb = k.encode("latin-1"), v.encode("latin-1", "replace")
        body += len(kb).to_bytes(2, "little") + kb + len(vb).to_bytes(2, "little") + vb
    return b"\0" + len(body).to_bytes(2, "little") + b"\0" + body


class EmptyResponse(ValueError):
    """The server closed the connection without a byte of response."""


def parse_http_response(data):
    """(status, body) of a raw HTTP response (what uWSGI sends back over its uwsgi socket too)."""
    if not data:
        raise EmptyResponse("empty response")
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/\d(?:\.\d)? (\d{3})", head)
    if not m:
        raise ValueError("not an HTTP response")
    return int(m.group(1)), body.decode("utf-8", "replace")


def uwsgi_get(sock_path, path, host, timeout=3.0):
    import socket
    path_info, _, query = path.partition("?")
    packet = encode_uwsgi_request({
        "REQUEST_METHOD": "GET", "REQUEST_URI": path, "PATH_INFO": path_info, "QUERY_STRING": query,
        "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": host.split(":")[0], "SERVER_PORT": "80",
        "HTTP_HOST": host, "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "0", "REQUEST_SCHEME": "http",
        "HTTP_USER_AGENT": "piku-healthcheck"})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(packet)
        data = b""
        while len(data) < 65536:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return parse_http_response(data)


def http_get(host, port, path, host_header, timeout=3.0):
    import http.client
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host_header, "User-Agent": "piku-healthcheck"})
        try:
            resp = conn.getresponse()
        except http.client.RemoteDisconnected:
            raise EmptyResponse("empty response")
        return resp.status, resp.read(65536).decode("utf-8", "replace")
    finally:
        conn.close()


def probe(t, c, fresh):
    """(passed?, why not) for one check, once."""
    import socket
    import time
    target = c.target
    if c.in_place and "[uwsgi-daemons] spawning" not in fresh:
        return False, "the restarted process has not started yet"
    if target[0] == "alive":
        return time.monotonic() - target[1] >= ALIVE_SECONDS, "still starting"
    mode = setting(t.settings, "PIKU_HEALTHCHECK")
    path = setting(t.settings, "PIKU_HEALTHCHECK_PATH")
    host = t.names[0] if t.names else host_port(setting(t.settings, "BIND_ADDRESS"), t.env.get("PORT", ""))
    try:
        if mode == "connect":
            if target[0] == "uwsgi":
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(1)
                    s.connect(target[1])
                return True, ""
            return port_open(target[1], target[2]), "nothing listens yet"
        status, body = uwsgi_get(target[1], path, host) if target[0] == "uwsgi" else \
            http_get(target[1], target[2], path, host)
    except EmptyResponse:  # uWSGI closes the connection when the app raises before answering
        return False, f"GET {path} answered 500: the app raised an exception (its log is above)"
    except (OSError, ValueError) as e:
        return False, f"no answer yet ({getattr(e, 'strerror', None) or e})"
    if any(lo <= status <= hi for lo, hi in parse_status_spec(setting(t.settings, "PIKU_HEALTHCHECK_STATUS"))):
        return True, ""
    first = " | ".join(l.strip() for l in body.strip().splitlines()[:3])[:300]
    return False, f"GET {path} answered {status}" + (f": {first}" if first else "")


def health_check(t, checks):
    """None once every new worker answers (PIKU_HEALTHCHECK_*), else why not: a wsgi worker that
    cannot load the app, a web command that keeps exiting, an app that answers 500 (raises) for
    FAILING_500_SECONDS in a row, or the last answer at the timeout."""
    import time
    if not checks:
        return None
    timeout = setting_int(t.settings, "PIKU_HEALTH_TIMEOUT")
    deadline, t0 = time.monotonic() + timeout, time.monotonic()
    pending, why, answered, failing_since = list(checks), {}, {}, {}
    while True:
        unhealthy_answer = False
        for c in list(pending):
            fresh = read_tail(c.log, c.offset)
            fatal = fatal_in_log(c.kind, fresh)
            if fatal:
                return f"{c.name}: {fatal}"
            ok, why[c.name] = probe(t, c, fresh)
            if ok:
                pending.remove(c)
                continue
            if why[c.name].startswith("GET "):  # an answer: it says more than a later timeout would
                answered[c.name], unhealthy_answer = why[c.name], True
            if " answered 500" in why[c.name]:
                since = failing_since.setdefault(c.name, time.monotonic())
                if time.monotonic() - since >= FAILING_500_SECONDS:
                    return f"{c.name}: {why[c.name]} (for {FAILING_500_SECONDS:.0f}s in a row)"
            else:
                failing_since.pop(c.name, None)
        if not pending:
            detail(f"health check passed in {time.monotonic() - t0:.2f}s: GET "
                   f"{setting(t.settings, 'PIKU_HEALTHCHECK_PATH')} on {', '.join(c.name for c in checks)}")
            return None
        if time.monotonic() > deadline:
            c = pending[0]
            return f"{c.name}: {answered.get(c.name) or why[c.name]}, after {timeout}s (PIKU_HEALTH_TIMEOUT)"
        # workers that answer, but not yet well, are asked again less often (each request counts
        # towards their max-requests); until something listens, they are asked every 5 ms (a
        # refused connection costs next to nothing, and the switch waits for the first answer)
        time.sleep(0.25 if unhealthy_answer else 0.005)


FAILING_500_SECONDS = 5.0  # an app that raises on every request this long is not starting up


def fatal_in_log(kind, fresh):
    """What a worker's new log lines say that no waiting will fix, or None."""
    if kind == "wsgi" and ("no app loaded" in fresh or "unable to load app" in fresh):
        hint = " (an ASGI app in `wsgi:`? serve it with `web: uvicorn ...`)" if "ASGI" in fresh else ""
        return "the workers could not load the app" + hint
    if kind != "wsgi" and crash_looping(fresh):
        restarts, throttled = daemon_restarts(fresh)
        return "its command kept exiting" + (
            f" (uWSGI restarted it {restarts} times{' and then held it back' if throttled else ''})"
            if restarts else " (uWSGI held it back for dying too fast)")
    return None


def looks_asgi(log_text):
    """Does a worker's log say an ASGI app (scope, receive, send) was called as a WSGI one?"""
    return bool(re.search(r"required positional arguments?: '(send|receive)'|takes 3 positional arguments", log_text))


def failure_message(t, reason, log_lines=None, checks=None):
    """The one line a failed switch ends with, after the new workers' log lines (those of the
    health check's `checks` when given)."""
    lines = worker_log_tail(t.paths, t.app, checks=checks) if log_lines is None else log_lines
    for line in lines:
        warn(line)
    hint = ""
    if "answered 500" in reason and looks_asgi("\n".join(lines)):
        hint = " (an ASGI app in `wsgi:`? serve it with `web: uvicorn ...`)"
    if t.op.name == "deploy" and not t.live.get("release") and not live_release(t.paths, t.app):
        tail = f"; the app had no earlier release, so nothing serves it until a push succeeds (see `logs {t.app}`)"
    else:
        tail = f": {t.op.on_failure} (see `logs {t.app}`)"
    return f"the new workers failed their health check ({reason}){hint}{tail}"


def canary(t, kind):
    """A serving kind restarted in place (a web app without nginx) is first started on a private
    port and must answer there: a broken release never stops the live one."""
    import subprocess
    import time
    port = pick_free_port(setting(t.settings, "BIND_ADDRESS"), ports_of_other_apps(t.paths, t.app),
                          {t.ports["port"]})
    env = process_env(t.env | {"PORT": str(port)}, kind)
    log_path = os.path.join(t.paths.logs, t.app, f"{kind}.1.log")
    with open(log_path, "ab") as log:
        start = log.tell()
        proc = subprocess.Popen(supervised(["/bin/sh", "-c", t.workers[kind]]), cwd=t.release.dir, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    c = Check(f"{kind} (trial on port {port})", kind, log_path, start,
              ("http", connect_host(setting(t.settings, "BIND_ADDRESS")), port), False)
    deadline = time.monotonic() + setting_int(t.settings, "PIKU_HEALTH_TIMEOUT")
    try:
        while True:
            ok, why = probe(t, c, "")
            if ok:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with status {proc.returncode} before it answered" if proc.returncode is not None
                       else f"{why} within {setting(t.settings, 'PIKU_HEALTH_TIMEOUT')}s (it must listen on "
                       "$BIND_ADDRESS:$PORT, not a fixed port)")
                raise PikuError(failure_message(t, f"{kind} tried on port {port}: {why}", checks=[c]))
            time.sleep(0.05)
    finally:
        stop_process_group(proc)
    detail(f"the new {kind} process answered on trial port {port}: restarting {kind} in place")


def stop_process_group(proc, grace=10):
    """Stop a process piku started and everything it started (its own process group)."""
    import signal
    import time
    if proc is None:
        return
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM  # graceful: requests in flight finish
    while True:
        proc.poll()  # reaps the group leader, so an empty group really is empty
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGKILL and time.monotonic() > deadline + 5:
            return  # unkillable (D state): nothing more to do
        sig = signal.SIGKILL if time.monotonic() > deadline else 0
        time.sleep(0.05)


def read_tail(path, offset):
    """Text appended to path after byte offset ('' if none or the file is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset if os.path.getsize(path) >= offset else 0)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# a line uWSGI logs for each request it served (the live workers' traffic, in the same log file)
UWSGI_REQUEST_LINE = re.compile(r"\[pid: \d+\|app: -?\d+\|req: \d+/\d+\] .* => generated ")


def worker_log_tail(paths, app, lines=15, checks=None):
    """The last lines of the serving workers' logs that say why the new ones failed (pick_log_lines).
    With checks (the health check's), only the logs of the workers just started, from where each
    log ended when they started: an instance scaled away earlier, or what the live workers logged
    before, says nothing about this failure. (At most the last 256 KiB of each log are read.)"""
    if checks:
        logs = [(c.log, c.offset) for c in checks if c.log]
    else:
        d = os.path.join(paths.logs, app)
        names = sorted(os.listdir(d)) if os.path.isdir(d) else []
        logs = [(os.path.join(d, n), 0) for n in names if n.endswith(".log") and n.startswith(("wsgi", "web"))]
    out = []
    for path, offset in dict.fromkeys(logs):
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        start = offset if offset <= size else 0  # (a log rotated meanwhile starts again)
        start = max(start, size - 256 * 1024)
        text = read_tail(path, start)
        name = os.path.basename(path)[:-4]
        out += [f"{name}: {l}" for l in pick_log_lines(text.splitlines()[1 if start > offset else 0:], lines)]
    return out


# what uWSGI itself prints as it starts a vassal: the same on every start, it says nothing about
# why the app failed (its "no app loaded" and the app's own output are kept)
UWSGI_BANNER = re.compile(
    r"^(\*\*\* (?!no app loaded).*\*\*\*$|!{6,}|detected binary path|your (processes number limit|memory page size|"
    r"mercy for graceful|server socket listen backlog)|no request plugin is loaded|you may need to install "
    r"the package|spawned uWSGI (master|worker|rawrouter)|uWSGI rawrouter bound on |\[uwsgi-daemons\] (spawning|throttling|respawning) |chdir\(\) to |uwsgi socket \d|"
    r"uWSGI running as root|mapped \d+ bytes|compiled with version|os: Linux|nodename: |machine: |"
    r"clock source: |pcre jit|detected number of CPU cores|current working directory: |detected max file "
    r"descriptor|lock engine: |thunder lock: |writing pidfile|Python version: |Python main interpreter|"
    r"python threads support|setgid\(\)|setuid\(\))")
EXCEPTION_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception)(?::|$)")


def pick_log_lines(log_lines, count):
    """Of a worker log's lines, what a failed health check shows: the last `count`, leaving out
    uWSGI's request lines (the live workers keep logging their requests there while the new ones
    start) and its start-up banner; an exception line (`ModuleNotFoundError: ...`) from before
    those comes first, with `...`, so that a long traceback after it (gunicorn's own, as it
    gives up) does not hide the cause."""
    kept = [l for l in log_lines if not UWSGI_REQUEST_LINE.search(l) and not UWSGI_BANNER.match(l)]
    tail, earlier = kept[-count:], kept[:-count]
    causes = []
    for line in reversed(earlier):
        if EXCEPTION_LINE.match(line) and line not in tail and line not in causes:
            causes.insert(0, line)
            if len(causes) == 2:
                break
    return causes + ["..."] + tail if causes else tail


# === 22. After a switch: pruning, destroy, deploy hooks and notifications ===

# -- after a switch -----------------------------------------------------------------------------

def finish(t, t0, waited, deployed=True):
    """Record the release history, prune, log the deploy, say so, and ask for a certificate."""
    import time
    p, app = t.paths, t.app
    previous = t.live.get("release")
    records = load_manifest(p, app)
    for r in records:
        if r["id"] == t.release.id:
            r["status"] = "live"
            if t.op.name == "rollback":
                r["rollback_of"] = previous
        elif previous == t.release.id:
            continue  # (config:set, restart, ps:scale: the same release; the one before stays previous)
        elif r["id"] == previous:
            r["status"] = "previous"
        elif r.get("status") in ("live", "previous"):
            r["status"] = "old"
    save_manifest(p, app, records)
    prune_releases(p, app, setting_int(t.settings, "PIKU_RELEASES_KEPT"), keep_venv=live_venv_of(t))
    prune_worker_files(p, app)
    url = app_url(t)
    if not deployed:
        return t
    with open(os.path.join(p.state, app, "deploys.log"), "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {t.op.name} {t.release.ref or ''}@{(t.release.rev or '')[:10]}"
                f" -> {t.release.id}\n")
    total = time.monotonic() - t0
    what = "Rolled back" if t.op.name == "rollback" else "Deployed"
    step(f"{what} {app} to {t.release.id} in {total:.2f}s (piku {total - waited:.3f}s, workers starting "
         f"{waited:.2f}s)" + (f": {url}" if url else ""))
    if t.names:
        acme_certificate({"paths": p, "app": app, "settings": t.settings})
    return t


def live_venv_of(t):
    return t.release.venv


def app_url(t):
    names = t.names
    if names:
        https = setting_bool(t.settings, "NGINX_HTTPS_ONLY") and os.path.exists(cert_paths(t.paths, t.app)[0])
        return f"{'https' if https else 'http'}://{names[0]}/"
    if t.scaling.get("wsgi") or t.scaling.get("web"):
        return f"http://{host_port(setting(t.settings, 'BIND_ADDRESS'), t.env['PORT'])}/"
    return None


def prune_releases(paths, app, keep, keep_venv=None):
    """Keep the `keep` newest releases that went live (and the live one); older release
    directories go, never one a running process works in. Virtualenvs no kept release uses go
    too (PIKU_RELEASES_KEPT counts both)."""
    base = os.path.join(paths.releases, app)
    live = live_release(paths, app)
    records = load_manifest(paths, app)
    went_live = [r for r in records if r.get("status") in ("live", "previous", "old")]
    known = {os.path.realpath(r.get("dir") or "") for r in records}
    doomed = [r.get("dir") for r in went_live[keep:] if r.get("dir") and os.path.realpath(r["dir"]) != live]
    # directories of older piku.py versions (no record): the oldest go first, as before
    unrecorded = sorted((os.path.join(base, n) for n in os.listdir(base) if os.path.realpath(os.path.join(base, n))
                         not in known), key=os.path.getmtime, reverse=True) if os.path.isdir(base) else []
    doomed += [d for d in unrecorded[max(0, keep - len(went_live[:keep])):] if os.path.realpath(d) != live]
    busy = releases_in_use(doomed) if doomed else set()
    for d in doomed:
        if d not in busy and os.path.isdir(d):
            remove_path(d)
    for r in records:
        if r.get("dir") in doomed and r.get("dir") not in busy:
            r["status"] = "pruned"
    save_manifest(paths, app, records)
    used = {r.get("venv") for r in records if r.get("venv") and os.path.isdir(r.get("dir") or "")}
    vbase = os.path.join(paths.venvs, app)
    for name in os.listdir(vbase) if os.path.isdir(vbase) else []:
        path = os.path.join(vbase, name)
        if path not in used and path != keep_venv and os.path.exists(os.path.join(path, VENV_MARK)):
            remove_path(path)


def process_dirs():
    """The current directory of every process this user can see (pid -> path)."""
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                out[pid] = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
    return out


def releases_in_use(candidates):
    """The release directories among candidates that a running process sits in."""
    cwds = set(process_dirs().values())
    return {c for c in candidates for real in [os.path.realpath(c)] for cwd in cwds
            if cwd == real or cwd.startswith(real + "/")}


def prune_worker_files(paths, app):
    """Environment, loader and launch files (content-named) that no vassal or inner ini refers to."""
    refs = ""
    for folder in (paths.uwsgi_enabled, os.path.join(paths.state, app, "slot-a"), os.path.join(paths.state, app, "slot-b")):
        mine = "" if folder != paths.uwsgi_enabled else app + "_"  # (other apps' vassals name their own files)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.endswith(".ini") and name.startswith(mine):
                refs += read_text(os.path.join(folder, name), "")
    for sub in ("env", "boot", "launch"):
        d = os.path.join(paths.state, app, sub)
        for name in os.listdir(d) if os.path.isdir(d) else []:
            if name not in refs:
                remove_path(os.path.join(d, name))


def stop_app(paths, app):
    """Stop every worker of the app (gracefully where uWSGI serves requests); returns the
    vassal names and the masters still on their way out."""
    names = vassals_of(paths, app)
    return names, stop_gracefully(paths, names)


def destroy_app(paths, app):
    """Remove an app's code, repo, env, logs, releases, state, vassals and nginx files, once its
    workers have stopped (they work in those directories until then). nginx lets go of the
    app's names first: once it no longer sends them to the workers, they stop, so no request
    meets a stopped worker (a 502) and the names get the default server's 404 from then on."""
    removed = release_nginx_names(paths, app)
    names, fifos = stop_app(paths, app)
    wait_masters_gone(fifos)
    left = wait_workers_gone(app, names)
    if left:
        warn(f"still stopping after 30s: {', '.join(left)} (the emperor stops them); removing the files anyway")
    for name in vassals_of(paths, app, paths.uwsgi_available):
        remove_path(os.path.join(paths.uwsgi_available, name))
    for path in (os.path.join(paths.apps, app), os.path.join(paths.repos, app),
                 os.path.join(paths.envs, app), os.path.join(paths.logs, app),
                 os.path.join(paths.releases, app), os.path.join(paths.state, app),
                 os.path.join(paths.venvs, app),
                 os.path.join(paths.acme, app), os.path.join(paths.locks, f"{app}.lock"),
                 os.path.join(paths.state, "_acme", "dehydrated", "certs", app),
                 os.path.join(paths.state, "_acme", "dehydrated", f"{app}.conf")) + tuple(
            os.path.join(paths.nginx, f"{app}{ext}") for ext in (".conf", ".crt", ".key", ".htpasswd")):
        if os.path.lexists(path):
            remove_path(path)
            removed.append(path)
    for name in os.listdir(paths.nginx) if os.path.isdir(paths.nginx) else []:
        if re.fullmatch(re.escape(app) + r"\.(web)?\d+(\.[ab]|\.live)?\.sock", name):
            remove_path(os.path.join(paths.nginx, name))
            removed.append(os.path.join(paths.nginx, name))
    write_default_server(paths)  # (the addresses only this app listened on)
    return removed


def release_nginx_names(paths, app):
    """Remove the app's nginx config and wait (at most NGINX_QUIESCE_SECONDS) until nginx no
    longer sends its names to the app: the config's probe URL gets the default server's 404 (or
    nothing listens there any more), and nginx's workers with the old config take no new
    requests. Returns the paths removed."""
    import time
    conf = os.path.join(paths.nginx, f"{app}.conf")
    if not os.path.exists(conf):
        return []
    probe = switch_probe_path(read_text(conf, ""))
    try:
        settings = live_settings(paths, app, check=False)
        names = split_names(setting(settings, "NGINX_SERVER_NAME"))
    except Exception:  # (an app whose state cannot be read is destroyed all the same)
        settings, names = None, []
    since, t0 = time.time(), time.monotonic()
    remove_path(conf)
    write_default_server(paths)
    if probe and names and nginx_binary() and not nginx_answers(
            settings, probe_host(names[0]), probe, 404, NGINX_QUIESCE_SECONDS, refused=True):
        warn(f"nginx still sends {names[0]} to {app} after {NGINX_QUIESCE_SECONDS:.0f}s (is it reloaded when "
             f"{paths.nginx} changes?): requests for it may fail until it is")
    nginx_drained(since, NGINX_QUIESCE_SECONDS - (time.monotonic() - t0), quiesced=True)
    return [conf]


def write_vassal(path, text):
    """Write a vassal ini so the emperor sees it change: it compares whole-second mtimes."""
    old = int(os.stat(path).st_mtime) if os.path.exists(path) else None
    write_atomic(path, text)
    if old is not None and int(os.stat(path).st_mtime) <= old:
        os.utime(path, (old + 1, old + 1))


# -- deploy hooks and notifications -------------------------------------------------------------
# Around every deploy (a push, `deploy`, a changed build setting, `restore`): the server's own
# pre-deploy hook may refuse it (it runs before the release command); once the release is live,
# the Procfile's `postdeploy:` command and the server's post-deploy hook run (their failures only
# warn: nothing is rolled back); PIKU_DEPLOY_WEBHOOK gets a JSON notice whatever the outcome.

SERVER_HOOKS = ("pre-deploy", "post-deploy")  # programs of the admin's in PIKU_ROOT/hooks/


def with_deploy_hooks(recipe, paths, app, rev, ref, environ):
    """Run the deploy recipe; after a successful one postdeploy and the post-deploy hook; then
    the webhook's notice (a failed deploy's too, with the settings known before it started)."""
    import time
    t0, started = time.monotonic(), time.time()
    notice = {"app": app, "revision": rev, "branch": ref or None,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}
    before = settings_for_notice(paths, app)
    try:
        t = recipe(paths, app, rev, ref, environ)
    except Exception as e:
        failed = {"status": "failed", "duration": time.monotonic() - t0, "error": (str(e).splitlines() or [""])[0][:500]
                  or type(e).__name__, "release": failed_release_id(paths, app, rev, started)}
        never_fails(notify_deploy, before, notice | failed)
        raise
    notice |= {"status": "success", "duration": time.monotonic() - t0, "release": t.release.id, "url": app_url(t)}
    never_fails(run_postdeploy, t)
    never_fails(run_server_hook, t, "post-deploy")
    never_fails(notify_deploy, t.settings, notice)
    return t


def never_fails(after, *args):
    """One of what follows a deploy: an error there (a hook that cannot start...) is a warning,
    never the deploy's failure."""
    try:
        after(*args)
    except Exception as e:
        warn(f"{str(e) or type(e).__name__}: the deploy is not affected")


def settings_for_notice(paths, app):
    """The live settings (config:set over the live release's ENV), {} when they cannot be read:
    where a deploy that fails before its own settings are known sends its notice."""
    try:
        return live_settings(paths, app, check=False)
    except (PikuError, OSError):
        return {}


def failed_release_id(paths, app, rev, since):
    """The release a failed deploy of rev started at `since` recorded (None if it got no id)."""
    for r in load_manifest(paths, app):
        if r.get("rev") == rev and (r.get("created") or 0) >= int(since):
            return r["id"]
    return None


def run_procfile_command(kind, cmd, cwd, env):
    """A Procfile phase command that decides nothing about a deploy (postdeploy, backup): run with
    /bin/sh in cwd with the app's environment and PROC_TYPE=kind; its exit code."""
    step(f"Running {kind}: {cmd}")
    return run(["/bin/sh", "-c", cmd], cwd=cwd, env=process_env(env, kind), check=False, input="").returncode


def run_postdeploy(t):
    """The Procfile's postdeploy command, in the release that just went live; a failure warns."""
    if "postdeploy" in t.workers:
        code = run_procfile_command("postdeploy", t.workers["postdeploy"], t.release.dir, t.env)
        if code:
            warn(f"postdeploy command failed (exit {code}): {t.app} stays on {t.release.id}, nothing was "
                 "rolled back (a postdeploy failure never rolls a deploy back)")


def run_server_hook(t, name):
    """PIKU_ROOT/hooks/<name> (pre-deploy, post-deploy), the admin's program, when there is one: run
    in the release with APP, REV, BRANCH, RELEASE, RELEASE_DIR, PREVIOUS_RELEASE (and URL after the
    deploy). A pre-deploy hook that fails, or cannot be trusted, refuses the deploy; post-deploy warns."""
    path = os.path.join(t.paths.root, "hooks", name)
    if not os.path.lexists(path):
        return
    gate = name == "pre-deploy"
    problem = owner_only_problem(path, root_may_own=True) or \
        (None if os.access(path, os.X_OK) else "it is not executable (chmod 755 it)")
    if problem and gate:
        raise PikuError(f"the server's pre-deploy hook {path} cannot be run: {problem}; no app deploys until it "
                        "is fixed or removed (nothing was changed)")
    if problem:
        return warn(f"the server's post-deploy hook {path} was not run: {problem}")
    step(f"Running the server's {name} hook")
    env = {k: v for k, v in clean_env(os.environ).items() if k in ("PATH", "HOME", "USER", "LOGNAME", "LANG",
                                                                     "LC_ALL", "TZ")}
    env.update({"PIKU_ROOT": t.paths.root, "APP": t.app, "REV": t.release.rev or "", "BRANCH": t.release.ref or "",
                "RELEASE": t.release.id, "RELEASE_DIR": t.release.dir,
                "PREVIOUS_RELEASE": t.live.get("release") or ""} | ({} if gate else {"URL": app_url(t) or ""}))
    try:
        code = run([path], cwd=t.release.dir, env=env, check=False, input="").returncode
    except PikuError as e:  # (not a program: a script without its #! line...)
        raise PikuError(f"the server's {name} hook {path} could not start ({e})"
                        + ("; no app deploys until it is fixed or removed (nothing was changed)" if gate else ""))
    if code and gate:
        raise PikuError(f"the server's pre-deploy hook refused the deploy (exit {code}): nothing was changed, "
                        "the live release serves on")
    if code:
        warn(f"the server's post-deploy hook failed (exit {code}): the deploy stands")


def notify_deploy(settings, notice):
    """POST the deploy's notice to PIKU_DEPLOY_WEBHOOK (when set), waiting for the answer at most
    PIKU_DEPLOY_WEBHOOK_TIMEOUT seconds; whatever happens, the deploy is not affected."""
    import socket
    from urllib.parse import urlsplit
    url = settings.get("PIKU_DEPLOY_WEBHOOK")
    if not url:
        return
    try:
        parse_webhook_url(url)
        timeout = parse_int(setting(settings, "PIKU_DEPLOY_WEBHOOK_TIMEOUT"), "PIKU_DEPLOY_WEBHOOK_TIMEOUT", 1, 60)
    except PikuError as e:
        return warn(f"{e}: no deploy notice sent")
    where = "{0.scheme}://{0.netloc}".format(urlsplit(url))  # (the rest may hold a token)
    answer = post_json(url, render_deploy_notice(notice | {"server": socket.gethostname(), "piku": __version__}),
                       timeout)
    if isinstance(answer, int) and 200 <= answer < 300:
        detail(f"deploy notice sent to {where} ({answer})")
    else:
        warn(f"the deploy notice to {where} " + (f"got no answer within {timeout}s (PIKU_DEPLOY_WEBHOOK_TIMEOUT)"
                                                 if answer is None else f"failed ({answer})")
             + ": the deploy is not affected")


def post_json(url, body, timeout):
    """POST a JSON body from a thread of its own: the HTTP status, an error's text, or None when
    nothing came back within timeout seconds (whichever notices first, the thread's socket or
    the wait for it; a thread still waiting is left to end with the process)."""
    import http.client
    import threading
    import urllib.error
    import urllib.request
    answer = []

    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None  # (urllib would repeat a POST as a GET without its body: a 3xx is the answer)

    def send():
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": f"piku.py/{__version__}"})
        try:
            with urllib.request.build_opener(NoRedirects).open(req, timeout=timeout) as resp:
                answer.append(resp.status)
        except urllib.error.HTTPError as e:
            answer.append(e.code)
        except (OSError, ValueError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            answer.append(None if isinstance(reason, TimeoutError) else str(reason)[:200] or type(e).__name__)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else None


# === 23. Backup, restore and downgrade ===

# -- backup and restore -------------------------------------------------------------------------
# `backup APP` streams a tar.gz: the repository as a git bundle (repo.bundle), the config:set
# settings and SCALING (config/), the TLS certificate, key and record (tls/), data/<app> (data/),
# and last manifest.json: what the app was (release, revision, branch, versions, date) and the
# sha256 of every file. `restore APP` unpacks it into a staging folder and verifies all of it
# before anything is put in place; then it deploys it like a push.

class HashingReader:
    """A file's reader that keeps the sha256 of what was read from it."""

    def __init__(self, f):
        import hashlib
        self.f, self.hash = f, hashlib.sha256()

    def read(self, n=-1):
        data = self.f.read(n)
        self.hash.update(data)
        return data


def pushed_head(paths, app):
    """(revision, branch) the app's repository deploys, or None when nothing was pushed."""
    git = ["git", "--git-dir", os.path.join(paths.repos, app)]
    branch = deploy_branch_of(paths, app) or \
        run(git + ["symbolic-ref", "-q", "HEAD"], capture=True, check=False, env=clean_env(os.environ)).stdout.strip()
    proc = run(git + ["rev-parse", "--verify", "-q", f"{branch}^{{commit}}"], capture=True, check=False,
               env=clean_env(os.environ)) if BRANCH_RE.fullmatch(branch) else None
    return (proc.stdout.strip(), branch) if proc and proc.returncode == 0 else None


def backup_info(paths, app):
    """What the manifest says about the app: its live release and revision (the deployed branch's
    head when none is live, or when the live one is on no branch any more), branch, versions, date."""
    import platform
    import socket
    import time
    head = pushed_head(paths, app)
    if not head:
        raise PikuError(f"{app} has nothing pushed yet: nothing to back up")
    live = live_record(paths, app)
    rev = live.rev if live and live.rev else head[0]
    on_a_branch = run(["git", "--git-dir", os.path.join(paths.repos, app), "for-each-ref", "--count=1",
                       "--contains", rev], capture=True, check=False, env=clean_env(os.environ))
    if rev != head[0] and not (on_a_branch.returncode == 0 and on_a_branch.stdout.strip()):
        warn(f"the live revision {rev[:10]} is on no branch any more: the backup deploys {head[1]} ({head[0][:10]})")
        rev = head[0]
    return {"app": app, "release": live.id if live else None, "rev": rev, "branch": head[1],
            "python": live.python if live else None, "runtime": live.runtime if live else None,
            "piku": __version__, "server_python": platform.python_version(), "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def backup_sources(paths, app):
    """{archive member: file on disk} of the app's settings, scaling and TLS material."""
    crt, key, record = cert_paths(paths, app)
    return {"config/ENV": os.path.join(paths.envs, app, "ENV"),
            "config/SCALING": os.path.join(paths.envs, app, "SCALING"),
            "tls/crt": crt, "tls/key": key, "tls/certificate.json": record}


def run_backup_phase(paths, app):
    """The Procfile's `backup:` command (a database dump into $DATA_ROOT...), in the live release
    with the live environment; its failure stops the backup."""
    release = live_release(paths, app)
    workers = read_procfile(release)[0] if release else {}
    if "backup" in workers:
        code = run_procfile_command("backup", workers["backup"], release, load_live_env(paths, app))
        if code:
            raise PikuError(f"the backup command failed (exit {code}): no backup was made")


def backup_app(paths, app, out, environ):
    """Write app's backup (a tar.gz) to the binary stream out; returns the manifest's info. The
    backup command, the bundle and the small files are taken under the app's lock, so they
    match; data/<app> is read after (the app keeps writing it meanwhile)."""
    import shutil
    import tarfile
    import tempfile
    ensure_dirs(paths.state)
    scratch = tempfile.mkdtemp(prefix=".backup-", dir=paths.state)
    try:
        with AppLock(paths, app):
            run_backup_phase(paths, app)
            info = backup_info(paths, app)
            step(f"Backing up {app}: release {info['release'] or '(none live)'}, {info['branch']}@{info['rev'][:10]}")
            copies = {"repo.bundle": os.path.join(scratch, "repo.bundle")}
            run(["git", "--git-dir", os.path.join(paths.repos, app), "bundle", "create", copies["repo.bundle"],
                 "--all"], capture=True, env=clean_env(environ))
            for name, path in backup_sources(paths, app).items():
                if os.path.isfile(path):
                    copies[name] = os.path.join(scratch, name.replace("/", "-"))
                    shutil.copyfile(path, copies[name])
        files, links = {}, {}
        with tarfile.open(fileobj=out, mode="w|gz") as tar:
            for name, path in copies.items():
                add_backup_file(tar, name, path, files, 0o600)
            add_backup_data(tar, os.path.join(paths.data, app), files, links)
            manifest = render_backup_manifest(info, files, links).encode()
            add_backup_file(tar, "manifest.json", None, {}, 0o600, manifest)
        detail(f"{len(files)} files ({sum(1 for f in files if f.startswith('data/'))} of them in data/), "
               f"{len(links)} links, and the manifest")
        return info
    finally:
        remove_path(scratch)


def add_backup_file(tar, name, path, hashes, mode=None, data=None):
    """Add a file (or the bytes `data`) to the archive as `name`; its sha256 goes into hashes."""
    import io
    import tarfile
    import time
    info = tarfile.TarInfo(name)
    try:
        with (open(path, "rb") if data is None else io.BytesIO(data)) as f:
            st = os.fstat(f.fileno()) if data is None else None
            info.size, info.mtime = (st.st_size, st.st_mtime) if st else (len(data), time.time())
            info.mode = st.st_mode & 0o777 if mode is None else mode
            reader = HashingReader(f)
            tar.addfile(info, reader)
    except OSError as e:  # (unreadable, or shorter than its size said: written to meanwhile)
        raise PikuError(f"{name} could not be read ({e.strerror or e}): no complete backup was made; run it again "
                        "(a `backup:` command can make a consistent copy first)")
    hashes[name] = reader.hash.hexdigest()


def add_backup_data(tar, top, files, links):
    """data/<app> into the archive as data/...: folders, files, and the symbolic links that lead
    inside it (an absolute one made relative); others, and sockets or FIFOs, are left out."""
    import stat
    import tarfile
    if not os.path.isdir(top):
        return
    tar.addfile(tar_entry("data", os.stat(top), tarfile.DIRTYPE))
    for d, dirs, names in os.walk(top):
        for n in sorted(dirs + names):
            path = os.path.join(d, n)
            rel = "data/" + os.path.relpath(path, top)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                tar.addfile(tar_entry(rel, st, tarfile.DIRTYPE))
            elif stat.S_ISREG(st.st_mode):
                add_backup_file(tar, rel, path, files)
            elif stat.S_ISLNK(st.st_mode):
                add_backup_link(tar, rel, path, top, links)
            else:
                warn(f"{rel} is not a file, folder or link (a socket or FIFO): left out")
        dirs[:] = sorted(n for n in dirs if not os.path.islink(os.path.join(d, n)))


def tar_entry(name, st, kind, link=""):
    """A tar header for a folder or link (no owner names: they mean nothing on another server)."""
    import tarfile
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime, info.mode = kind, link, st.st_mtime, st.st_mode & 0o777
    return info


def add_backup_link(tar, rel, path, top, links):
    """A symbolic link of data/<app>, when it leads inside it (restore refuses others)."""
    import tarfile
    target = os.readlink(path)
    if os.path.normpath(target).startswith(top + os.sep):
        target = os.path.relpath(os.path.normpath(target), os.path.dirname(path))
    try:
        parse_backup_member(rel, "link", 0, target)
        if not is_inside(path, top):
            raise PikuError("through another link")
    except PikuError:
        return warn(f"{rel} is a symbolic link out of the app's data ({target[:80]}): left out")
    tar.addfile(tar_entry(rel, os.lstat(path), tarfile.SYMTYPE, target))
    links[rel] = target


def backup_all(paths, out, environ):
    """backup --all: one uncompressed tar of APP.tar.gz archives, one per app with something
    pushed. Returns the apps whose backup failed (the others are in the stream)."""
    import tarfile
    import tempfile
    failed = []
    ensure_dirs(paths.state)
    scratch = tempfile.mkdtemp(prefix=".backup-all-", dir=paths.state)
    try:
        with tarfile.open(fileobj=out, mode="w|") as outer:
            for app in known_apps(paths):
                if not pushed_head(paths, app):
                    detail(f"{app}: nothing pushed yet, skipped")
                    continue
                path = os.path.join(scratch, f"{app}.tar.gz")
                try:
                    with open(path, "wb") as f:
                        backup_app(paths, app, f, environ)
                    add_backup_file(outer, f"{app}.tar.gz", path, {}, 0o600)
                except PikuError as e:
                    warn(f"{app}: {e}")
                    failed.append(app)
                remove_path(path)
    finally:
        remove_path(scratch)
    return failed


def restore_conflict(paths, app):
    """(what of app is on this server already, or None; is it the whole app?)."""
    if os.path.isdir(os.path.join(paths.repos, app)) or os.path.lexists(os.path.join(paths.apps, app)):
        return f"{app} exists", True
    if os.path.lexists(os.path.join(paths.data, app)):
        return f"data/{app} exists (kept when an app of that name was destroyed?)", False
    return None, False


def refuse_restore_over(paths, app, force):
    """Raise unless restore may put app in place (nothing of it here, or --force); returns
    whether the whole app exists."""
    what, whole = restore_conflict(paths, app)
    if what and not force:
        raise PikuError(f"{what}: `restore {app} --force` replaces its code, settings, scaling, certificate and "
                        "data (the data it has is kept aside); nothing was changed")
    return whole


def restore_app(paths, app, stream, force, environ):
    """restore: recreate app from the backup read from stream (all of it verified first, in a
    staging folder), then deploy it like a push."""
    import tempfile
    refuse_restore_over(paths, app, force)
    clash = name_clash(app, known_apps(paths))
    if clash:
        raise PikuError(f"app name {app} is refused: with app {clash} it could share worker file names "
                        "(<app>_<kind>.N.ini); nothing was changed")
    ensure_dirs(paths.data)
    staging = tempfile.mkdtemp(prefix=f".restore-{app}-", dir=paths.data)
    try:
        try:
            manifest = unpack_backup(staging, stream, environ)
        except PikuError as e:
            raise PikuError(f"restore refused: {e}; nothing was changed", e.code)
        step(f"Restoring {app} from the backup of {manifest['app']} made {manifest['created']} by piku "
             f"{manifest.get('piku')}: release {manifest['release'] or '(none live)'}, "
             f"{manifest['branch']}@{manifest['rev'][:10]}")
        with AppLock(paths, app):
            existed = refuse_restore_over(paths, app, force)  # (again: it may have come meanwhile)
            setup_tree(paths)
            put_restored(paths, app, staging, manifest, existed, environ)
    finally:
        remove_path(staging)


def unpack_backup(staging, stream, environ):
    """Unpack and verify a backup in staging: members, manifest and checksums, its settings, and
    its bundle fetched into staging/repo.git. Returns the manifest (with `head`: the branch's head)."""
    files, links = extract_backup(stream, staging)
    manifest = parse_backup_manifest(read_text(os.path.join(staging, "manifest.json")), files, links)
    config = parse_env(read_text(os.path.join(staging, "config", "ENV"), ""), source="config/ENV")
    validate_settings(config, "config/ENV")
    repo, bundle = os.path.join(staging, "repo.git"), os.path.join(staging, "repo.bundle")
    env = clean_env(environ)
    run(["git", "init", "-q", "--bare", repo], capture=True, env=env)
    git = ["git", "--git-dir", repo]
    for argv in (["bundle", "verify", "-q", bundle], ["fetch", "-q", bundle, "+refs/*:refs/*"],
                 ["symbolic-ref", "HEAD", manifest["branch"]], ["cat-file", "-e", manifest["rev"] + "^{commit}"],
                 ["rev-parse", "--verify", "-q", manifest["branch"] + "^{commit}"]):  # (the last: the head)
        proc = run(git + argv, capture=True, check=False, env=env)
        if proc.returncode != 0:
            why = (proc.stderr or proc.stdout).strip().splitlines()
            raise PikuError(f"the archive's repo.bundle lacks what its manifest names (git {argv[0]}: "
                            f"{why[-1][:200] if why else 'exit ' + str(proc.returncode)})")
    manifest["head"] = proc.stdout.strip()
    remove_path(bundle)
    return manifest


def put_restored(paths, app, staging, manifest, existed, environ):
    """Move the verified backup into place (what was there moved aside) and deploy it. If the
    deploy fails, an app that existed gets back what it had; a new one stays, not deployed."""
    import time
    for name, text in (("branch", manifest["branch"]), ("rev", manifest["head"])):
        write_atomic(os.path.join(staging, f"state-{name}"), text + "\n")
    state, s = os.path.join(paths.state, app), lambda *p: os.path.join(staging, *p)  # noqa: E731
    kept = os.path.join(paths.data, f".{app}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    moves = [(s("repo.git"), os.path.join(paths.repos, app), None), (s("data"), os.path.join(paths.data, app), kept),
             (s("state-branch"), os.path.join(state, "branch"), None),
             (s("state-rev"), os.path.join(state, "rev"), None)]
    moves += [(s(*name.split("/")), path, None) for name, path in backup_sources(paths, app).items()]
    done = swap_in(moves, private_dir(s("replaced")))
    crt = cert_paths(paths, app)[0]
    if os.path.exists(crt):
        os.chmod(crt, 0o644)  # (nginx's workers read it)
    ensure_repo(paths, app)
    try:
        deploy(paths, app, manifest["rev"], manifest["branch"][len("refs/heads/"):], environ)
    except BaseException as e:
        if existed:
            swap_back(done)
        if not isinstance(e, Exception):
            raise
        tail = f"{app} has its previous repository, settings and data back" if existed else \
            f"{app} is in place but not deployed: fix the cause (`logs {app}`), then `deploy {app}`"
        raise PikuError(f"{e}; restore: {tail}", getattr(e, "code", 1)) from e
    step(f"Restored {app}")
    if os.path.isdir(kept):
        detail(f"the data it had is kept in {kept} (delete it when you no longer need it)")


def swap_in(moves, aside):
    """For each (new, live, keep) path: what is at live moves to keep (else into the folder
    aside), then new (when it exists) takes its place. Returns what swap_back undoes."""
    import shutil
    done = []
    try:
        for i, (new, live, keep) in enumerate(moves):
            old = (keep or os.path.join(aside, str(i))) if os.path.lexists(live) else None
            if old:
                shutil.move(live, old)
            done.append((live, old))
            if os.path.lexists(new):
                ensure_dirs(os.path.dirname(live))
                shutil.move(new, live)
    except BaseException:
        swap_back(done)
        raise
    return done


def swap_back(done):
    """Undo swap_in: each live path gets back what it had (or nothing)."""
    import shutil
    for live, old in reversed(done):
        remove_path(live)
        if old:
            shutil.move(old, live)


# -- the way back: `downgrade` puts the original piku back ------------------------------------
# Every app's files in the original's formats (apps/<app> a git checkout, envs/<app> a
# virtualenv of its own, vassals it can run without piku.py, plain ENV files, a post-receive
# hook), switched to like a deploy: the new workers start beside the live ones, nginx moves,
# the old ones stop. The original piku.py then replaces this file.

DOWNGRADED = "_downgraded"  # in state/: piku.py takes no push or change until `setup` again


def refuse_when_downgraded(paths):
    if os.path.exists(os.path.join(paths.state, DOWNGRADED)):
        raise PikuError("this server went back to the original piku (`downgrade`): nothing was changed; "
                        "to use piku.py again, put it back and run its `setup` (docs/INSTALL.md)")


def downgrade(paths, original, environ):
    """Check every app and the original's piku.py first, then convert the apps one by one and
    put the original's file in place of this one."""
    import contextlib
    text = read_text(original)
    if text is None:
        raise PikuError(f"no such file: {original}")
    tmp, _ = stage_piku_file(text, "--help", "git-hook", f"{original} does not run as the original piku.py "
                             "(its `--help` lists no git-hook): nothing was changed")
    done = []
    try:
        with contextlib.ExitStack() as locks:
            for app in known_apps(paths):
                locks.enter_context(AppLock(paths, app))
            plans = [plan_downgrade(paths, app, environ) for app in known_apps(paths)]
            write_atomic(os.path.join(paths.state, DOWNGRADED), "")
            for app, plan in plans:
                downgrade_app(paths, app, plan)
                done.append(app)
            keys, changed = render_original_keys(read_text(authorized_keys_path(), ""), os.path.abspath(__file__),
                                                 paths.root)
            if changed:
                write_atomic(authorized_keys_path(), keys, mode=0o600)
                detail(f"{changed} ssh key line(s) added by piku.py now run the original's way")
            os.replace(tmp, os.path.abspath(__file__))
    except BaseException as e:
        remove_path(tmp)
        remove_path(os.path.join(paths.state, DOWNGRADED))
        if done and isinstance(e, PikuError):
            raise PikuError(f"{e}. Already back in the original's formats (they keep running; piku.py deploys "
                            f"them as before at their next push): {', '.join(done)}; piku.py was not replaced")
        raise
    step(f"The original piku runs this server now ({len(done)} app(s)); see docs/INSTALL.md for the way forward again")


def stage_piku_file(text, flag, expect, failure):
    """A piku.py (its text) beside this one under a temporary name, once `python3 COPY flag`
    works and prints `expect` (else PikuError(failure)); os.replace then puts it in place.
    Returns (its temporary path, what it printed)."""
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(__file__)), prefix=".piku-new-", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    proc = run([sys.executable, tmp, flag], capture="merged", check=False)
    if proc.returncode != 0 or expect not in proc.stdout:
        os.unlink(tmp)
        raise PikuError(failure)
    os.chmod(tmp, 0o755)
    return tmp, proc.stdout.strip()


def plan_downgrade(paths, app, environ):
    """(app, (target, files)) for an app piku.py deployed, (app, None) for one whose files are
    the original's already (never pushed since the switch). Raises for what the original
    cannot run, before anything changes."""
    release = live_record(paths, app)
    if release is None or not os.path.islink(os.path.join(paths.apps, app)):
        return app, None
    t = plan_target(paths, app, release, environ, OPERATIONS["restart"])
    if t.wsgi_mode == "pyuwsgi":
        raise PikuError(f"{app}: its wsgi workers run Python {release.python} through pyuwsgi; the original piku "
                        "serves wsgi only on the system uWSGI's Python: set PYTHON_VERSION to that one first")
    config = load_config(paths, app)
    scope = {**env_file_base(paths, app, environ), **t.settings}
    for key, value in config.items():
        if any(m.group(1) and (m.group(2) or m.group(3)) in scope for m in CONFIG_REF_RE.finditer(value)):
            raise PikuError(f"{app}: {key} writes a literal `$` as `$$`, which the original piku does not "
                            "know: change it first (config:set)")
    try:
        return app, (t, render_original_files(t, config))
    except PikuError as e:
        raise PikuError(f"{app}: {e}; change it first (nothing was changed)")


def original_env(t, kind=None, n=1):
    """A worker's environment (kind None: the app's) with the release's paths as the original
    keeps them: apps/<app> for the release directory, envs/<app> for its virtualenv."""
    env = {}
    for key, value in {**t.env, **({"PROC_TYPE": kind, "PROC_INDEX": str(n)} if kind else {})}.items():
        if key == "PORT" and not value.isdigit():
            continue  # (an app that listens nowhere)
        if t.release.venv:
            value = value.replace(t.release.venv, os.path.join(t.paths.envs, t.app))
        env[key] = value.replace(t.release.dir, os.path.join(t.paths.apps, t.app))
    return env


def render_original_files(t, config):
    """{path: (text, mode)} of an app in the original's formats (pure)."""
    p, app = t.paths, t.app
    files = {}
    for kind, count in t.scaling.items():
        for n in range(1, count + 1):
            if not kind_of(kind).vassal:
                continue
            env = original_env(t, kind, n)
            v = {"app": app, "kind": kind, "index": n, "paths": p, "settings": t.settings, "env": env,
                 "chdir": os.path.join(p.apps, app), "command": t.workers[kind],
                 "venv": os.path.join(p.envs, app) if t.release.venv else None,
                 "python_plugin": t.python_plugin, "extra_plugins": t.extra_plugins, "port": env.get("PORT")}
            if kind == "wsgi":
                v.update(socket=nginx_socket(t, n, t.slot) if t.names else None,
                         check_socket=None if t.names else os.path.join(slot_dir(t, t.slot), f"wsgi.{n}.sock"))
            if kind == "web" and t.slot:
                v["env"]["PORT"] = str(t.ports["web"][t.slot][n - 1])
            if kind.startswith("cron"):
                v["cron"], v["command"] = plan_original_cron(t.workers[kind])
            text = render_original_vassal(v)
            for folder in (p.uwsgi_available, p.uwsgi_enabled):
                files[os.path.join(folder, vassal_name(app, kind, n))] = (text, 0o644)
    files[os.path.join(p.envs, app, "ENV")] = (render_original_env(config), 0o600)
    files[os.path.join(p.envs, app, "LIVE_ENV")] = (render_original_env(original_env(t)), 0o600)
    files[os.path.join(p.envs, app, "SCALING")] = (render_scaling(t.scaling), 0o600)
    conf = os.path.join(p.nginx, f"{app}.conf")
    ours = render_release_files(t, links=False)
    if conf in ours:
        files[conf] = ours[conf]
    return files


def downgrade_app(paths, app, plan):
    """One app in the original's formats; its hooks in any case."""
    step(f"{app}: into the original piku's formats")
    if plan:
        t, files = plan
        if t.release.venv:
            build_original_venv(t)
        checkout_for_original(t)
        switch_to_original(t, files)
        for name in ("live.json", "ports.json", "rev"):  # (a later switch to piku.py starts afresh)
            remove_path(os.path.join(paths.state, app, name))
    hooks = os.path.join(paths.repos, app, "hooks")
    write_atomic(os.path.join(hooks, "post-receive"), render_original_hook(os.path.abspath(__file__), paths.root, app),
                 mode=0o755)
    remove_path(os.path.join(hooks, "pre-receive"))


def build_original_venv(t):
    """envs/<app> as a virtualenv of its own (the original runs workers and pip in it): the
    live release's Python and packages (from uv's cache where it has them), and its scripts."""
    import tempfile
    import types
    envdir = os.path.join(t.paths.envs, t.app)
    for name in os.listdir(envdir):  # piku.py's links into the live virtualenv
        path = os.path.join(envdir, name)
        if os.path.islink(path) and (name == ".live" or os.readlink(path).startswith(".live")):
            os.unlink(path)
    live = os.path.join(t.release.venv, "bin", "python")
    env = build_env(t.paths, t.app, t.settings, os.environ)
    uv = find_uv(env, os.environ)
    freeze = capture([uv, "pip", "freeze", "--python", live] if uv else [live, "-m", "pip", "freeze"], env=env)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("".join(l + "\n" for l in freeze.splitlines() if l.strip() and not l.startswith("-e ")))
        f.flush()
        if uv:
            run([uv, "venv", "--quiet", "--allow-existing", "--seed", "--python", live, envdir], env=env, capture=True)
            run([uv, "pip", "install", "--quiet", "--python", os.path.join(envdir, "bin", "python"), "-r", f.name],
                env=env, capture=True)
        else:
            run([sys.executable, "-m", "virtualenv", "--quiet", "--python", live, envdir], env=env, capture=True)
            run([os.path.join(envdir, "bin", "python"), "-m", "pip", "install", "-q", "-r", f.name], env=env,
                capture=True)
    install_entry_points(types.SimpleNamespace(release_dir=t.release.dir, venv=envdir, paths=t.paths, app=t.app))
    count = len(freeze.splitlines())
    detail(f"envs/{t.app}: a virtualenv of its own, Python {t.release.python}, {count} package{'s' * (count != 1)}")


def checkout_for_original(t):
    """apps/<app> as the original keeps it: a clone of the app's repo at the live revision
    holding the live release's files (what a build made too), swapped in for the link."""
    import shutil
    link, repo = os.path.join(t.paths.apps, t.app), os.path.join(t.paths.repos, t.app)
    tmp = os.path.join(t.paths.apps, f".{t.app}.piku-downgrade")
    remove_path(tmp)
    env = clean_env(os.environ)
    run(["git", "clone", "--quiet", "--no-checkout", repo, tmp], env=env, capture=True)
    shutil.copytree(t.release.dir, tmp, symlinks=True, dirs_exist_ok=True)
    if t.release.rev:
        run(["git", "-C", tmp, "reset", "--quiet", t.release.rev], env=env, capture=True)
    try:
        exchange_paths(tmp, link)
        os.unlink(tmp)  # (the link, now)
    except OSError:
        os.unlink(link)
        os.rename(tmp, link)


def switch_to_original(t, files):
    """The original's workers start beside piku.py's (serving ones on the other slot's sockets
    or ports) and must answer; nginx moves to them; then piku.py's stop. Others restart in place."""
    p, app = t.paths, t.app
    ours = [n for n in vassals_of(p, app) if os.path.join(p.uwsgi_enabled, n) not in files]
    tx = Transaction(p, app)
    conf = os.path.join(p.nginx, f"{app}.conf")
    if t.slot:
        private_dir(slot_dir(t, t.slot))  # (the private check sockets of wsgi workers)
    try:
        checks = []
        for path, (text, mode) in files.items():
            kind, n, _ = parse_vassal_name(app, os.path.basename(path)) or (None, 0, None)
            if kind and serving(kind) and os.path.dirname(path) == p.uwsgi_enabled:
                if kind == "wsgi":
                    remove_path(nginx_socket(t, n, t.slot))  # (a socket a killed worker left)
                checks.append(log_check(t, kind, n, t.slot if kind == "wsgi" or t.names else None))
            if path != conf:
                tx.write(path, text, mode)
        nudge_emperor(p)
        failure = health_check(t, checks)
        if failure:
            raise PikuError(failure_message(t, failure, checks=checks))
        quiesce = wait_for_nginx(t, tx, files.get(conf, (None,))[0])
        if quiesce:
            nginx_drained(*quiesce, quiesced=True)
        wait_masters_gone(stop_gracefully(p, ours, tx))
    except BaseException:
        tx.rollback()
        nudge_emperor(p)
        raise
    tx.commit()


# === 24. Git and SSH plumbing ===

def plan_push(updates, deploy_branch):
    """Which pushed ref to deploy. updates: [(old, new, ref)]. Returns (new, ref) or None;
    raises for pushes piku must refuse. Only one branch is ever deployed per push."""
    branches = [(old, new, ref) for old, new, ref in updates if ref.startswith("refs/heads/")]
    if deploy_branch:
        for old, new, ref in branches:
            if ref == deploy_branch:
                if set(new) == {"0"}:
                    raise PikuError(f"refusing to delete {ref}: it is the deployed branch")
                return new, ref
        return None
    live = [(o, n, r) for o, n, r in branches if set(n) != {"0"}]
    if len(live) == 1:
        return live[0][1], live[0][2]
    for preferred in ("refs/heads/main", "refs/heads/master"):
        for old, new, ref in live:
            if ref == preferred:
                return new, ref
    if live:
        raise PikuError("several branches pushed to a new app: push the one to deploy first "
                        "(e.g. `git push piku main`)")
    return None


def deploy_branch_of(paths, app):
    text = read_text(os.path.join(paths.state, app, "branch"))
    return text.strip() if text and text.strip().startswith("refs/heads/") else None


def record_deploy_branch(paths, app, ref, rev):
    """The branch piku deploys, and the revision of it that is live."""
    ensure_dirs(os.path.join(paths.state, app))
    write_atomic(os.path.join(paths.state, app, "rev"), rev + "\n")
    write_atomic(os.path.join(paths.state, app, "branch"), ref + "\n", only_if_changed=True)
    write_atomic(os.path.join(paths.repos, app, "HEAD"), f"ref: {ref}\n", only_if_changed=True)


def ensure_repo(paths, app):
    """Bare repo for app (made on first push) with piku's pre-receive hook."""
    repo = os.path.join(paths.repos, app)
    if not os.path.isdir(repo):
        ensure_dirs(paths.repos)
        run(["git", "init", "--quiet", "--bare", repo], capture=True)
    hooks = os.path.join(repo, "hooks")
    ensure_dirs(hooks)
    write_atomic(os.path.join(hooks, "pre-receive"),
                 render_git_hook(sys.executable, os.path.abspath(__file__), paths.root, app),
                 mode=0o755, only_if_changed=True)
    legacy = os.path.join(hooks, "post-receive")
    if "git-hook" in (read_text(legacy) or ""):
        os.unlink(legacy)  # the original deployed after accepting the push; we deploy before
    return repo


def git_hook(paths, app, lines, environ):
    """pre-receive: build and deploy the pushed revision before git accepts it."""
    updates = []
    for line in lines:
        parts = line.split(" ")  # `old new ref`: a ref name has no spaces, but may have other blanks
        if len(parts) == 3:
            updates.append(tuple(parts))
    with AppLock(paths, app):
        target = plan_push(updates, deploy_branch_of(paths, app))
        if target is None:
            current = deploy_branch_of(paths, app) or "the first branch you push"
            step(f"Stored without deploying: {app} deploys {current}")
            return
        rev, ref = target
        old = next(o for o, n, r in updates if r == ref)
        # The revision this push builds on must be the one live now. If another push went live
        # while this one waited for the lock, git would refuse to move the ref after we
        # deployed (and the ref update of that push may still be in flight, so the live
        # revision piku recorded is what counts, not the ref).
        expected = "" if set(old) == {"0"} else old
        live = (read_text(os.path.join(paths.state, app, "rev")) or "").strip() \
            or current_ref_value(paths, app, ref, environ)
        if live != expected and not ref_settles(paths, app, ref, live, expected, environ):
            raise PikuError(f"{ref} was updated by another push while this one waited: "
                            "`git pull` (or fetch and rebase) and push again")
        deploy(paths, app, rev, ref.replace("refs/heads/", ""), environ)
        record_deploy_branch(paths, app, ref, rev)


def ref_settles(paths, app, ref, live, expected, environ, wait=10.0):
    """The live revision is not the one this push builds on. Wait for the ref update of the
    push that put it live (git moves the ref after the hook); True if the ref then still is at
    `expected` (that update failed, so this push may go on), False if it moved."""
    import time
    deadline = time.monotonic() + wait
    while current_ref_value(paths, app, ref, environ) != live and time.monotonic() < deadline:
        time.sleep(0.1)
    return current_ref_value(paths, app, ref, environ) == expected


def current_ref_value(paths, app, ref, environ):
    """The ref's value in the app's repo now ('' when it does not exist yet)."""
    proc = run(["git", "--git-dir", os.path.join(paths.repos, app), "rev-parse", "--verify", "-q", ref],
               env=clean_env(environ), capture=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def head_rev(paths, app):
    ref = deploy_branch_of(paths, app) or "HEAD"
    proc = run(["git", "--git-dir", os.path.join(paths.repos, app), "rev-parse", "--verify", "-q",
                ref + "^{commit}"], capture=True, check=False, env=clean_env(os.environ))
    if proc.returncode != 0:
        raise PikuError(f"{app} has no pushed revision yet: git push to it first")
    return proc.stdout.strip(), ref


def authorized_keys_path():
    return os.path.join(os.path.expanduser("~"), ".ssh", "authorized_keys")


def read_authorized_keys():
    """(text, [(line index, AuthorizedKey)]) of ~/.ssh/authorized_keys ('' if there is none)."""
    text = read_text(authorized_keys_path(), "")
    return text, [(i, k) for i, k in enumerate(map(parse_key_line, split_key_lines(text))) if k]


def ssh_keygen_fingerprint(key_line):
    """ssh-keygen's opinion of one public key line: its `-l` line, or a PikuError."""
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".pub") as f:
        f.write(key_line + "\n")
        f.flush()
        proc = run(["ssh-keygen", "-l", "-f", f.name], capture=True, check=False)
    if proc.returncode != 0:
        raise PikuError("ssh-keygen rejected the key: " + (proc.stderr or proc.stdout).strip())
    return proc.stdout.strip()


def add_ssh_key(key_text, paths):
    """Validate a public key with ssh-keygen and append it once to ~/.ssh/authorized_keys."""
    lines = [l.strip() for l in split_lines(key_text) if l.strip() and not l.startswith("#")]
    if len(lines) != 1:
        raise PikuError("expected exactly one public key line")
    if not " ".join(lines[0].split()).isprintable():  # (any blank, \u2028 too, becomes one space)
        raise PikuError("the public key line has control characters")
    key = parse_key_line(lines[0]) if KEY_TYPE_RE.fullmatch(lines[0].split()[0]) else None
    if key is None:
        raise PikuError("not a public key: expected 'type base64 [comment]' (options are not allowed)")
    fp = ssh_keygen_fingerprint(lines[0])
    with AppLock(paths, "_keys"):  # (not an app name: those start with a letter or digit)
        existing, keys = read_authorized_keys()
        if any(k.fingerprint == key.fingerprint for _, k in keys):
            return fp, False
        ensure_dirs(os.path.dirname(authorized_keys_path()))
        os.chmod(os.path.dirname(authorized_keys_path()), 0o700)
        line = render_authorized_key(sys.executable, os.path.abspath(__file__), paths.root,
                                     " ".join(lines[0].split()))
        write_atomic(authorized_keys_path(), existing + ("" if existing.endswith("\n") or not existing else "\n")
                     + line, mode=0o600)
    return fp, True


def remove_ssh_key(paths, wanted, force=False):
    """keys:remove: drop the lines of one key piku added; every other line stays byte for byte.
    Returns (the key, how many lines held it)."""
    with AppLock(paths, "_keys"):
        text, keys = read_authorized_keys()
        drop, key = plan_key_removal(keys, wanted, force)
        kept = "".join(l for i, l in enumerate(split_key_lines(text)) if i not in drop)
        write_atomic(authorized_keys_path(), kept, mode=0o600)
    return key, len(drop)


# === 25. Logs ===

def log_files(paths, app, process=None):
    d = os.path.join(paths.logs, app)
    names = sorted(n for n in os.listdir(d) if n.endswith(".log")) if os.path.isdir(d) else []
    if process:
        names = [n for n in names if n[:-4] == process or n.split(".")[0] == process]
    else:  # the processes' logs; nginx's are shown by `logs APP nginx`
        names = [n for n in names if n not in NGINX_LOG_FILES]
    return [os.path.join(d, n) for n in names]


def print_logs(paths, app, process, lines, follow):
    """The last `lines` lines of each worker (or of one kind / kind.N), after the worker's name;
    then, with follow, new lines of all of them as they come."""
    import time
    files = log_files(paths, app, process)
    if not files and not follow:
        raise PikuError(f"no logs for {app}" + (f" process {process}" if process else ""))
    offsets = {}
    for path in files:
        name = os.path.basename(path)[:-4]
        text = read_text(path, "")
        for line in text.splitlines()[-lines:] if lines else []:
            click.echo(f"{name} | {line}")
        offsets[path] = len(text.encode("utf-8", "surrogateescape"))
    partial = {}
    while follow:  # every worker's new lines, interleaved as they are written
        time.sleep(0.5)
        for path in log_files(paths, app, process):
            size, start = os.path.getsize(path), offsets.get(path, 0)
            start = 0 if size < start else start  # rotated
            if size > start:
                with open(path, "rb") as f:
                    f.seek(start)
                    chunk = partial.pop(path, b"") + f.read(size - start)
                *done, partial[path] = chunk.split(b"\n")  # a line being written waits
                for line in done:
                    click.echo(f"{os.path.basename(path)[:-4]} | {line.decode('utf-8', 'replace')}")
            offsets[path] = size


def running_workers():
    """{'app:kind.n': pids of its uWSGI master's children} for every vassal master running
    (found by process title) as this user: another user's process may take any title. A
    master with no child runs nothing (its daemon is down). The original piku's masters name
    no instance: those of one kind are numbered 1, 2, ... in the order found."""
    out, unnumbered = {}, {}
    for pid, cmdline in own_processes():
        name, numbered = parse_master_title(cmdline[0].decode("utf-8", "replace"))
        if name:
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    children = f.read().split()
            except OSError:
                children = ["?"]  # no way to tell: count the master alone
            if not numbered:
                unnumbered[name] = unnumbered.get(name, 0) + 1
                name = f"{name}.{unnumbered[name]}"
            out.setdefault(name, []).extend(children)
    return out


def running_emperor():
    """pid of the uWSGI emperor of this user's running vassals (their masters' parent), or None."""
    for pid, cmdline in own_processes():
        if not parse_master_title(cmdline[0].decode("utf-8", "replace"))[0]:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = f.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{parent}/cmdline", "rb") as f:
                if b"uwsgi" in f.read():
                    return int(parent)
        except (OSError, ValueError, IndexError):
            continue
    return None


def worker_crashing(paths, app, worker, recent=60):
    """Does the worker's log, written to in the last `recent` seconds, end in a crash loop?"""
    import time
    path = os.path.join(paths.logs, app, f"{worker}.log")
    try:
        if time.time() - os.stat(path).st_mtime > recent:
            return False
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            tail = f.read().decode("utf-8", "replace").splitlines()[-30:]
    except OSError:
        return False
    return crash_looping("\n".join(tail))


def worker_up(running, name, kind):
    """Is the worker really running? Its master, and (but for cron, whose jobs come and go)
    something under it: the daemon, or the wsgi workers."""
    return name in running and (kind.startswith("cron") or bool(running[name]))


# === 26. CLI: the commands developers run ===

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 120, "terminal_width": 120}
BUILD_KEYS_RE = re.compile(r"(PYTHON_VERSION|UV_\w+|PATH|PIKU_PYUWSGI|PIKU_USE_UV|NODE_VERSION|NODE_PACKAGE_MANAGER|NODE_ENV|NPM_CONFIG_\w+|npm_config_\w+|BUNDLE_\w+)")


def P():
    return paths_for(default_root())


class CommandTable:
    """The server's commands: filled by @cli.command when the module loads, made into a click
    group by build_cli() only when a command line needs click (not for the internal commands
    git and uWSGI run on every push and worker start: FAST_COMMANDS)."""

    def __init__(self):
        self.specs, self.extra, self.group = {}, [], None

    def command(self, name=None, **kwargs):
        def decorate(f):
            self.specs[name or f.__name__] = (f, kwargs)
            return f
        return decorate

    @property
    def commands(self):
        """{name: spec} with the `hidden` flag of each (plugins' commands included)."""
        out = {n: namedtuple("Spec", "name hidden")(n, bool(kw.get("hidden"))) for n, (_, kw) in self.specs.items()}
        return out | {c.name: c for c in self.extra}

    def add_command(self, cmd):
        self.extra.append(cmd)
        if self.group is not None:
            self.group.add_command(cmd)

    def main(self, **kwargs):
        return build_cli().main(**kwargs)


cli = CommandTable()


def _cli_root(ctx):
    """piku.py: git push deploys; these commands manage apps."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def build_cli():
    """The click group of every command (made once, on first use)."""
    import click as real
    if cli.group is None:
        made = lambda v: v.made(real) if isinstance(v, _Later) else v  # noqa: E731
        group = real.group(context_settings=CONTEXT, invoke_without_command=True)(
            real.version_option(__version__, "--version", prog_name="piku.py")(real.pass_context(_cli_root)))
        for name, (f, kwargs) in cli.specs.items():
            for what, args, kw in f.__dict__.get("_piku_click", []):  # (in the order they ran)
                f = real.pass_context(f) if what == "pass_context" else getattr(real, what)(
                    *[made(a) for a in args], **{k: made(v) for k, v in kw.items()})(f)
            group.add_command(real.command(name, **kwargs)(f))
        for cmd in cli.extra:
            group.add_command(cmd)
        cli.group = group
    return cli.group


@cli.command("apps")
def cmd_apps():
    """List apps; running ones are marked with *, those in maintenance mode say so."""
    paths = P()
    for app in known_apps(paths):
        click.echo(("* " if vassals_of(paths, app) else "  ") + app
                   + (" (maintenance)" if read_maintenance(paths, app) else ""))


@cli.command("config")
@click.argument("app")
def cmd_config(app):
    """Show the settings set with config:set."""
    paths = P()
    click.echo(render_env(load_config(paths, app_must_exist(paths, app))), nl=False)


@cli.command("config:get")
@click.argument("app")
@click.argument("key")
def cmd_config_get(app, key):
    """Print one setting's value (from config:set, else the live environment)."""
    paths = P()
    app = app_must_exist(paths, app)
    config = load_config(paths, app)
    value = config.get(key, load_live_env(paths, app).get(key))
    if value is None:
        raise PikuError(f"{key} is not set for {app}")
    click.echo(value)


@cli.command("config:set", context_settings={"ignore_unknown_options": True})
@click.argument("app")
@click.argument("settings", nargs=-1, required=True)
def cmd_config_set(app, settings):
    """Set KEY=VALUE settings and restart the app with them."""
    paths = P()
    app = app_must_exist(paths, app)
    changes = parse_assignments(settings)
    apply_config(paths, app, lambda config: {**config, **changes}, set(changes))


@cli.command("config:unset")
@click.argument("app")
@click.argument("keys", nargs=-1, required=True)
def cmd_config_unset(app, keys):
    """Remove settings and restart the app without them."""
    paths = P()
    app = app_must_exist(paths, app)
    for key in keys:
        if not ENV_KEY_RE.fullmatch(key):
            raise PikuError(f"invalid key {key!r}")
    present = set(load_config(paths, app))
    for key in sorted(set(keys) - present):
        detail(f"{key}: not set with config:set, nothing to remove")
    if not present & set(keys):
        step(f"Nothing to change: {app} keeps running as it is")
        return
    apply_config(paths, app, lambda config: {k: v for k, v in config.items() if k not in keys},
                 set(keys) & present)


def apply_config(paths, app, change, keys):
    """Validate, save and apply a config change under the app lock (restored if it fails)."""
    with AppLock(paths, app):
        old = load_config(paths, app)
        config_file = os.path.join(paths.envs, app, "ENV")
        old_text = read_text(config_file)
        new = change(old)
        settings = live_settings(paths, app, check=False, config=new)  # (with the repo's ENV too)
        validate_settings({k: settings[k] for k in new}, "config:set")
        check_app_paths(live_release(paths, app), None, {k: settings[k] for k in new})
        served_names(settings)
        write_config(paths, app, new)
        for key in sorted(keys):
            detail(f"{key}: {'set' if key in new else 'unset'}")
        try:
            if any(BUILD_KEYS_RE.fullmatch(k) for k in keys) and live_release(paths, app):
                step("A build setting changed: redeploying")
                rev, ref = redeploy_rev(paths, app)
                deploy(paths, app, rev, ref, os.environ)
            elif reconfigure(paths, app, os.environ):
                if setting_bool(live_settings(paths, app), "PIKU_AUTO_RESTART"):
                    step(f"Restarted {app} with the new settings")
                else:
                    step(f"Saved; PIKU_AUTO_RESTART is false, so {app} runs with the old settings until `restart`")
        except PikuError:
            if old_text is None:  # (no config file before: none after)
                remove_path(config_file)
            else:
                write_atomic(config_file, old_text, mode=0o600)
            raise


@cli.command("config:export")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="A JSON object instead of ENV lines.")
def cmd_config_export(app, as_json):
    """Print the config:set settings (ENV lines or JSON) for config:import; holds secrets."""
    import json
    paths = P()
    config = load_config(paths, app_must_exist(paths, app))
    click.echo(json.dumps(config, indent=2) + "\n" if as_json else render_env(config), nl=False)


@cli.command("config:import")
@click.argument("app")
@click.option("--replace", is_flag=True, help="Also unset the settings the input does not have.")
def cmd_config_import(app, replace):
    """Set the settings read from stdin (ENV lines or JSON) together: one restart."""
    paths = P()
    app = app_must_exist(paths, app)
    if sys.stdin.isatty():
        raise PikuError("config:import reads the settings from stdin: config:import APP < settings.env", 2)
    incoming = parse_config_import(sys.stdin.read(1_000_001))  # (more is refused)
    change = lambda config: {**({} if replace else config), **incoming}  # noqa: E731
    keys = plan_config_changes(load_config(paths, app), change(load_config(paths, app)))
    if not keys:
        step(f"Nothing to change: {app} already has these settings")
        return
    apply_config(paths, app, change, set(keys))


@cli.command("config:live")
@click.argument("app")
def cmd_config_live(app):
    """Show the environment the app's processes run with."""
    paths = P()
    app = app_must_exist(paths, app)
    text = read_text(os.path.join(paths.envs, app, "LIVE_ENV"))
    if text is None:
        raise PikuError(f"{app} has not been deployed yet")
    click.echo(text, nl=False)


@cli.command("deploy")
@click.argument("app")
def cmd_deploy(app):
    """Rebuild and redeploy the app's live revision (the last pushed one if none is live)."""
    paths = P()
    app = app_must_exist(paths, app)
    with AppLock(paths, app):
        rev, ref = redeploy_rev(paths, app)
        deploy(paths, app, rev, ref, os.environ)


def redeploy_rev(paths, app):
    """(revision, branch) of the live release (after a rollback: the one rolled back to), else
    the deployed branch's head."""
    live = live_record(paths, app)
    if live and live.rev:
        return live.rev, live.ref or ""
    rev, ref = head_rev(paths, app)
    return rev, ref.replace("refs/heads/", "")


@cli.command("releases")
@click.argument("app")
def cmd_releases(app):
    """List the app's releases, newest first: which is live, which a rollback can go to."""
    import time
    paths = P()
    app = app_must_exist(paths, app)
    records = load_manifest(paths, app)
    if not records:
        click.echo(f"{app} has no release history yet (it starts with the next push)")
        return
    for r in records:
        click.echo(render_release_line(r, time.localtime(r.get("created") or 0)))


def render_release_line(r, tm):
    """One line of `releases` (pure)."""
    import time
    status = r.get("status") or "?"
    if status == "failed":
        status = f"failed: {r.get('reason') or 'unknown'}"
    if r.get("rollback_of") and r.get("status") == "live":
        status += f" (rollback from {r['rollback_of']})"
    disk = f"{(r.get('code_kb') or 0) / 1024:.1f}M code" + (
        f" + {(r.get('venv_kb') or 0) / 1024:.1f}M venv" if r.get("venv_kb") else (" (venv shared)" if r.get("venv") else ""))
    return "  ".join([r["id"], f"{r.get('ref') or '?'}@{str(r.get('rev') or '?')[:10]}",
                      time.strftime("%Y-%m-%d %H:%M", tm), f"py {r.get('python') or '-'}",
                      (r.get("fingerprint") or "-")[:10], disk, status])


@cli.command("rollback")
@click.argument("app")
@click.argument("release", required=False)
def cmd_rollback(app, release):
    """Switch back to an earlier release (default: the one that served before the live one)."""
    paths = P()
    app = app_must_exist(paths, app)
    with AppLock(paths, app):
        rollback(paths, app, release, os.environ)


@cli.command("destroy")
@click.argument("app")
@click.option("--confirm", metavar="APP", help="The app's name once more: confirms without a prompt.")
@click.option("--force", is_flag=True, help="Do not ask for confirmation (scripts).")
def cmd_destroy(app, confirm, force):
    """Remove an app (code, repo, env, logs, workers, nginx); keeps data/ and cache/."""
    paths = P()
    app = app_must_exist(paths, app)
    confirm_destroy(app, confirm, force)
    with AppLock(paths, app):
        removed = destroy_app(paths, app)
    step(f"Destroyed {app}")
    for path in removed:
        detail(f"removed {path}")
    for kept in (os.path.join(paths.data, app), os.path.join(paths.cache, app)):
        if os.path.exists(kept):
            detail(f"kept {kept} (delete it yourself if you no longer need it)")


def confirm_destroy(app, confirm, force):
    """destroy cannot be undone: it needs the app's name typed again (--confirm APP, or at a
    prompt when stdin is a terminal) or --force. Without a terminal (a script, ssh without -t)
    the error names the flags."""
    if force:
        return
    if confirm is None and sys.stdin.isatty():
        confirm = click.prompt(f"This removes {app} for good (data/{app} is kept). Type the app's name "
                               "to confirm", default="", show_default=False, err=True)
    if confirm is None:
        raise PikuError(f"destroy removes {app} for good: confirm with `destroy {app} --confirm {app}` "
                        "(or --force); nothing was removed", 2)
    if confirm.strip() != app:
        raise PikuError(f"{confirm.strip()[:60]!r} is not {app!r}: nothing was removed")


@cli.command("backup")
@click.argument("app", required=False)
@click.option("--all", "every", is_flag=True, help="Every app: one tar of APP.tar.gz archives (unpack it with tar x).")
def cmd_backup(app, every):
    """Write a tar.gz of the app to stdout (repo, settings, scaling, data, TLS): backup APP > APP.tar.gz."""
    paths = P()
    if bool(app) == every:
        raise PikuError("backup takes an app or --all: backup APP > APP.tar.gz, backup --all > apps.tar", 2)
    app = app and app_must_exist(paths, app)
    if sys.stdout.isatty():
        raise PikuError(f"backup writes an archive to stdout: redirect it (backup {app or '--all'} > FILE)", 2)
    warn("the archive holds " + (f"{app}'s" if app else "the apps'") + " secrets (config:set values, TLS keys) "
         "and data: keep it private")
    try:
        with ArchiveStdout() as out:
            if app:
                backup_app(paths, app, out, os.environ)
            failed = backup_all(paths, out, os.environ) if every else []
            if failed:
                raise PikuError(f"backup --all: {', '.join(failed)} failed (see above); the other apps are in the stream")
            step(f"Backup of {app or 'every app'} written")
    except OSError as e:  # (stdout closed by its reader, a full disk...)
        raise PikuError(f"backup failed: {e.strerror or e}; the archive is not complete")


class ArchiveStdout:
    """For a command whose stdout is an archive: `with ArchiveStdout() as out` gives the binary
    stream to write it to, and everything else written to stdout meanwhile (piku's lines, a
    backup command's output) goes to stderr."""

    def __enter__(self):
        sys.stdout.flush()
        self.saved = os.dup(1)
        os.dup2(2, 1)
        self.out = os.fdopen(os.dup(self.saved), "wb")
        return self.out

    def __exit__(self, *exc):
        try:
            self.out.close()
        finally:
            sys.stdout.flush()
            os.dup2(self.saved, 1)
            os.close(self.saved)


@cli.command("restore")
@click.argument("app")
@click.option("--force", is_flag=True, help="Replace the app if it exists (the data it had is kept aside).")
def cmd_restore(app, force):
    """Recreate an app from a backup on stdin and deploy it: restore APP < APP.tar.gz."""
    paths = P()
    app = parse_app_name(app)
    if sys.stdin.isatty():
        raise PikuError(f"restore reads a backup from stdin: restore {app} < {app}.tar.gz", 2)
    restore_app(paths, app, sys.stdin.buffer, force, os.environ)


@cli.command("logs")
@click.argument("app")
@click.argument("process", required=False)
@click.option("-n", "lines", default=50, show_default=True, help="lines per worker to show")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
def cmd_logs(app, process, lines, follow):
    """Show the app's worker logs (all workers, or one kind / kind.N; `nginx`: its nginx logs)."""
    paths = P()
    print_logs(paths, app_must_exist(paths, app), process, max(0, lines), follow)


@cli.command("ps")
@click.argument("app")
def cmd_ps(app):
    """Show each worker kind's configured count and how many are running."""
    import time
    paths = P()
    app = app_must_exist(paths, app)
    scaling = load_scaling(paths, app)
    running = running_workers()
    enabled = {parsed[:2] for parsed in map(lambda n: parse_vassal_name(app, n), vassals_of(paths, app)) if parsed}
    for kind, count in scaling.items():
        if not kind_of(kind).vassal:  # (the original piku's SCALING counts static: 1)
            continue
        crashing = [n for n in range(1, count + 1) if (kind, n) in enabled
                    and worker_crashing(paths, app, f"{kind}.{n}")]
        up = sum(1 for n in range(1, count + 1)
                 if worker_up(running, f"{app}:{kind}.{n}", kind) and n not in crashing)
        on = sum(1 for n in range(1, count + 1) if (kind, n) in enabled)
        state = "stopped" if on == 0 else ("running" if up == count else "starting")
        if crashing:
            state = f"crashing: it keeps exiting and is restarted, see `logs {app} {kind}`"
        click.echo(f"{kind}: {count} configured, {up} running ({state})")
    release = live_release(paths, app)
    static = read_procfile(release)[0].get("static") if release else None
    if static:
        click.echo(f"static: {static}/ served by nginx (no process)")
    elif not scaling:
        click.echo("no processes" + ("" if release else f": {app} has not been deployed yet"))
    maintenance = read_maintenance(paths, app)
    if maintenance:
        click.echo(f"maintenance: on since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(maintenance.get('since') or 0))}"
                   + {"release": " (while the release command runs)"}.get(maintenance.get("by"), "")
                   + (f", page {maintenance['page']}" if maintenance.get("page") else "")
                   + ": nginx answers 503 for the app's names")


def live_settings(paths, app, check=True, config=None):
    """The settings the live release runs with (repo ENV < config), without building; with
    `config`, those it would run with with that config instead."""
    release = live_release(paths, app)
    base = env_file_base(paths, app, os.environ)
    repo_env = read_repo_env(paths, app, release, base)
    settings = merge_settings(repo_env, load_config(paths, app) if config is None else config, base)
    return validate_settings(settings) if check else settings


@cli.command("certs")
@click.argument("app", required=False)
def cmd_certs(app):
    """Show each app's TLS certificate: names, where it came from, expiry."""
    import time
    paths = P()
    apps = [app_must_exist(paths, app)] if app else known_apps(paths)
    for name in apps:
        crt = cert_paths(paths, name)[0]
        if not os.path.exists(crt):
            continue
        record = read_cert_record(paths, name) or {"source": "provided by the admin"}
        until = record.get("not_after") or cert_not_after(read_text(crt, ""))
        click.echo(f"{name}: {', '.join(record.get('names') or ['?'])} ({record['source']}"
                   + (f" from {record['ca']}" if record.get("ca") else "")
                   + (f", valid until {time.strftime('%Y-%m-%d', time.gmtime(until))}" if until else "")
                   + ")")


@cli.command("certs:renew")
@click.argument("app", required=False)
@click.option("--force", is_flag=True, help="Ask the CA even when the certificate is not due.")
def cmd_certs_renew(app, force):
    """Get or renew ACME certificates (all apps, or APP); run daily from cron or a timer."""
    paths = P()
    failed, broken = 0, []
    for name in [app_must_exist(paths, app)] if app else known_apps(paths):
        try:
            failed += renew_certificate(paths, name, force) is False
        except PikuError as e:
            if app:
                raise
            warn(f"app {name}: {e} (skipped; the other apps go on)")
            broken.append(name)
    if app and failed:
        raise PikuError(f"{app}: no ACME certificate (see the lines above)")
    if broken:
        raise PikuError(f"not renewed: {', '.join(broken)} (see the lines above)")


def renew_certificate(paths, app, force):
    """certs:renew for one app: True (an ACME certificate is valid), False (none could be got),
    None (not piku's to renew: no names, or the admin's certificate)."""
    settings = live_settings(paths, app)
    if not split_names(settings.get("NGINX_SERVER_NAME", "")):
        return None
    cap_nginx_logs(paths, app, setting_int(settings, "NGINX_LOG_MAXSIZE"))  # (the daily job)
    if read_cert_record(paths, app) is None and os.path.exists(cert_paths(paths, app)[0]):
        detail(f"{app}: certificate provided by the admin, left as it is")
        return None
    with AppLock(paths, app):
        record = acme_certificate({"paths": paths, "app": app, "settings": settings}, force=force)
    if record and record.get("source") == "acme":
        detail(f"{app}: certificate valid (from {record['ca']})")
        return True
    return False


@cli.command("ps:scale")
@click.argument("app")
@click.argument("settings", nargs=-1, required=True)
def cmd_ps_scale(app, settings):
    """Set worker counts: KIND=N ...; the changed kinds start, are checked, then take over."""
    paths = P()
    app = app_must_exist(paths, app)
    with AppLock(paths, app):
        release = live_record(paths, app)
        if not release:
            raise PikuError(f"{app} has not been deployed yet")
        workers, _ = read_procfile(release.dir)
        behind_nginx = bool(split_names(live_settings(paths, app).get("NGINX_SERVER_NAME", "")))
        kinds = {k for k in workers if kind_of(k).vassal}
        changes = parse_scale_args(settings, kinds, behind_nginx)
        scaling = {**plan_scaling(workers, load_scaling(paths, app), behind_nginx), **changes}
        reconfigure(paths, app, os.environ, "scale", scaling)
    for kind, n in changes.items():
        detail(f"{kind}: {n}")


@cli.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("app")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
def cmd_run(app, cmd):
    """Run a command in the app's directory with its live environment."""
    paths = P()
    app = app_must_exist(paths, app)
    # `run APP -- cmd ...`, and the original piku's `run APP ls -- -al` (its click ate the `--`)
    cmd = cmd[1:] if cmd[:1] == ("--",) else (cmd[:1] + cmd[2:] if cmd[1:2] == ("--",) else cmd)
    if not cmd:
        raise PikuError("run needs a command: run APP CMD [ARGS]...", 2)
    env = {k: v for k, v in clean_env(os.environ).items() if k in ("LANG", "LC_ALL", "TERM", "TZ")}
    env.update(load_live_env(paths, app))
    cwd = os.path.join(paths.apps, app)
    if not os.path.isdir(cwd):
        raise PikuError(f"{app} has not been deployed yet")
    os.chdir(cwd)
    exe = which(cmd[0], env) or cmd[0]
    try:
        os.execve(exe, list(cmd), env)
    except OSError as e:
        raise PikuError(f"cannot run {cmd[0]!r}: {e.strerror}", 127)


@cli.command("restart")
@click.argument("app")
def cmd_restart(app):
    """Restart (or start) the app's workers."""
    paths = P()
    app = app_must_exist(paths, app)
    with AppLock(paths, app):
        reconfigure(paths, app, os.environ, "restart")
    step(f"Restarted {app}")


@cli.command("maintenance:on")
@click.argument("app")
@click.option("--page", metavar="FILE", help="an HTML file of the app's repository to show (default: a built-in page)")
def cmd_maintenance_on(app, page):
    """nginx answers 503 for the app's names (ACME excepted) until maintenance:off."""
    import time
    paths = P()
    app = app_must_exist(paths, app)
    with AppLock(paths, app):
        switch_maintenance(paths, app, {"page": page, "since": int(time.time()), "by": "maintenance:on"},
                           os.environ)
    step(f"{app} is in maintenance mode: 503" + (f" with {page}" if page else "") + " until maintenance:off")


@cli.command("maintenance:off")
@click.argument("app")
def cmd_maintenance_off(app):
    """Serve the app again after maintenance:on."""
    paths = P()
    app = app_must_exist(paths, app)
    with AppLock(paths, app):
        if not read_maintenance(paths, app):
            step(f"{app} is not in maintenance mode: nothing to change")
            return
        switch_maintenance(paths, app, None, os.environ)
    step(f"{app} is served again")


@cli.command("stop")
@click.argument("app")
def cmd_stop(app):
    """Stop the app's workers (restart starts them again)."""
    paths = P()
    app = app_must_exist(paths, app)
    with AppLock(paths, app):
        names, fifos = stop_app(paths, app)
        wait_masters_gone(fifos)
        left = wait_workers_gone(app, names)
    if left:
        warn(f"still stopping after 30s: {', '.join(left)} (the emperor stops them; see `ps {app}`)")
    step(f"Stopped {app}" + ("" if names else " (it was not running)"))


def wait_workers_gone(app, vassal_names, timeout=30.0):
    """Wait until the uWSGI masters of these vassals have exited (the emperor notices a removed
    vassal within a second, then stops it gracefully), so `stop` returns when the app is down.
    Returns the workers still running at the timeout."""
    import time
    keys = {f"{app}:{kind}.{n}" for kind, n, _ in filter(None, (parse_vassal_name(app, v) for v in vassal_names))}
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(keys & set(running_workers()))
        if not left or time.monotonic() > deadline:
            return [k.split(":", 1)[1] for k in left]
        time.sleep(0.1)


# === 27. CLI: server setup, keys and the internal commands ===

@cli.command("setup")
@click.option("--write-units", type=click.Path(file_okay=False),
              help="Write the systemd units into this directory instead of printing them.")
def cmd_setup(write_units):
    """Create the PIKU_ROOT tree and the uWSGI emperor config; print (or write) service units."""
    import getpass
    paths = P()
    setup_tree(paths)
    remove_path(os.path.join(paths.state, DOWNGRADED))  # (piku.py is back after a `downgrade`)
    me = os.path.abspath(__file__)
    step(f"piku {__version__} is set up in {paths.root}")
    detail(f"nginx: add `include {paths.nginx}/*.conf;` to the http block of nginx.conf")
    for note in setup_nginx(paths):
        detail(note)
    emperor = running_emperor()
    if emperor and not write_units:
        detail(f"the uWSGI emperor that runs the apps is up already (pid {emperor}): keep the services that "
               "start it, and do not enable piku-uwsgi.service beside it (two emperors would start every "
               "app twice). It reads uwsgi/uwsgi.ini again when it restarts; nothing needs a restart now. "
               "Units for a new server: `setup --write-units DIR` (docs/INSTALL.md)")
        return
    units = render_systemd_units(sys.executable, me, paths, getpass.getuser())
    if write_units:
        ensure_dirs(write_units)
        for name, text in units.items():
            write_atomic(os.path.join(write_units, name), text)
            detail(f"wrote {os.path.join(write_units, name)}")
        detail(f"then: systemctl daemon-reload && systemctl enable --now {' '.join(SYSTEMD_START)}")
        return
    detail("With systemd: `setup --write-units /tmp/piku-units` as this user, then as root copy them "
           f"to /etc/systemd/system and `systemctl enable --now {' '.join(SYSTEMD_START)}`. The units:")
    for name, text in units.items():
        click.echo(f"\n# --- {name}\n{text}", nl=False)
    click.echo("")
    detail("Without systemd, start in the background: as this user, the emperor")
    detail(f"  uwsgi --ini {paths.uwsgi}/uwsgi.ini")
    detail("as root (it signals nginx), the watcher that reloads nginx when nginx/ changes")
    detail(f"  PIKU_ROOT={paths.root} {sys.executable} {me} nginx-watch --pid-file /run/nginx.pid -- nginx -s reload")
    detail(f"and renew certificates daily from this user's crontab: "
           f"`17 3 * * * {sys.executable} {me} certs:renew`")


SYSTEMD_START = ("piku-uwsgi.service", "piku-nginx.path", "piku-certs.timer")


@cli.command("setup:ssh")
@click.argument("keyfile")
def cmd_setup_ssh(keyfile):
    """Authorize a public key (file, or - for stdin) to push and run commands."""
    authorize_key(keyfile)


def authorize_key(keyfile):
    """setup:ssh and keys:add: one public key from a file on the server, or - for stdin."""
    text = sys.stdin.read() if keyfile == "-" else read_text(keyfile)
    if text is None:
        raise PikuError(f"no such key file: {keyfile}")
    fp, added = add_ssh_key(text, P())
    step(("Added key " if added else "Key already present: ") + fp)


@cli.command("keys")
def cmd_keys():
    """List the authorized ssh keys: type, fingerprint, comment."""
    _, keys = read_authorized_keys()
    for _, k in keys:
        click.echo(f"{k.type} {k.fingerprint} {k.comment or '(no comment)'}"
                   + ("" if k.piku else "  [not added by piku: left alone]"))
    if not keys:
        detail(f"no keys in {authorized_keys_path()}")


@cli.command("keys:add")
@click.argument("keyfile", default="-")
def cmd_keys_add(keyfile):
    """Authorize a public key read from stdin (or a file on the server), as setup:ssh does."""
    authorize_key(keyfile)


@cli.command("keys:remove")
@click.argument("key")
@click.option("--force", is_flag=True, help="Remove it even if it is the last key piku has.")
def cmd_keys_remove(key, force):
    """Remove a key by fingerprint (SHA256:...) or comment; never the last one unless --force."""
    removed, lines = remove_ssh_key(P(), key, force)
    step(f"Removed key {removed.fingerprint} {removed.comment}".rstrip()
         + (f" ({lines} lines)" if lines > 1 else ""))


@cli.command("update")
@click.argument("source", required=False)
def cmd_update(source):
    """Replace piku.py with SOURCE (a file or https URL) after checking it runs."""
    if not source:  # the original piku downloaded its own repository's copy: piku.py has none
        raise PikuError("update needs the new piku.py: update FILE, or update https://URL "
                        "(piku.py has no built-in download location)", 2)
    me = os.path.abspath(__file__)
    if source.startswith("https://"):
        import urllib.request
        try:
            with urllib.request.urlopen(source, timeout=60) as resp:
                text = resp.read().decode("utf-8")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise PikuError(f"cannot download {source}: {getattr(e, 'reason', None) or e}; nothing was replaced")
    else:
        text = read_text(source)
        if text is None:
            raise PikuError(f"no such file: {source}")
    tmp, version = stage_piku_file(text, "--version", "piku",
                                   "the new piku.py does not run (`--version` failed); nothing was replaced")
    os.replace(tmp, me)
    step(f"Updated piku.py: {version}")


@cli.command("downgrade")
@click.argument("original", metavar="ORIGINAL_PIKU_PY")
def cmd_downgrade(original):
    """Go back to the original piku: every app in its formats, then ORIGINAL_PIKU_PY in place of this file."""
    downgrade(P(), original, dict(os.environ))


# Internal commands: git and uWSGI call these; they are not for people.

@cli.command("git-receive-pack", hidden=True)
@click.argument("app")
def cmd_git_receive_pack(app):
    git_receive_pack(app)


def git_receive_pack(app):
    """The ssh side of `git push`: the app's repository (made on a first push), then git."""
    paths = P()
    app = parse_app_name(app)
    if app not in known_apps(paths):
        clash = name_clash(app, known_apps(paths))
        if clash:
            raise PikuError(f"app name {app} is refused: with app {clash} it could share worker file "
                            "names (<app>_<kind>.N.ini): choose another name (neither may be the other "
                            "followed by `_`)")
    refuse_when_downgraded(paths)
    setup_tree(paths)
    repo = ensure_repo(paths, app)
    os.execvpe("git", ["git", "receive-pack", repo], clean_env(os.environ) | {"PIKU_ROOT": paths.root})


@cli.command("git-upload-pack", hidden=True)
@click.argument("app")
def cmd_git_upload_pack(app):
    git_upload_pack(app)


def git_upload_pack(app):
    paths = P()
    app = app_must_exist(paths, app)
    os.execvpe("git", ["git", "upload-pack", os.path.join(paths.repos, app)], clean_env(os.environ))


@cli.command("scp", hidden=True, context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def cmd_scp(args):
    """Legacy scp (`scp -O`) to and from an app's data directory, data/<app>/..."""
    paths = P()
    flags, target = parse_scp_args(args)
    data = os.path.realpath(paths.data)
    if os.path.isabs(target) or target.startswith("~"):
        path = os.path.realpath(os.path.expanduser(target))
    else:  # relative to data/ (or, as the original piku did, to the home directory)
        home_rel = os.path.realpath(os.path.join(os.path.expanduser("~"), target))
        path = home_rel if home_rel.startswith(data + os.sep) else os.path.realpath(os.path.join(data, target))
    rel = os.path.relpath(path, data)
    app = rel.split(os.sep)[0]
    if rel.startswith("..") or rel == "." or not APP_NAME_RE.fullmatch(app) \
            or not os.path.isdir(os.path.join(data, app)):
        raise PikuError(f"refused: scp only reaches an app's data directory ({paths.data}/<app>/...)")
    os.execvp("scp", ["scp"] + flags + ["--", path])


@cli.command("git-hook", hidden=True)
@click.argument("app")
def cmd_git_hook(app):
    run_git_hook(app)


def run_git_hook(app):
    paths = P()
    git_hook(paths, parse_app_name(app), split_lines(sys.stdin.read()), dict(os.environ))


def claim_cron_minute(paths, app, worker, now):
    """True for the first call in this minute: uWSGI asks every minute, and again right after a
    restart (a deploy, config:set), so a job due now must not run twice. A marker file per
    minute, created exclusively, also settles a race between an old and a new cron master."""
    import time
    d = os.path.join(paths.state, app, "cron")
    ensure_dirs(d)
    stamp = f"{worker}.{time.strftime('%Y%m%d%H%M', now)}"
    try:
        os.close(os.open(os.path.join(d, stamp), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    for name in os.listdir(d):  # earlier minutes' markers of this job
        if name.startswith(worker + ".") and name != stamp:
            remove_path(os.path.join(d, name))
    return True


@cli.command("exec-worker", hidden=True)
@click.option("--if-due", is_flag=True)
@click.option("--at-start", is_flag=True)
@click.option("--dir", "release_dir", help="the release directory the worker runs in")
@click.option("--env", "env_file", help="the environment file the worker gets")
@click.option("--port", type=int, help="PORT of this instance (web instances behind nginx)")
@click.option("--uwsgi", "inner", help="the inner ini of a pyuwsgi worker")
@click.argument("app")
@click.argument("kind")
@click.argument("index", type=int)
def cmd_exec_worker(app, kind, index, if_due, at_start, release_dir, env_file, port, inner):
    exec_worker(app, kind, index, if_due, at_start, release_dir, env_file, port, inner)


def parse_exec_worker_args(args):
    """exec-worker's arguments (as its click command takes them, parsed without click: it runs
    at every worker start) -> keyword arguments of exec_worker."""
    out = {"if_due": False, "at_start": False, "release_dir": None, "env_file": None, "port": None, "inner": None}
    names = {"--dir": "release_dir", "--env": "env_file", "--port": "port", "--uwsgi": "inner"}
    args, rest = list(args), []
    while args:
        arg = args.pop(0)
        if arg in ("--if-due", "--at-start"):
            out[arg[2:].replace("-", "_")] = True
        elif arg in names and args:
            out[names[arg]] = args.pop(0)
        elif arg.startswith("-"):
            raise PikuError(f"exec-worker: unknown option {arg[:40]!r}", 2)
        else:
            rest.append(arg)
    if len(rest) != 3 or not re.fullmatch(r"[0-9]{1,4}", rest[2]) or (out["port"] and not str(out["port"]).isdigit()):
        raise PikuError("exec-worker takes [options] APP KIND INDEX", 2)
    out["port"] = int(out["port"]) if out["port"] else None
    return {"app": rest[0], "kind": rest[1], "index": int(rest[2]), **out}


def exec_worker(app, kind, index, if_due, at_start, release_dir, env_file, port, inner):
    """What a vassal runs (uWSGI calls back into piku.py): a daemon's command, a cron job, or
    the virtualenv's own uWSGI, in the release and with the environment the vassal names."""
    import time
    paths = P()
    app = parse_app_name(app)
    release_dir, env_file, inner = worker_paths(paths, app, kind, index, release_dir, env_file, inner)
    if not os.path.isdir(release_dir):  # (uWSGI respawned it as its vassal was being removed)
        raise PikuError(f"{app}'s release {os.path.basename(release_dir)} is gone: {kind}.{index} does not start "
                        "(it was being stopped)")
    if kind.startswith("cron"):
        sys.exit(cron_worker(paths, app, kind, index, if_due, at_start, release_dir, env_file))
    workers, _ = read_procfile(release_dir)
    if kind not in workers:
        raise PikuError(f"{app} has no {kind} process in its Procfile")
    env = parse_env(read_text(env_file, ""), source=os.path.basename(env_file))
    die_with_parent(15)  # a vassal killed with its emperor takes its processes with it
    os.chdir(release_dir)
    if kind == "wsgi":  # only run this way in pyuwsgi mode: the venv's own uWSGI serves it
        if os.path.exists(os.path.join(os.path.dirname(inner), "stopping")):
            time.sleep(1)  # its vassal is being stopped: do not start the old release again
            raise PikuError(f"{app} {kind}.{index}: this slot is stopping, not started again")
        # Drop the emperor's UWSGI_* variables, or the inner uWSGI believes it is a vassal too.
        clean = {k: v for k, v in os.environ.items() if not k.startswith("UWSGI_")}
        uwsgi = os.path.join(env.get("VIRTUAL_ENV") or os.path.join(paths.envs, app), "bin", "uwsgi")
        os.execve(uwsgi, [uwsgi, "--ini", inner], clean)
    env = process_env(env, kind, index) | ({"PORT": str(port)} if port else {})
    argv = supervised(["/bin/sh", "-c", workers[kind]], parent=os.getppid())  # (sh forks the command)
    os.execve(argv[0], argv, env)


def worker_env(paths, app, kind, index, environ, env_file=None):
    """What a worker or cron job runs with: the caller's LANG, LC_ALL and TZ, the environment its
    vassal names (else the live one), PROC_TYPE and PROC_INDEX."""
    env = parse_env(read_text(env_file, ""), source=os.path.basename(env_file)) if env_file \
        else load_live_env(paths, app)
    return process_env(env, kind, index, {k: v for k, v in environ.items() if k in ("LANG", "LC_ALL", "TZ")})


def cron_job(paths, app, kind, release=None):
    """(schedule sets, or None for @reboot; command) of cron job KIND of a release (the live one
    when not given)."""
    release = release or live_release(paths, app)
    if not release:
        raise PikuError(f"{app} has not been deployed yet")
    workers, _ = read_procfile(release)
    jobs = [k for k in workers if k.startswith("cron")]
    if kind not in jobs:
        raise PikuError(f"{app} has no cron job {kind[:40]!r}: " + (f"its cron jobs are {', '.join(jobs)}" if jobs
                        else "its Procfile has none (their kinds start with `cron`)"))
    return parse_cron(workers[kind])


def cron_worker(paths, app, kind, index, if_due, at_start, release_dir=None, env_file=None):
    """What a cron vassal asks for: at its master's start, an @reboot job (in the background:
    uWSGI waits for the hook); every minute (--if-due), a job whose schedule matches now, once
    per minute; with neither flag, the job now. Returns the exit code for uWSGI."""
    import time
    sets, command = cron_job(paths, app, kind, release_dir)
    now = time.localtime()
    where = {"release_dir": release_dir, "env_file": env_file}
    if at_start:
        if sets is None:
            run_in_background(lambda: run_cron_job(paths, app, kind, index, command, "@reboot", os.environ, **where))
        return 0
    if if_due and (not cron_matches(sets, now) or not claim_cron_minute(paths, app, f"{kind}.{index}", now)):
        return 0
    return run_cron_job(paths, app, kind, index, command, "scheduled", os.environ, **where).code or 0


def run_in_background(work):
    """Run work() in a child process of its own session; the caller goes on at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
        try:
            os.setsid()
            work()
        except Exception as e:  # nobody waits for this process: its log is all there is
            warn(str(e))
        finally:
            os._exit(0)


CronRun = namedtuple("CronRun", "code seconds busy")


def run_cron_job(paths, app, kind, index, command, how, environ, release_dir=None, env_file=None):
    """Run a cron job once, as the schedule, its worker's start (@reboot) and cron:run all do: its
    lock held for the run's life (PIKU_CRON_OVERLAP=forbid skips a run while another holds it),
    start, end, exit code and duration recorded in its log. code None: skipped (busy: who runs).
    It runs in the release (and with the environment) its vassal names, else the live one."""
    import subprocess
    import time
    worker, env = f"{kind}.{index}", worker_env(paths, app, kind, index, environ, env_file)
    fd, busy = take_cron_lock(paths, app, kind)
    if fd is None and setting(env, "PIKU_CRON_OVERLAP") == "forbid":
        cron_log(paths, app, worker, f"skipped ({how}): the previous run ({busy}) is still running "
                                     "and PIKU_CRON_OVERLAP=forbid")
        return CronRun(None, 0.0, busy)
    try:
        cron_log(paths, app, worker, f"started ({how}): {command}")
        t0 = time.monotonic()
        code = subprocess.run(["/bin/sh", "-c", command], cwd=release_dir or os.path.join(paths.apps, app),
                              env=env, stdin=subprocess.DEVNULL).returncode
        code, seconds = (128 - code if code < 0 else code), time.monotonic() - t0
        cron_log(paths, app, worker, f"finished: exit {code} after {seconds:.2f}s")
    finally:
        if fd is not None:
            os.close(fd)
    return CronRun(code, seconds, None)


def take_cron_lock(paths, app, kind):
    """The lock of a cron job, without waiting: (fd, None), the run's pid and start written in
    it; or (None, what the holder wrote) while another run holds it."""
    import fcntl
    import time
    d = os.path.join(paths.state, app, "cron")
    ensure_dirs(d)
    fd = os.open(os.path.join(d, f"{kind}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "?"
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    return fd, None


def cron_log(paths, app, worker, text):
    """Append a record to the cron job's log, logs/<app>/<kind>.<n>.log."""
    import time
    ensure_dirs(os.path.join(paths.logs, app))
    with open(os.path.join(paths.logs, app, f"{worker}.log"), "a", encoding="utf-8") as f:
        f.write(render_cron_record(time.localtime(), worker, text))


@cli.command("cron:run")
@click.argument("app")
@click.argument("kind")
def cmd_cron_run(app, kind):
    """Run a cron job now, as its schedule would; exits with the job's exit code."""
    paths = P()
    app = app_must_exist(paths, app)
    _, command = cron_job(paths, app, kind)
    step(f"Running {kind} of {app} now: {command}")
    done = run_cron_job(paths, app, kind, 1, command, "cron:run", os.environ)
    if done.code is None:
        raise PikuError(f"{kind} was not run: its previous run ({done.busy}) is still going and "
                        "PIKU_CRON_OVERLAP=forbid")
    if done.code:
        raise PikuError(f"{kind} failed: exit {done.code} after {done.seconds:.2f}s (see `logs {app} {kind}`)",
                        done.code)
    step(f"{kind} finished: exit 0 after {done.seconds:.2f}s")


def worker_paths(paths, app, kind, index, release_dir, env_file, inner):
    """The directory, environment file and pyuwsgi ini of a worker: what its vassal names (each
    must be the app's own), else the live ones (vassals written by older piku.py versions)."""
    def inside(path, *bases):
        real = os.path.realpath(path)
        return any(real.startswith(os.path.realpath(b) + os.sep) for b in bases)
    release_dir = release_dir or os.path.join(paths.apps, app)
    env_file = env_file or os.path.join(paths.envs, app, "LIVE_ENV")
    inner = inner or os.path.join(paths.state, app, f"wsgi.{index}.ini")
    if not (os.path.realpath(release_dir) == os.path.realpath(os.path.join(paths.apps, app))
            or inside(release_dir, os.path.join(paths.releases, app))) \
            or not inside(env_file, os.path.join(paths.state, app), os.path.join(paths.envs, app)) \
            or not inside(inner, os.path.join(paths.state, app)):
        raise PikuError(f"refused: exec-worker paths outside {app}'s own directories")
    return release_dir, env_file, inner


@cli.command("nginx-watch", hidden=True, context_settings={"ignore_unknown_options": True})
@click.option("--interval", default=1.0, show_default=True,
              help="Seconds between looks where inotify is missing (else the longest wait).")
@click.option("--pid-file", default=None,
              help="nginx's pid file: signal its master (SIGHUP) instead of running RELOAD_CMD.")
@click.argument("reload_cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def cmd_nginx_watch(interval, pid_file, reload_cmd):
    """Run RELOAD_CMD whenever a conf, certificate or key in nginx/ changes (hosts without
    systemd). Woken by inotify where the kernel has it, so a deploy waits no polling interval.
    With --pid-file, the nginx master named there gets SIGHUP itself (RELOAD_CMD when that file
    names no nginx master): `nginx -s reload` reads the whole config once more before it sends
    the very same signal, which with many apps' certificates is most of a reload's time. Then it
    stops the old workers as soon as a new one is up (reload_nginx_master): the new config
    answers within a few ms of the reload instead of ~100 ms."""
    import time
    paths = P()

    def reload():
        pid = nginx_master_pid(pid_file) if pid_file else None
        if pid:
            try:
                reload_nginx_master(pid)
                return
            except OSError:
                pass
        run(list(reload_cmd), check=False)

    def signature():
        try:
            return sorted((n, os.stat(os.path.join(paths.nginx, n)).st_mtime_ns)
                          for n in os.listdir(paths.nginx) if n.endswith((".conf", ".crt", ".key")))
        except OSError:
            return None
    wait = directory_waiter(paths.nginx) or time.sleep
    last = signature()
    while True:
        wait(interval)
        now = signature()
        if now != last:
            reload()
            last = now


NGINX_HANDOVER_TIMEOUT = 10.0  # seconds nginx-watch waits for a reload's first new worker


def reload_nginx_master(master, timeout=NGINX_HANDOVER_TIMEOUT):
    """Reload nginx (SIGHUP to its master), then hand over at once: as soon as the first worker
    of the new configuration is up, the old workers get SIGQUIT, the graceful stop nginx's
    master itself sends them only 100 ms after starting the new ones. Meanwhile old and new
    workers accept side by side, and the old ones, first in the kernel's queue of waiters,
    take nearly every connection, so the new configuration (a switched upstream) answered
    only ~100 ms after the reload. Nothing is refused: the listening sockets stay open in the
    master and the new workers, and an old worker finishes the requests it has. When no new
    worker comes (an invalid configuration: nginx keeps the old one), nothing is stopped; a
    worker of another user (EPERM) is left to the master. True when handed over. Raises
    OSError when the master cannot be signalled."""
    import signal
    import time
    before = nginx_master_workers(master, titled=False)  # (a worker forked a moment ago has no title yet)
    os.kill(master, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.002)
        workers = nginx_master_workers(master)
        if workers - before:
            for pid in workers & before:
                try:
                    os.kill(pid, signal.SIGQUIT)
                except OSError:
                    pass
            return True
    return False


def nginx_master_workers(master, titled=True):
    """pids of an nginx master's worker processes (titled `nginx: worker process` once they are
    initialised; titled=False: every child, whatever its title): from the kernel's list of its
    children, else from a scan of /proc."""
    try:
        with open(f"/proc/{master}/task/{master}/children") as f:
            children = f.read().split()
    except OSError:
        return {pid for pid, parent, _, _ in nginx_workers() if parent == master}
    out = set()
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not titled or f.read().startswith(b"nginx: worker process"):
                    out.add(int(pid))
        except (OSError, ValueError):
            continue
    return out


def nginx_master_pid(pid_file):
    """The pid in nginx's pid file when that process is an nginx master, else None."""
    try:
        pid = int(read_text(pid_file, "").strip() or "0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid if pid > 1 and f.read().startswith(b"nginx: master process") else None
    except (OSError, ValueError):
        return None


def directory_waiter(directory):
    """A wait(timeout) that returns early when an entry of `directory` is written, created,
    removed or renamed (Linux inotify through libc), or None where that is not available."""
    import ctypes
    import ctypes.util
    import select
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(os.O_CLOEXEC)
        if fd < 0:
            return None
        # IN_MODIFY IN_ATTRIB IN_CLOSE_WRITE IN_MOVED_FROM IN_MOVED_TO IN_CREATE IN_DELETE
        if libc.inotify_add_watch(fd, os.fsencode(directory), 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200) < 0:
            os.close(fd)
            return None
    except (OSError, AttributeError):
        return None

    def wait(timeout):
        if select.select([fd], [], [], timeout)[0]:
            select.select([], [], [], 0.02)  # (a writer's rename follows its write at once: one reload)
            os.read(fd, 65536)
    return wait


# === 28. main() ===

SSH_ALLOWED = {"apps", "backup", "restore", "certs", "certs:renew", "config", "config:get", "config:set",
               "config:unset", "config:live", "config:export", "config:import", "cron:run", "deploy", "destroy",
               "keys", "keys:add", "keys:remove", "logs", "maintenance:on", "maintenance:off", "ps", "ps:scale",
               "releases", "rollback", "run", "restart", "stop", "setup", "setup:ssh", "update", "help",
               "git-receive-pack", "git-upload-pack", "--version", "--help", "-h"}


def load_plugins(paths):
    """Server plugins: packages in plugins/ exposing cli_commands() -> click commands."""
    if not os.path.isdir(paths.plugins) or not os.listdir(paths.plugins):
        return
    import importlib
    sys.path.insert(0, paths.plugins)
    for name in sorted(os.listdir(paths.plugins)):
        if os.path.exists(os.path.join(paths.plugins, name, "__init__.py")):
            try:
                mod = importlib.import_module(name)
                commands = mod.cli_commands()
                for cmd in (commands.commands.values() if isinstance(commands, click.Group) else [commands]):
                    cli.add_command(cmd)
                    SSH_ALLOWED.add(cmd.name)
            except Exception as e:  # a broken plugin must not take the whole CLI down
                warn(f"plugin {name} failed to load: {e}")


@cli.command("help")
@click.pass_context
def cmd_help(ctx):
    """Show the commands."""
    click.echo(ctx.parent.get_help())


def one_app(name, run):
    """An internal command taking exactly one APP argument (parsed without click)."""
    def command(args):
        if len(args) != 1:
            raise PikuError(f"{name} takes one APP", 2)
        return run(args[0])
    return command


# The commands git and uWSGI run on every push and every worker start: parsed without click.
FAST_COMMANDS = {
    "git-receive-pack": one_app("git-receive-pack", lambda app: git_receive_pack(app)),
    "git-upload-pack": one_app("git-upload-pack", lambda app: git_upload_pack(app)),
    "git-hook": one_app("git-hook", lambda app: run_git_hook(app)),
    "exec-worker": lambda args: exec_worker(**parse_exec_worker_args(args)),
}


def plain_call(args):
    """(function, its arguments) of a command whose parameters are all plain positional
    arguments (`config:set APP KEY=VALUE...`, `rollback APP [ID]`, `restart APP`, `apps`...):
    main() calls it without click, which costs ~30 ms of a start. None when click must read the
    line: an option or `--help` (anything starting with -), an argument missing or one too many
    (click says so, as always), a plugin's command."""
    f, _ = cli.specs.get(args[0], (None, None)) if args else (None, None)
    params = list(reversed(f.__dict__.get("_piku_click", []))) if f else []  # (decorators run bottom-up)
    if not f or any(a.startswith("-") for a in args[1:]) or any(
            what != "argument" or set(kw) - {"nargs", "required"} or len(a) != 1 or kw.get("nargs", 1) not in (1, -1)
            for what, a, kw in params):
        return None
    rest, bound = list(args[1:]), {}
    for i, (_, (name, ), kw) in enumerate(params):
        key = name.replace("-", "_").lower()
        if kw.get("nargs", 1) == -1:
            if i != len(params) - 1 or (kw.get("required") and not rest):
                return None
            bound[key], rest = tuple(rest), []
        elif rest:
            bound[key] = rest.pop(0)
        elif kw.get("required", True):
            return None
        else:
            bound[key] = None
    return None if rest else (f, bound)


def main(argv=None):
    try:
        original = os.environ.pop("SSH_ORIGINAL_COMMAND", None)
        if argv is None and original is not None:
            argv = parse_ssh_command(original)
        name = (argv if argv is not None else sys.argv[1:])[:1]
        if not name or name[0] not in cli.commands or name[0] == "help":  # built-ins skip the scan
            load_plugins(paths_for(default_root()))
        if original is not None and argv is not None:
            if argv[0] not in SSH_ALLOWED and argv[0] not in cli.commands:
                raise PikuError(f"refused: {argv[0][:40]!r} is not a piku command (try `help`)", 2)
            if cli.commands.get(argv[0]) is not None and cli.commands[argv[0]].hidden \
                    and argv[0] not in SSH_INTERNAL:
                raise PikuError(f"refused: {argv[0]!r} is internal", 2)
        args = argv if argv is not None else sys.argv[1:]
        if args[:1] and args[0] in FAST_COMMANDS:
            return FAST_COMMANDS[args[0]](args[1:]) or 0
        plain = plain_call(args)
        if plain:
            plain[0](**plain[1])
            return 0
        cli.main(args=argv, prog_name="piku", standalone_mode=False)
        return 0
    except PikuError as e:
        for i, line in enumerate(str(e).splitlines() or ["error"]):
            warn(line)
        return e.code or 1
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:  # one line, like every other error
        usage = e.ctx.get_usage().replace("Usage: ", "") if e.ctx else "piku help"
        warn(f"{e.format_message()} (usage: {usage})")
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        return 1
    except KeyboardInterrupt:
        return 130


# === 29. The piku client (a developer's machine) ===
# `pip install .` makes `piku` run client_main: it finds the server and app from the git
# remote and runs the command there over ssh. Nothing here touches a PIKU_ROOT.

CLIENT_HELP = """Usage: piku [-r REMOTE]... [-g GROUP] COMMAND [ARGS]...

Runs a piku command for this checkout's app on its server, over ssh. The server and app
come from the git remote `piku` (piku@host:app or ssh://piku@host:port/app), or from
PIKU_SERVER ([user@]host[:port]) and PIKU_APP, or from -r REMOTE. The app is put in for
the commands that take one: `piku logs -n 20`, `piku config:set DEBUG=1`,
`piku run -- python manage.py shell`. The exit code is the remote command's.

Options:
  -r, --remote NAME  use this git remote instead of `piku`; give it again for more servers
  -g, --group NAME   every remote of the group `git config piku.group.NAME "prod1 prod2"`
  --version          show the client's version
  -h, --help         show this message

With several remotes the command runs on each in turn and stops at the first failure.

Local commands:
  init               write a starter Procfile and ENV here (existing files are kept)
  push [ARGS]        `git push REMOTE ARGS` to each remote in turn (default: `piku`); stops
                     at the first failure and says which servers have the new release

Server commands: `piku help` lists them. ssh options: PIKU_SSH_COMMAND or GIT_SSH_COMMAND.
"""


def git_remote_url(name):
    """URL of git remote `name` in the current checkout, or None."""
    try:
        proc = run(["git", "remote", "get-url", "--", name], capture=True, check=False)
    except PikuError:
        raise PikuError("git is not installed: the piku client reads the app's git remote")
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def client_target(remote, environ):
    """(ssh destination, port, app or None) from -r REMOTE, PIKU_SERVER/PIKU_APP or `piku`."""
    if remote and not REMOTE_NAME_RE.fullmatch(remote):
        raise PikuError(f"invalid git remote name {remote[:40]!r}")
    if remote:
        url = git_remote_url(remote)
        if not url:
            raise PikuError(f"no git remote named {remote!r} here (see `git remote -v`)")
        return parse_remote_url(url, f"git remote {remote}")
    if environ.get("PIKU_SERVER"):
        dest, port = parse_server_address(environ["PIKU_SERVER"])
        app = environ.get("PIKU_APP")
        return dest, port, parse_app_name(app) if app else None
    url = git_remote_url("piku")
    if not url:
        raise PikuError("no piku server: add a remote (`git remote add piku piku@HOST:APP`), "
                        "set PIKU_SERVER and PIKU_APP, or pass -r REMOTE")
    dest, port, app = parse_remote_url(url, "git remote piku")
    return dest, port, parse_app_name(environ["PIKU_APP"]) if environ.get("PIKU_APP") else app


def client_init(args):
    """Write a starter Procfile and ENV in the current directory; never overwrite."""
    if args:
        raise PikuError("init takes no arguments: it writes ./Procfile and ./ENV", 2)
    here = os.getcwd()
    files = {}  # top-level .py files, and <pkg>/wsgi.py (a Django project)
    for n in sorted(os.listdir(here)):
        path = os.path.join(here, n)
        if n.endswith(".py") and os.path.isfile(path):
            files[n] = (read_text(path) or "")[:20000]
        elif not n.startswith(".") and os.path.isfile(os.path.join(path, "wsgi.py")):
            files[f"{n}/wsgi.py"] = ""
    app = os.path.basename(here)
    starters = {"Procfile": render_starter_procfile(files),
                "ENV": render_starter_env(app if APP_NAME_RE.fullmatch(app) else "myapp")}
    for name, text in starters.items():
        path = os.path.join(here, name)
        if os.path.exists(path):
            detail(f"{name} exists: kept as it is")
            continue
        write_atomic(path, text)
        detail(f"wrote {name}")
    step("Next: commit, `git remote add piku piku@HOST:APP`, `git push piku main`")


def client_confirm_destroy(remote_argv, app, where):
    """`piku destroy`: the app's name is asked for here (the server, reached without a terminal,
    would refuse) and sent as --confirm. A --force or --confirm of the user's goes as it is."""
    if any(a in ("--force", "--confirm") or a.startswith("--confirm=") for a in remote_argv[2:]):
        return remote_argv
    sys.stderr.write(f"This removes {app} on {where} for good (its data directory is kept). "
                     "Type the app's name to confirm: ")
    sys.stderr.flush()
    confirm_destroy(app, sys.stdin.readline(), False)
    return remote_argv + ["--confirm", app]


def client_remotes(opts):
    """The remote names the command goes to: -r names, a group's members, or [] (the default
    target: PIKU_SERVER, else the `piku` remote)."""
    if not opts["group"]:
        return opts["remotes"]
    key = f"piku.group.{opts['group']}"
    proc = run(["git", "config", "--get", key], capture=True, check=False)
    if proc.returncode != 0:
        raise PikuError(f"no group {opts['group']!r} here: define it with "
                        f"git config {key} \"REMOTE1 REMOTE2\"")
    return parse_group_remotes(opts["group"], proc.stdout)


def client_ssh_argv(target, command, args, environ):
    """The ssh command that runs `piku COMMAND ARGS` for one (destination, port, app)."""
    import shlex
    dest, port, app = target
    remote_argv = plan_client_call(command, args, app)
    if command == "destroy":
        remote_argv = client_confirm_destroy(remote_argv, app, dest)
    if command == "backup" and sys.stdout.isatty():
        raise PikuError("backup writes an archive to stdout: redirect it (piku backup > APP.tar.gz)", 2)
    ssh = shlex.split(environ.get("PIKU_SSH_COMMAND") or environ.get("GIT_SSH_COMMAND") or "ssh")
    if command == "run" and sys.stdin.isatty() and sys.stdout.isatty():
        ssh.append("-t")  # an interactive shell or REPL needs a terminal on the server
    return ssh + (["-p", port] if port else []) + ["--", dest, shlex.join(remote_argv)]


def client_each(names, command, args, environ):
    """Run COMMAND on each remote in turn (all are checked first); stop at the first failure.
    command 'push' is `git push REMOTE ARGS`. Returns the exit code."""
    targets = [(name, client_target(name, environ)) for name in names]
    done = []
    for i, (name, target) in enumerate(targets):
        step(f"{name} ({target[0]}:{target[2] or ''}): {command}")
        argv = ["git", "push", name] + list(args) if command == "push" else \
            client_ssh_argv(target, command, args, environ)
        code = run(argv, check=False).returncode
        if code:
            for line in plan_group_report(command, done, name, code, [n for n, _ in targets[i + 1:]]):
                warn(line)
            return code
        done.append(name)
    step(f"{'Pushed to' if command == 'push' else command + ' done on'} {', '.join(done)}")
    return 0


def client_main(argv=None):
    """Entry point of the `piku` command on a developer's machine."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts, argv = parse_client_options(argv)
        if opts["version"]:
            click.echo(f"piku client {__version__}")
            return 0
        if opts["help"] or not argv:
            click.echo(CLIENT_HELP, nl=False)
            return 0
        command, args = argv[0], argv[1:]
        if command == "init":
            client_init(args)
            return 0
        remotes = client_remotes(opts)
        if command in ("backup", "restore") and (len(remotes) > 1 or opts["group"]):
            raise PikuError(f"{command} works with one server at a time (its archive is stdout or stdin): "
                            "pass one -r REMOTE", 2)
        if command == "push" or len(remotes) > 1 or opts["group"]:
            return client_each(remotes or ["piku"], command, args, os.environ)
        ssh = client_ssh_argv(client_target(remotes[0] if remotes else None, os.environ), command, args,
                              os.environ)
        try:
            os.execvp(ssh[0], ssh)
        except OSError as e:
            raise PikuError(f"cannot run {ssh[0]}: {e.strerror}", 127)
    except PikuError as e:
        warn(str(e).splitlines()[0] if str(e) else "error")
        return e.code or 1


if __name__ == "__main__":
    sys.exit(main())
