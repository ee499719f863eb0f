#!/usr/bin/env python3
"""piku.py: the smallest serious PaaS. `git push` deploys, `ssh piku@host CMD` manages.

Sections (search for the banner, e.g. "=== 5."):
   0. Header            1. Imports          2. Constants and paths
   3. Errors and output 4. Process runner   5. Parsers (pure)
   6. Settings          7. Renderers (pure) 8. Planners (pure)
   9. Filesystem       10. Builders        11. Orchestration
  12. Git and SSH      13. Logs            14. CLI
  15. main()          16. The piku client
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

import click

# === 2. Constants and paths ===

APP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
KIND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,30}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
WSGI_SPEC_RE = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$")
HOSTNAME_RE = re.compile(r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?$|^_$")
IP_RE = re.compile(r"^[0-9A-Fa-f.:\[\]]{2,64}$")
SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9_./@+-]{1,512}$")

SPECIAL_KINDS = ("release", "preflight")
DEFAULT_RELEASES_KEPT = 3
PIKU_FILES_IN_ENV_DIR = ("ENV", "LIVE_ENV", "SCALING")

Paths = namedtuple("Paths", "root apps repos envs data logs cache nginx uwsgi uwsgi_available "
                            "uwsgi_enabled acme plugins releases state locks uv_cache")


def paths_for(root):
    """Every directory under PIKU_ROOT (pure: no I/O)."""
    root = os.path.abspath(root)
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    return Paths(root, j("apps"), j("repos"), j("envs"), j("data"), j("logs"), j("cache"),
                 j("nginx"), j("uwsgi"), j("uwsgi-available"), j("uwsgi-enabled"), j("acme"),
                 j("plugins"), j("releases"), j("state"), j("locks"), j("uv-cache"))


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

def run(argv, cwd=None, env=None, capture=False, input=None, check=True, timeout=None):
    """Run argv (a list, never a shell string). Returns CompletedProcess."""
    import subprocess
    try:
        proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, input=input,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.STDOUT if capture == "merged" else
                              (subprocess.PIPE if capture else None),
                              text=True, errors="replace", timeout=timeout)
    except FileNotFoundError:
        raise PikuError(f"command not found: {argv[0]}", 127)
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


# === 5. Parsers (pure) ===

def parse_app_name(raw):
    """Validate an app name as it arrives from git or a command; returns the clean name."""
    name = (raw or "").strip()
    if name.startswith("~/"):
        name = name[2:]
    name = name.lstrip("/") if name.count("/") == 1 and name.startswith("/") else name
    if name.endswith(".git"):
        name = name[:-4]
    if not APP_NAME_RE.match(name):
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


def render_cron_record(tm, worker, text):
    """A line piku adds to a cron job's log (the job's own output has no time stamps)."""
    import time
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', tm)} [piku cron] {worker}: {text}\n"


def parse_procfile(text):
    """Procfile text -> (ordered {kind: command}, [warnings]). Raises on bad lines."""
    workers, warnings = {}, []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, sep, cmd = line.partition(":")
        kind, cmd = kind.strip(), cmd.strip()
        if not sep or not KIND_RE.match(kind) or not cmd:
            raise PikuError(f"Procfile line {lineno}: expected 'kind: command', got {raw.strip()[:80]!r}")
        if kind in workers:
            raise PikuError(f"Procfile line {lineno}: process kind {kind!r} is defined twice")
        if kind.startswith("cron"):
            try:
                parse_cron(cmd)
            except PikuError as e:
                raise PikuError(f"Procfile line {lineno}: {e}")
        if kind == "wsgi":
            cmd = re.sub(r"\s+#.*$", "", cmd)  # `wsgi: app:app  # a comment`
        if kind == "wsgi" and not WSGI_SPEC_RE.match(cmd):
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


def parse_env(text, base=None, source="ENV"):
    """ENV file text -> dict. `$VAR` expands from earlier keys (then base); bad keys raise."""
    env, scope = {}, dict(base or {})
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not ENV_KEY_RE.match(key):
            raise PikuError(f"{source} line {lineno}: expected KEY=value, got {line[:60]!r}")
        value, expand = _unquote_env_value(value.strip())
        value = expand_vars(value, scope) if expand else value
        env[key] = scope[key] = value
    return env


def _needs_quoting(value):
    # not isprintable(): control characters, and the line breaks str.splitlines() also splits
    # on (\x0b, \x0c, \x1c-\x1e, \x85, \u2028), which would cut an unquoted value in two
    return (value != value.strip() or any(c in value for c in "$\"'\\#") or not value.isprintable()
            or value[:1] in "\"'")


def render_env(env):
    """dict -> ENV file text that parse_env reads back byte for byte."""
    import json
    lines = []
    for k, v in env.items():
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
            if not ENV_KEY_RE.match(key):
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
        if sep and ENV_KEY_RE.match(key):
            out[key] = value
            last = key
        elif last is not None:
            out[last] += " " + arg
        else:
            raise PikuError(f"expected KEY=VALUE, got {arg!r} (keys: letters, digits and _)")
    return out


def parse_scaling(text):
    """SCALING file text ('kind:count' or 'kind=count' lines) -> {kind: count}."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, count = line.replace("=", ":").partition(":")
        if KIND_RE.match(kind.strip()):
            try:
                out[kind.strip()] = max(0, int(count.strip()))
            except ValueError:
                continue
    return out


def render_scaling(scaling):
    return "".join(f"{k}:{v}\n" for k, v in scaling.items())


def parse_scale_args(args, known_kinds):
    """['web=2', 'worker=0'] -> {kind: n}; unknown kinds and bad counts raise."""
    out = {}
    for arg in args:
        kind, sep, count = arg.partition("=")
        if not sep:
            raise PikuError(f"expected KIND=COUNT, got {arg!r}")
        if kind not in known_kinds:
            raise PikuError(f"unknown process kind {kind!r}; this app has: {', '.join(sorted(known_kinds)) or 'none'}")
        out[kind] = parse_int(count, kind, 0, 64)
        if out[kind] > 1 and kind == "web":
            raise PikuError("web: every web process would get the same PORT; run more workers inside "
                            "it instead (e.g. gunicorn --workers N), or scale a wsgi worker")
        if out[kind] > 1 and kind.startswith("cron"):
            raise PikuError(f"{kind}: a cron job runs once per schedule; scale it to 0 or 1")
    return out


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


SSH_DEST_RE = re.compile(r"^(?:[A-Za-z0-9._+-]{1,64}@)?(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])$")


def parse_ssh_dest(dest, what):
    if not SSH_DEST_RE.match(dest or ""):
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


KEY_TYPE_RE = re.compile(r"^(ssh-|ecdsa-|sk-)[\w@.-]+$")
KEY_BLOB_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
AuthorizedKey = namedtuple("AuthorizedKey", "type fingerprint comment piku")


def split_lines(text):
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
    if not KEY_TYPE_RE.match(text.split()[0]):
        options, text = split_key_options(text)
    parts = text.split(None, 2)
    if len(parts) < 2 or not KEY_TYPE_RE.match(parts[0]) or not KEY_BLOB_RE.match(parts[1]):
        return None
    command = re.search(r'(?:^|,)command="((?:[^"\\]|\\.)*)"', options)
    piku = bool(command and re.match(r"(PIKU_ROOT|FINGERPRINT)=", command.group(1)) and "piku" in command.group(1))
    fp = key_fingerprint(parts[1])
    return AuthorizedKey(parts[0], fp, parts[2].strip() if len(parts) > 2 else "", piku) if fp else None


GROUP_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,62}$")  # what git config takes as a variable name
REMOTE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,99}$")


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
            if opts["group"] or not GROUP_NAME_RE.match(value):
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


PYVER_RE = re.compile(r"^(?:(?:cpython|python)[-@]?)?(\d+(?:\.\d+){0,2})(t)?$", re.I)
PYSPEC_RE = re.compile(r"^\s*(?:(?:==|!=|<=|>=|~=|<|>)\s*\d+(?:\.\d+){0,2}(?:\.\*)?\s*,?\s*)+$")


def parse_python_version(value):
    """PYTHON_VERSION / .python-version content -> uv request string. Garbage raises."""
    v = (value or "").strip().splitlines()[0].strip() if (value or "").strip() else ""
    if not v:
        return None
    m = PYVER_RE.match(v)
    if m:
        if not m.group(1).startswith("3") or len(m.group(1)) > 10:
            raise PikuError(f"PYTHON_VERSION {value!r}: only Python 3 is supported")
        return m.group(1) + (m.group(2) or "")
    if PYSPEC_RE.match(v):
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
    return bool(reqs) and all(re.match(r"^[A-Za-z0-9._\[\],-]+==[A-Za-z0-9.*+!_-]+(\s*;.*)?$", r) for r in reqs)


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
        m = re.search(r"(?:^|@\s*)file://(/\S*)", line) or re.match(r"^(\.{1,2}(?:/\S*)?|/\S+)$", line)
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


# === 6. Settings ===
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
        if not HOSTNAME_RE.match(name):
            raise PikuError(f"{key}: invalid host name {name!r}")


def v_path(value, key):
    safe_path(value, key)


S = Setting
SETTINGS = (
    # piku
    S("PIKU_AUTO_RESTART", "true", v_bool, "restart running processes on deploys and config changes"),
    S("PIKU_PREBOOT", "true", v_bool, "start a web process's new release before the old one stops"),
    S("PIKU_HEALTH_TIMEOUT", "30", v_int(1, 3600), "seconds new processes get to answer"),
    S("PIKU_RELEASES_KEPT", str(DEFAULT_RELEASES_KEPT), v_int(1, 100), "releases kept per app"),
    S("PIKU_VERBOSE", "false", v_bool, "show build tools' output on success too"),
    S("PIKU_USE_UV", "true", v_bool, "build requirements.txt apps with uv (else virtualenv + pip)"),
    S("PIKU_CRON_OVERLAP", "allow", v_choice("allow", "forbid"), "forbid: skip a cron run while its previous one runs"),
    S("PIKU_PYUWSGI", "auto", v_choice("auto", "never", "always"), "serve wsgi with the venv's own uWSGI"),
    S("PIKU_UWSGI_PLUGIN_DIR", None, v_path, "where to look first for uWSGI's python3 plugin"),
    # Python and uv
    S("PYTHON_VERSION", None, lambda v, k: parse_python_version(v), "the app's Python version"),
    S("UV_PYTHON_PREFERENCE", "managed", None, "where uv takes Pythons from"),
    S("PATH", None, None, "the PATH after the virtualenv's bin/"),
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


def validate_settings(settings):
    """Raise PikuError for the first setting piku cannot use; returns settings. An empty value
    means unset (the default applies), as it always has."""
    for s in SETTINGS:
        value = settings.get(s.name, "")
        if s.check and value != "":
            s.check(value, s.name)
    for key, value in settings.items():  # a process environment cannot hold one
        if "\0" in value:
            raise PikuError(f"{key}: a value cannot contain a NUL character")
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
                 "NGINX_CACHE_REDIRECTS": lambda s: setting_int(s, "NGINX_CACHE_TIME")}


def setting_count(settings, key):
    return parse_count_or_bool(setting(settings, key), key, COUNT_OR_BOOL[key](settings))


def computed_env(paths, app, settings, port, home, user, base_path, src_layout=False):
    """Values piku injects into every process; they override ENV (except PORT, PATH set there).
    src_layout: the app keeps its packages in src/ (the project itself is not installed into
    the virtualenv), so apps/<app>/src goes first on PYTHONPATH."""
    venv = os.path.join(paths.envs, app)
    user_path = settings.get("PATH") or base_path
    extra = {}
    if src_layout:
        extra["PYTHONPATH"] = ":".join(p for p in (os.path.join(paths.apps, app, "src"),
                                                   settings.get("PYTHONPATH")) if p)
    return extra | {
        "APP": app,
        "DATA_ROOT": os.path.join(paths.data, app),
        "LOG_ROOT": paths.logs,
        "HOME": home,
        "USER": user,
        "PATH": os.path.join(venv, "bin") + ":" + user_path,
        "VIRTUAL_ENV": venv,
        "PORT": str(port),
        "BIND_ADDRESS": setting(settings, "BIND_ADDRESS"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "UTF_8:replace",
    }


# === 7. Renderers (pure) ===

UWSGI_MAGIC_RE = re.compile(r"[$@%]\(|%[a-zA-Z0-9]|[\n\r\0]")


def render_ini(pairs):
    """[(key, value)] -> uWSGI ini text; refuses values uWSGI would interpret."""
    lines = ["[uwsgi]"]
    for key, value in pairs:
        value = str(value)
        if UWSGI_MAGIC_RE.search(value) or value.strip().startswith((";", "#")):
            raise PikuError(f"refusing to write {key} = {value[:60]!r} into a uWSGI ini")
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def worker_port(settings, kind, port):
    return port if kind in ("wsgi", "web") else None


def render_vassal(v):
    """Vassal ini for one worker. `v` is a dict: app, kind, index, paths, settings, port,
    piku (argv prefix running piku.py), python_plugin, mode ('native'|'pyuwsgi'|'daemon'),
    sockets (unix socket path or None), release."""
    import shlex
    s, p, app, kind, n = v["settings"], v["paths"], v["app"], v["kind"], v["index"]
    pairs = [("master", "true"), ("die-on-term", "true"), ("vacuum", "true"),
             ("chdir", os.path.join(p.apps, app)),
             ("procname-prefix-spaced", f"{app}:{kind}.{n}"),
             ("env", f"PIKU_ROOT={p.root}"),
             ("logto", os.path.join(p.logs, app, f"{kind}.{n}.log")),
             ("log-maxsize", setting(s, "UWSGI_LOG_MAXSIZE")),
             ("log-backupname", os.path.join(p.logs, app, f"{kind}.{n}.log.old"))]
    if v["mode"] == "native":
        plugins = [v.get("python_plugin") or "python3"] + list(v.get("extra_plugins") or [])
        pairs = [("plugin", ",".join(plugins))] + pairs + wsgi_pairs(v)
    elif v["mode"] == "pyuwsgi":
        cmd = v["piku"] + ["exec-worker", app, kind, str(n)]
        pairs.append(("attach-daemon2", "cmd=" + shlex.join(cmd) + ",stopsignal=15"))
    elif kind.startswith("cron"):
        cmd = v["piku"] + ["exec-worker", "--if-due", app, kind, str(n)]
        pairs.append(("cron", "-1 -1 -1 -1 -1 " + shlex.join(cmd)))
        # @reboot jobs start when this master does (a deploy, restart, boot); uWSGI gives the
        # whole vassal up if a master-start hook fails, so this one never does
        start = v["piku"] + ["exec-worker", "--at-start", app, kind, str(n)]
        pairs.append(("hook-master-start", "exec:" + shlex.join(start) + " || true"))
    else:
        cmd = v["piku"] + ["exec-worker", app, kind, str(n)]
        pairs.append(("attach-daemon2", "cmd=" + shlex.join(cmd) + ",stopsignal=15"))
    include = s.get("UWSGI_INCLUDE_FILE")
    if include:
        pairs.append(("ini", safe_path(include, "UWSGI_INCLUDE_FILE")))
    return f"# piku release {v['release']}\n" + render_ini(pairs)


def wsgi_pairs(v, inner=False):
    """The python-serving options shared by native vassals and pyuwsgi inner inis."""
    s, p, app = v["settings"], v["paths"], v["app"]
    pairs = [("wsgi-file", os.path.join(p.state, app, "wsgi_boot.py")),
             ("processes", setting(s, "UWSGI_PROCESSES")),
             ("max-requests", setting(s, "UWSGI_MAX_REQUESTS")),
             ("listen", setting(s, "UWSGI_LISTEN")),
             ("http-socket", host_port(setting(s, "BIND_ADDRESS"), v["port"])),
             ("reuse-port", "true"), ("need-app", "true"), ("lazy-apps", "true"),
             # each worker enters the app's stable path before loading it: a master kept across
             # chain reloads sits in the release it started in, which pruning removes later
             ("hook-pre-app", "chdir:" + os.path.join(p.apps, app)),
             ("env", f"PROC_INDEX={v['index']}")]
    if v.get("socket"):
        pairs += [("socket", v["socket"]), ("chmod-socket", "666")]
    if setting_count(s, "UWSGI_GEVENT"):
        pairs.append(("gevent", str(setting_count(s, "UWSGI_GEVENT"))))
    elif int(setting(s, "UWSGI_ASYNCIO") or 0) > 0:
        pairs += [("asyncio", setting(s, "UWSGI_ASYNCIO")), ("greenlet", "true")]
    else:
        pairs.append(("threads", setting(s, "UWSGI_THREADS")))
    if setting_bool(s, "UWSGI_ENABLE_THREADS"):
        pairs.append(("enable-threads", "true"))
    if setting_bool(s, "UWSGI_LOG_X_FORWARDED_FOR"):
        pairs.append(("log-x-forwarded-for", "true"))
    if setting(s, "UWSGI_IDLE"):
        pairs += [("idle", setting(s, "UWSGI_IDLE")), ("die-on-idle", "true")]
    return pairs


def render_inner_ini(v):
    """ini for the venv's own uWSGI (pyuwsgi) when the system plugin has another Python."""
    p, app, kind, n = v["paths"], v["app"], v["kind"], v["index"]
    include = v["settings"].get("UWSGI_INCLUDE_FILE")
    pairs = [("master", "true"), ("die-on-term", "true"), ("chdir", os.path.join(p.apps, app)),
             ("procname-prefix-spaced", f"{app}:{kind}.{n}"),
             ("master-fifo", os.path.join(p.state, app, f"{kind}.{n}.fifo"))] + wsgi_pairs(v) \
        + ([("ini", safe_path(include, "UWSGI_INCLUDE_FILE"))] if include else [])
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
    if not SAFE_PATH_RE.match(value or "") or ".." in value.split("/"):
        raise PikuError(f"{key}: {value!r} is not an acceptable path (letters, digits, ._/@+- only)")
    return value


def render_emperor_ini(paths):
    return render_ini([
        ("emperor", paths.uwsgi_enabled),
        ("emperor-freq", "1"),  # how often (s) the emperor scans for changed vassals
        ("master", "true"),
        ("logto", os.path.join(paths.uwsgi, "uwsgi.log")),
        ("log-maxsize", "1048576"),
        ("pidfile", os.path.join(paths.uwsgi, "uwsgi.pid")),
        ("stats", os.path.join(paths.uwsgi, "uwsgi-stats.sock")),
    ])


# Runs piku.py through the import system, so the compiled bytecode in __pycache__ is reused:
# every ssh command and push saves the ~25 ms of compiling this file. No quotes, no commas.
LAUNCHER = ("import sys,importlib.util as u;n,p=sys.argv[1:3];del sys.argv[1:3];"
            "s=u.spec_from_file_location(n,p);m=sys.modules[n]=u.module_from_spec(s);"
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


URL_PREFIX_RE = re.compile(r"^/[A-Za-z0-9_./~-]*$")


def parse_static_paths(value):
    """NGINX_STATIC_PATHS '/url:dir,/other:dir2' -> [(url, dir)] (dir relative to the app)."""
    out = []
    for item in [i for i in (value or "").split(",") if i.strip()]:
        url, sep, path = item.strip().partition(":")
        if not sep or not URL_PREFIX_RE.match(url):
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
ACME_URL_RE = re.compile(r"^https://[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._~/%-]*)?$")
EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")


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
    key = re.sub(r"\.(org|com|no|goog)$", "", v.lower())
    if key in ACME_CAS:
        return ACME_CAS[key], True
    if v in ACME_CAS.values():
        return v, True
    if ACME_URL_RE.match(v):
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


def nginx_listen_lines(s, https):
    ports = [(setting(s, "NGINX_HTTP_PORT"), "")]
    if https:
        ports.append((setting(s, "NGINX_HTTPS_PORT"), " ssl"))
    addrs = [setting(s, "NGINX_IPV4_ADDRESS")]
    if not setting_bool(s, "DISABLE_IPV6"):
        addrs.append(setting(s, "NGINX_IPV6_ADDRESS"))
    for a in addrs:
        if not IP_RE.match(a):
            raise PikuError(f"nginx listen address {a!r} is not an IP address")
    return [f"  listen {a}:{port}{flag};" for port, flag in ports for a in addrs]


def render_nginx(n):
    """nginx server block(s) for one app. `n`: app, settings, paths, kinds (Procfile),
    sockets (list of unix sockets for wsgi), port, app_dir, cert (bool: cert+key exist)."""
    s, app, p = n["settings"], n["app"], n["paths"]
    names = split_names(setting(s, "NGINX_SERVER_NAME"))
    https_only = n["cert"] and setting_bool(s, "NGINX_HTTPS_ONLY")
    lines = []
    if n["sockets"]:
        lines += [f"upstream piku-{app} {{"] + [f"  server unix:{sock};" for sock in n["sockets"]] + ["}"]
    elif "web" in n["kinds"]:
        # max_fails=0: a refused connection never marks the port down, it only sends that one
        # request on to the standby port, where the next release preboots during a deploy.
        bind = connect_host(setting(s, "BIND_ADDRESS"))
        lines += [f"upstream piku-{app} {{", f"  server {host_port(bind, n['port'])} max_fails=0;"]
        if n.get("standby"):
            lines.append(f"  server {host_port(bind, n['standby'])} backup max_fails=0;")
        lines.append("}")
    cache = parse_cache(s, p, app)
    if cache:  # wsgi apps are reached with uwsgi_pass: the uwsgi module has its own cache
        lines.append(f"{'uwsgi' if n['sockets'] else 'proxy'}_cache_path {cache['path']} levels=1:2 "
                     f"keys_zone={app}:20m inactive={cache['expiry']}s max_size={cache['size']}g "
                     "use_temp_path=off;")
    if https_only:
        lines += ["server {"] + nginx_listen_lines(s, False)[:]
        lines += [f"  server_name {' '.join(names)};",
                  f"  location ^~ /.well-known/acme-challenge/ {{ root {p.acme}/{app}; }}",
                  "  location / { return 301 https://$host$request_uri; }", "}"]
    lines += ["server {"]
    listen = nginx_listen_lines(s, n["cert"])
    if https_only:
        listen = [l for l in listen if " ssl;" in l]
    lines += listen + [f"  server_name {' '.join(names)};", "  client_max_body_size 64m;"]
    if n["cert"]:
        lines += [f"  ssl_certificate {p.nginx}/{app}.crt;", f"  ssl_certificate_key {p.nginx}/{app}.key;",
                  "  ssl_protocols TLSv1.2 TLSv1.3;"]
    lines.append(f"  location ^~ /.well-known/acme-challenge/ {{ root {p.acme}/{app}; }}")
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
        statics.append(("/", safe_path(n["kinds"]["static"], "static")))
    catch_all = render_catch_all(s["NGINX_CATCH_ALL"]) if s.get("NGINX_CATCH_ALL") else None
    for url, path in statics:
        target = path if path.startswith("/") else os.path.join(n["app_dir"], path)
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
    for name in ["@piku"] if static_root else ["/", "@piku"]:
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
        out.append("  }")
    return out


def render_catch_all(value):
    target = value if value.startswith("/") else "/" + value
    if not URL_PREFIX_RE.match(target):
        raise PikuError(f"NGINX_CATCH_ALL: {value!r} is not a path")
    return target


def parse_url_prefixes(value, key):
    """'/a,/b' -> ['/a', '/b']; anything that is not a plain /path raises."""
    urls = [u for u in (value or "").split(",") if u]
    for u in urls:
        if not URL_PREFIX_RE.match(u):
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


# === 8. Planners (pure) ===

def detect_requirements(files, workers):
    return "requirements.txt" in files


def detect_pyproject(files, workers):
    return "pyproject.toml" in files


def detect_generic(files, workers):
    return any(k != "static" and k not in SPECIAL_KINDS for k in workers)


def detect_static(files, workers):
    return "static" in workers


def plan_runtime(files, workers, runtimes):
    """First runtime whose detector accepts the release; (name, label, build) or raises."""
    for name, label, detect, build in runtimes:
        if detect(files, workers):
            return name, label, build
    raise PikuError("nothing to run: the Procfile has no wsgi, web, worker or static entry")


def plan_scaling(workers, saved):
    """{kind: count} for every long-running kind (default 1); Procfile kinds only. web and cron
    kinds run at most once (a SCALING file of the original piku may ask for more)."""
    return {k: min(saved.get(k, 1), 1) if k == "web" or k.startswith("cron") else saved.get(k, 1)
            for k in workers if k not in SPECIAL_KINDS and k != "static"}


def plan_vassals(app, scaling):
    """Vassal file names for a scaling plan: {'<app>_<kind>.<n>.ini': (kind, n)}."""
    return {f"{app}_{kind}.{n}.ini": (kind, n) for kind, count in scaling.items()
            for n in range(1, count + 1)}


def plan_preboot(settings, scaling):
    """Start the new `web` process on a standby port before the old one stops? Only where nginx
    fronts the app (it falls back to the standby port) and workers restart on deploy. (Native
    wsgi vassals and pyuwsgi reload gracefully in place: their sockets stay open.)"""
    return ("web" if setting_bool(settings, "PIKU_PREBOOT") and setting_bool(settings, "PIKU_AUTO_RESTART")
            and split_names(settings.get("NGINX_SERVER_NAME", "")) and scaling.get("web", 0) > 0 else None)


def plan_sync(saved_fingerprint, fingerprint, venv_ok):
    """Re-sync dependencies only when their inputs changed or the venv is broken."""
    return not venv_ok or saved_fingerprint != fingerprint


def plan_wsgi_mode(setting_value, venv_version, plugin_version):
    """('native'|'pyuwsgi', notice or None) for a wsgi worker; raises on a refused mismatch."""
    mm = ".".join((venv_version or "").split(".")[:2])
    if setting_value == "always":
        return "pyuwsgi", f"serving wsgi with the virtualenv's own uWSGI (PIKU_PYUWSGI=always)"
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
                       "config:import", "deploy", "destroy", "logs", "ps", "ps:scale", "run", "restart", "stop",
                       "certs", "certs:renew", "cron:run")


def plan_client_call(command, args, app):
    """The piku argv the client sends for `piku COMMAND ARGS...`: the app goes right after
    the commands that take one (`run -- cmd` drops the `--`)."""
    args = list(args)
    if command not in CLIENT_APP_COMMANDS:
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


def fingerprint(*parts):
    import hashlib
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


# === 9. Filesystem ===

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
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return self
        except BlockingIOError:
            detail(f"waiting for another operation on {self.app} to finish...")
        deadline = time.monotonic() + self.wait
        while time.monotonic() < deadline:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                time.sleep(0.2)
        os.close(self.fd)
        raise PikuError(f"{self.app} is busy (another deploy or config change); try again later")

    def __exit__(self, *exc):
        os.close(self.fd)


def vassal_belongs(text, paths, app):
    """A vassal ini belongs to app iff its chdir is that app's directory (exact, no prefix)."""
    want = os.path.join(paths.apps, app)
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "chdir":
            return value.strip().rstrip("/") == want
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
        return sorted(n for n in os.listdir(paths.repos) if APP_NAME_RE.match(n)
                      and os.path.isdir(os.path.join(paths.repos, n)))
    except FileNotFoundError:
        return []


def app_must_exist(paths, app):
    app = parse_app_name(app)
    if not os.path.isdir(os.path.join(paths.repos, app)) and not os.path.exists(os.path.join(paths.apps, app)):
        raise PikuError(f"no such app: {app} (see `apps`)")
    return app


def load_config(paths, app):
    """config:set values (envs/<app>/ENV)."""
    return parse_env(read_text(os.path.join(paths.envs, app, "ENV"), ""), source=f"{app} config")


def write_config(paths, app, config):
    ensure_dirs(os.path.join(paths.envs, app))
    write_atomic(os.path.join(paths.envs, app, "ENV"), render_env(config), mode=0o600)


def load_live_env(paths, app):
    return parse_env(read_text(os.path.join(paths.envs, app, "LIVE_ENV"), ""), source="LIVE_ENV")


def load_scaling(paths, app):
    return parse_scaling(read_text(os.path.join(paths.envs, app, "SCALING"), ""))


def snapshot_env_dir(venv):
    """piku's own files inside envs/<app>; uv may delete that directory when it recreates a venv."""
    return {n: read_text(os.path.join(venv, n)) for n in PIKU_FILES_IN_ENV_DIR
            if os.path.exists(os.path.join(venv, n))}


def restore_env_dir(venv, snap):
    ensure_dirs(venv)
    for name, text in snap.items():
        if read_text(os.path.join(venv, name)) is None:
            write_atomic(os.path.join(venv, name), text, mode=0o600)


# State files that describe the venv: copied with it; the fingerprint is also taken away, so a
# build cut off half-way does not look finished next time (the server's uv.lock stays: the
# build reuses it).
VENV_SNAPSHOT_STATE = ("deps.fingerprint", "uv.lock", "entry_points.json")


def snapshot_venv(paths, app):
    """Before a build changes envs/<app>: a hard-linked copy of it (and of the state files that
    describe it), so a push that fails later puts the live release's environment back. Package
    managers replace files rather than rewrite them, so the links keep the old contents."""
    venv, backup = os.path.join(paths.envs, app), os.path.join(paths.state, app, "venv-previous")
    if os.path.exists(backup) or not os.path.exists(os.path.join(venv, "pyvenv.cfg")):
        return
    ensure_dirs(os.path.join(backup, "_state"))
    for name in os.listdir(venv):
        if name not in PIKU_FILES_IN_ENV_DIR:
            run(["cp", "-al", "--", os.path.join(venv, name), backup])
    for name in VENV_SNAPSHOT_STATE:
        path = os.path.join(paths.state, app, name)
        if os.path.exists(path):
            os.link(path, os.path.join(backup, "_state", name))
            if name == "deps.fingerprint":
                os.unlink(path)


def restore_venv(paths, app):
    """Put back the environment saved by snapshot_venv (the build failed); True if there was one."""
    venv, backup = os.path.join(paths.envs, app), os.path.join(paths.state, app, "venv-previous")
    if not os.path.isdir(backup):
        return False
    clear_venv(venv)
    for name in os.listdir(backup):
        if name != "_state":
            os.rename(os.path.join(backup, name), os.path.join(venv, name))
    for name in VENV_SNAPSHOT_STATE:
        path, saved = os.path.join(paths.state, app, name), os.path.join(backup, "_state", name)
        remove_path(path)
        if os.path.exists(saved):
            os.rename(saved, path)
    remove_path(backup)
    return True


def discard_venv_snapshot(paths, app):
    remove_path(os.path.join(paths.state, app, "venv-previous"))


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


# === 10. Builders ===
# One function per runtime; RUNTIMES (below) is the table deploy walks in order.

class Build:
    """Everything a builder needs about one release being prepared."""

    def __init__(self, paths, app, release_dir, settings, workers, environ):
        self.paths, self.app, self.release_dir = paths, app, release_dir
        self.settings, self.workers = settings, workers
        self.venv = os.path.join(paths.envs, app)
        self.state = os.path.join(paths.state, app)
        self.env = build_env(paths, app, settings, environ)
        self.uv = find_uv(self.env, environ) if setting_bool(settings, "PIKU_USE_UV") else None
        self.verbose = setting_bool(settings, "PIKU_VERBOSE")
        self.python = None  # 'X.Y.Z' of the venv once built


def find_uv(env, environ):
    """uv on the app's PATH, the server's PATH, or where `pip install --user uv` puts it."""
    home = os.path.expanduser("~")
    for path in (env.get("PATH"), environ.get("PATH"), f"{home}/.local/bin:{home}/.cargo/bin"):
        found = which("uv", {"PATH": path or ""})
        if found:
            return found
    return None


def build_env(paths, app, settings, environ):
    """Environment for build tools: no git hook variables, the app's settings, uv's paths."""
    env = clean_env(environ)
    env.pop("VIRTUAL_ENV", None)
    env.update(settings)
    env["PATH"] = settings.get("PATH") or env.get("PATH") or os.defpath
    env.setdefault("UV_PYTHON_PREFERENCE", DEFAULTS["UV_PYTHON_PREFERENCE"])
    env.setdefault("UV_CACHE_DIR", paths.uv_cache)
    env["UV_PROJECT_ENVIRONMENT"] = os.path.join(paths.envs, app)
    # Server-wide uv settings live where uv itself looks (~/.config/uv/uv.toml, /etc/uv/uv.toml):
    # uv merges them under each project's own [tool.uv], which wins. (UV_CONFIG_FILE would make
    # uv skip the project's settings, a private index included.)
    return env


def tool_run(b, argv, what, cwd=None):
    """Run a build tool, output captured; shown on failure (or always when verbose)."""
    import time
    t0 = time.monotonic()
    proc = run(argv, cwd=cwd or b.release_dir, env=b.env, capture="merged", check=False)
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


ENTRY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ENTRY_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def parse_project_scripts(pyproject_text):
    """[project.scripts] of a pyproject.toml -> ({name: 'module:attr'}, [problems])."""
    table, problems = {}, []
    section = None
    for raw in (pyproject_text or "").splitlines():
        line = raw.split(" #")[0].strip()
        if line.startswith("["):
            section = line.strip("[] ").replace(" ", "")
            continue
        if section != "project.scripts" or "=" not in line:
            continue
        name, _, value = line.partition("=")
        name, value = name.strip().strip("\"'"), value.strip().strip("\"'")
        target = value.split("[")[0].strip()  # `mod:func [extra]`
        if ENTRY_NAME_RE.match(name) and ENTRY_TARGET_RE.match(target):
            table[name] = target
        else:
            problems.append(f"[project.scripts] {name} = {value!r} is not `module:function`: skipped")
    return table, problems


def render_entry_point(python, app_dir, target):
    """A console script for [project.scripts] that runs the app's code from the app directory
    (the project itself is not installed into the virtualenv)."""
    module, attr = target.split(":")
    return (f"#!{python}\n# written by piku.py from [project.scripts] of the app\n"
            "import importlib\nimport os\nimport sys\n"
            f"app_dir = {app_dir!r}\n"
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
        m = re.match(r"^(==|!=|<=|>=|~=|<|>)(\d+(?:\.\d+)*)(\.\*)?$", clause.strip())
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
    cfg = parse_pyvenv_cfg(read_text(os.path.join(venv, "pyvenv.cfg"), ""))
    py = os.path.join(venv, "bin", "python")
    if not cfg.get("version_info") or not os.path.exists(py) or not os.access(py, os.X_OK):
        return None
    return ".".join(cfg["version_info"].split(".")[:3])


def clear_venv(venv):
    """Remove the virtualenv's files but keep piku's (ENV, LIVE_ENV, SCALING)."""
    if not os.path.isdir(venv):
        return
    for name in os.listdir(venv):
        if name not in PIKU_FILES_IN_ENV_DIR:
            remove_path(os.path.join(venv, name))


def ensure_venv(b, interpreter, version):
    """Make envs/<app> a venv of exactly `version`; True when (re)created."""
    have = venv_python_version(b.venv)
    pip_missing = not b.uv and not os.path.exists(os.path.join(b.venv, "bin", "pip"))
    if have == version and not pip_missing:
        return False
    if have == version:
        step("Virtualenv has no pip (uv made it) and uv is not used now: recreating it")
    elif have:
        step(f"Python changed from {have} to {version}: recreating the virtualenv")
    elif os.path.exists(os.path.join(b.venv, "pyvenv.cfg")):
        step("Virtualenv is broken: recreating it")
    else:
        step(f"Creating virtualenv with Python {version}")
    snapshot_venv(b.paths, b.app)
    snap = snapshot_env_dir(b.venv)
    clear_venv(b.venv)
    if os.path.exists(deps_fingerprint_path(b)):
        os.unlink(deps_fingerprint_path(b))  # an empty venv needs a full sync
    ensure_dirs(b.venv)
    if b.uv:
        tool_run(b, [b.uv, "venv", "--allow-existing", "--no-progress", "--python", interpreter, b.venv],
                 "creating the virtualenv")
    else:
        tool_run(b, [sys.executable, "-m", "virtualenv", "--quiet", "--python", interpreter, b.venv],
                 "creating the virtualenv (virtualenv)")
    restore_env_dir(b.venv, snap)
    return True


def announce_changes(output, seconds):
    added, removed = parse_uv_changes(output)
    for pkg in added:
        detail(f"+ {pkg}")
    for pkg in removed:
        detail(f"- {pkg}")
    if added or removed:
        detail(f"{len(added)} added, {len(removed)} removed in {seconds:.1f}s")
    else:
        detail(f"Checked in {seconds:.1f}s: nothing to install")


def deps_fingerprint_path(b):
    return os.path.join(b.state, "deps.fingerprint")


def uv_settings_part(b):
    return sorted((k, v) for k, v in b.settings.items() if k.startswith("UV_"))


def setup_python(b):
    """Resolve the Python version and make the venv match it. Returns (interpreter, version)."""
    request, source = python_request(b.settings, b.release_dir)
    if request:
        step(f"Using Python {request} (from {source})")
    interpreter = find_python(b, request)
    version = python_version_of(interpreter)
    ensure_venv(b, interpreter, version)
    b.python = version
    return interpreter, version


def sync_needed(b, fp):
    ok = venv_python_version(b.venv) == b.python
    if not plan_sync(read_text(deps_fingerprint_path(b), "").strip(), fp, ok):
        step("Dependencies unchanged, skipping sync")
        return False
    return True


def uv_fingerprint(b, lock, version, committed):
    lock_text = read_text(lock, "")
    local = local_sources_digest(b.release_dir, parse_lock_local_sources(lock_text))
    # (no local packages: the same fingerprint as piku.py versions before local ones counted)
    return fingerprint("uv", read_text(os.path.join(b.release_dir, "pyproject.toml")), lock_text, version,
                       uv_settings_part(b), committed, *([local] if local else []))


def install_entry_points(b):
    """Console scripts of [project.scripts] in envs/<app>/bin, as installing the project would
    make them (a Procfile may name them); the ones piku wrote before and the project dropped
    are removed. A script a package installed is never replaced."""
    import json
    scripts, problems = parse_project_scripts(read_text(os.path.join(b.release_dir, "pyproject.toml"), ""))
    for problem in problems:
        warn(problem)
    record = os.path.join(b.state, "entry_points.json")
    try:
        ours = set(json.loads(read_text(record) or "[]"))
    except ValueError:
        ours = set()
    bindir = os.path.join(b.venv, "bin")
    python = os.path.join(bindir, "python")
    app_dir = os.path.join(b.paths.apps, b.app)
    written, fp_text = set(), read_text(deps_fingerprint_path(b))
    for name, target in sorted(scripts.items()):
        path = os.path.join(bindir, name)
        if os.path.lexists(path) and name not in ours:
            warn(f"[project.scripts] {name}: the virtualenv already has a program of that name: kept it")
            continue
        text = render_entry_point(python, app_dir, target)
        if read_text(path) != text:
            snapshot_venv(b.paths, b.app)
            write_atomic(path, text, mode=0o755)
            detail(f"script {name} -> {target}")
        written.add(name)
    for name in sorted(ours - written):
        snapshot_venv(b.paths, b.app)
        remove_path(os.path.join(bindir, name))
    if written or ours:
        ensure_dirs(b.state)
        write_atomic(record, json.dumps(sorted(written)) + "\n", only_if_changed=True)
    if fp_text and not os.path.exists(deps_fingerprint_path(b)):  # (a snapshot set it aside:
        write_atomic(deps_fingerprint_path(b), fp_text)  # the packages did not change)


def build_uv(b):
    """pyproject.toml app: `uv sync` into envs/<app>, honouring a committed uv.lock."""
    if not b.uv and not setting_bool(b.settings, "PIKU_USE_UV"):
        raise PikuError("PIKU_USE_UV=false, but this app has a pyproject.toml and no requirements.txt: "
                        "piku builds pyproject apps with uv only; unset PIKU_USE_UV or add a "
                        "requirements.txt")
    if not b.uv:
        raise PikuError("this app has a pyproject.toml but uv is not installed for the piku user: "
                        "install it with `pip install --user uv` (on Debian 12 / Ubuntu 24.04: "
                        "`pipx install uv`, or add --break-system-packages), or Astral's standalone "
                        "installer, then push again; or add a requirements.txt")
    interpreter, version = setup_python(b)
    lock = os.path.join(b.release_dir, "uv.lock")
    saved_lock = os.path.join(b.state, "uv.lock")
    committed = os.path.exists(lock)
    if not committed and os.path.exists(saved_lock):
        write_atomic(lock, read_text(saved_lock))
    fp = uv_fingerprint(b, lock, version, committed)
    if sync_needed(b, fp):
        step("Syncing dependencies with uv" + (" (uv.lock)" if committed else ""))
        # --no-editable: a local package is copied into the venv, never linked to this release
        # directory (which is pruned later, and a rollback must not see the new code).
        argv = [b.uv, "sync", "--no-progress", "--no-dev", "--no-install-project", "--no-editable",
                "--python", interpreter]
        snapshot_venv(b.paths, b.app)
        snap = snapshot_env_dir(b.venv)
        try:
            out, secs = tool_run(b, argv + (["--locked"] if committed else []), "uv sync")
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
        finally:
            restore_env_dir(b.venv, snap)
        announce_changes(out, secs)
        if not committed:
            ensure_dirs(b.state)
            write_atomic(saved_lock, read_text(lock, ""))
            detail("No uv.lock in the repo: keeping the server's lock for the next deploys; "
                   "commit one (`uv lock`) for reproducible builds")
            fp = uv_fingerprint(b, lock, version, committed)
        ensure_dirs(b.state)
        write_atomic(deps_fingerprint_path(b), fp + "\n")
    install_entry_points(b)


def build_requirements(b):
    """requirements.txt app: uv pip (or virtualenv + pip) into envs/<app>."""
    if os.path.exists(os.path.join(b.release_dir, "pyproject.toml")):
        detail("requirements.txt present: it decides the dependencies (pyproject.toml not used)")
    interpreter, version = setup_python(b)
    tool = "uv" if b.uv else "pip"
    reqs = requirements_with_includes(b.release_dir)
    pinned = is_fully_pinned(read_text(os.path.join(b.release_dir, "requirements.txt"), ""))
    local = local_sources_digest(b.release_dir, parse_requirement_local_paths(reqs))
    fp = fingerprint("requirements", reqs, version, tool, pinned, uv_settings_part(b), *([local] if local else []))
    if not sync_needed(b, fp):
        return
    snapshot_venv(b.paths, b.app)
    py = os.path.join(b.venv, "bin", "python")
    if b.uv:
        install = [b.uv, "pip", "install", "--exact", "--no-editable", "-r", "requirements.txt", "--python", py,
                   "--no-progress"]
        if pinned:  # a complete lock (pip freeze, uv pip compile): installed exactly as it is
            step("Installing requirements with uv (exact sync, fully pinned)")
            out, secs = tool_run(b, [b.uv, "pip", "sync", "requirements.txt", "--python", py, "--no-progress"],
                                 "installing requirements")
            announce_changes(out, secs)
            check = run([b.uv, "pip", "check", "--python", py], cwd=b.release_dir, env=b.env, capture="merged",
                        check=False)
            missing = parse_missing_requirements(check.stdout)
            if missing:  # pins only some packages: their dependencies are needed too
                step(f"requirements.txt pins packages without their dependencies ({', '.join(missing[:5])}"
                     f"{', ...' if len(missing) > 5 else ''}): installing those too")
                out, secs = tool_run(b, install, "installing requirements")
                announce_changes(out, secs)
        else:  # the file's packages and their dependencies; --exact removes what left the file
            step("Installing requirements with uv")
            out, secs = tool_run(b, install, "installing requirements")
            announce_changes(out, secs)
    else:
        step("Installing requirements with pip" + (" (PIKU_USE_UV=false)" if not setting_bool(
            b.settings, "PIKU_USE_UV") else " (uv not found)"))
        out, secs = tool_run(b, [py, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                                 "-r", "requirements.txt"], "pip install")
        detail(f"Installed in {secs:.1f}s")
    ensure_dirs(b.state)
    write_atomic(deps_fingerprint_path(b), fp + "\n")


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


def build_generic(b):
    detail("no Python dependencies to install")


def build_static(b):
    detail("static files are served by nginx")


RUNTIMES = (
    ("python-requirements", "Python (requirements.txt) app detected", detect_requirements, build_requirements),
    ("python-uv", "Python (uv) app detected", detect_pyproject, build_uv),
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


def ensure_pyuwsgi(b):
    """Install pyuwsgi (uWSGI built for the venv's own Python) into the venv if missing."""
    if os.path.exists(os.path.join(b.venv, "bin", "uwsgi")):
        return
    py = os.path.join(b.venv, "bin", "python")
    snapshot_venv(b.paths, b.app)
    detail("installing pyuwsgi into the virtualenv")
    if b.uv:
        tool_run(b, [b.uv, "pip", "install", "--no-progress", "--python", py, "pyuwsgi"], "installing pyuwsgi")
    else:
        tool_run(b, [py, "-m", "pip", "install", "-q", "pyuwsgi"], "installing pyuwsgi")


# === 11. Orchestration ===

def piku_argv():
    """How uWSGI calls back into this very file (exec-worker)."""
    return [sys.executable, os.path.abspath(__file__)]


def setup_tree(paths):
    """Create the PIKU_ROOT tree and the emperor ini (idempotent)."""
    ensure_dirs(*paths[1:])
    for d in (paths.root, paths.nginx, paths.apps, paths.releases, paths.acme, paths.cache, paths.state):
        os.chmod(d, 0o755)  # nginx (www-data) must reach sockets, static files and certificates
    write_atomic(os.path.join(paths.uwsgi, "uwsgi.ini"), render_emperor_ini(paths), only_if_changed=True)
    write_atomic(os.path.join(paths.nginx, "_piku.conf"), render_nginx_map(), only_if_changed=True)
    for name in os.listdir(paths.nginx):  # confs of piku.py 0.1 used a map name admins use too
        path = os.path.join(paths.nginx, name)
        text = read_text(path, "") if name.endswith(".conf") else ""
        if "upstream piku-" in text and "Connection $connection_upgrade;" in text:
            write_atomic(path, text.replace("Connection $connection_upgrade;", "Connection $piku_connection_upgrade;"))


def new_release(paths, app, rev, environ):
    """Check the pushed revision out into releases/<app>/<id> (a staging dir until switched)."""
    import time
    rid = time.strftime("%Y%m%d-%H%M%S") + "-" + rev[:10]
    base = os.path.join(paths.releases, app)
    ensure_dirs(base, os.path.join(paths.state, app))
    target, i = os.path.join(base, rid), 1
    while os.path.exists(target):
        i += 1
        target = os.path.join(base, f"{rid}.{i}")
    os.mkdir(target, 0o755)
    env = dict(environ)  # keeps git's quarantine variables: the new objects live there
    env["GIT_DIR"], env["GIT_WORK_TREE"] = os.path.join(paths.repos, app), target
    env["GIT_INDEX_FILE"] = os.path.join(paths.state, app, f"index-{os.getpid()}")
    try:
        run(["git", "read-tree", rev], env=env, capture=True)
        run(["git", "checkout-index", "-a", "-f"], env=env, capture=True)
    finally:
        if os.path.exists(env["GIT_INDEX_FILE"]):
            os.unlink(env["GIT_INDEX_FILE"])
    if os.path.isfile(os.path.join(target, "ENV")):
        os.chmod(os.path.join(target, "ENV"), 0o600)  # settings may hold secrets; nginx never serves it
    return target


def live_release(paths, app):
    """Directory of the live release (apps/<app>), or None."""
    path = os.path.join(paths.apps, app)
    return os.path.realpath(path) if os.path.isdir(path) else None


def live_port(paths, app):
    """The PORT the app's live environment has ('' if none)."""
    live = os.path.join(paths.envs, app, "LIVE_ENV")
    return load_live_env(paths, app).get("PORT", "") if os.path.exists(live) else ""


def ports_of_other_apps(paths, app):
    """{port: app} for the PORT and standby port of every other app."""
    out = {}
    for other in known_apps(paths):
        if other == app:
            continue
        port = live_port(paths, other)
        standby = (read_text(os.path.join(paths.state, other, "standby_port")) or "").strip()
        for value in (port, standby):
            if value.isdigit():
                out.setdefault(int(value), other)
    return out


def choose_port(paths, app, settings, listens=True):
    """PORT from settings, else the one the app had (a web app keeps its port), else a free one.
    A port another app has, or (when it is not the app's own already) one something else
    listens on, is refused: the health check would take that listener for the app."""
    bind = setting(settings, "BIND_ADDRESS")
    old = live_port(paths, app)
    taken = ports_of_other_apps(paths, app) if listens else {}
    if settings.get("PORT"):
        port = parse_int(settings["PORT"], "PORT", 1, 65535)
        if port in taken:
            raise PikuError(f"PORT {port} is already used by app {taken[port]}: choose another one, or unset "
                            "PORT and piku picks a free one")
        if listens and str(port) != old and not port_free(bind, port):
            raise PikuError(f"PORT {port} cannot be used on {bind}: something else listens there"
                            + (" (or, below 1024, it needs root)" if port < 1024 else "")
                            + "; choose another one, or unset PORT and piku picks a free one")
        return port
    if old.isdigit() and int(old) not in taken and (int(old) >= 1024 or os.geteuid() == 0):
        return int(old)
    port = free_port(bind)
    while port in taken:
        port = free_port(bind)
    return port


def choose_standby_port(paths, app, settings, port):
    """The port a web app's next release preboots on: kept in state/<app>/standby_port so the
    nginx upstream stays the same from deploy to deploy; a new one only when it is taken."""
    path = os.path.join(paths.state, app, "standby_port")
    bind = setting(settings, "BIND_ADDRESS")
    saved = (read_text(path) or "").strip()
    if saved.isdigit() and int(saved) != port and port_free(bind, int(saved)):
        return int(saved)
    standby = free_port(bind)
    while standby == port:
        standby = free_port(bind)
    ensure_dirs(os.path.dirname(path))
    write_atomic(path, f"{standby}\n")
    return standby


def read_procfile(release_dir):
    text = read_text(os.path.join(release_dir, "Procfile"))
    if text is None:
        raise PikuError("no Procfile in the pushed revision: add one, e.g. `wsgi: app:application` "
                        "or `web: gunicorn -b $BIND_ADDRESS:$PORT app:app`, commit and push again")
    return parse_procfile(text)


def env_file_base(paths, app, environ):
    """What `$VAR` in a repo ENV file may refer to besides earlier keys, as in the original
    piku: APP, DATA_ROOT, LOG_ROOT, HOME, USER, VIRTUAL_ENV and the server's PATH (so
    `PATH=$PATH:/opt/bin` and `DB=$DATA_ROOT/db.sqlite` work)."""
    home, path = os.path.expanduser("~"), clean_env(environ).get("PATH", os.defpath)
    env = computed_env(paths, app, {}, 0, home, environ.get("USER") or os.path.basename(home), path)
    return {k: env[k] for k in ("APP", "DATA_ROOT", "LOG_ROOT", "HOME", "USER", "VIRTUAL_ENV")} | {"PATH": path}


def read_repo_env(paths, app, release_dir, base):
    return parse_env(read_text(os.path.join(release_dir, "ENV"), "") if release_dir else "", base,
                     source="ENV (in the repo)")


def prepare(paths, app, release_dir, environ, build=True):
    """Everything about a release short of making it live: parse, build, compute env and files."""
    if restore_venv(paths, app):  # (callers hold the app lock) an earlier deploy was cut off
        detail("restored the live release's virtualenv, left half-built by an interrupted deploy")
    workers, warnings = read_procfile(release_dir)
    for w in warnings:
        warn(w)
    base = env_file_base(paths, app, environ)
    repo_env = read_repo_env(paths, app, release_dir, base)
    settings = validate_settings({**repo_env, **load_config(paths, app)})
    b = Build(paths, app, release_dir, settings, workers, environ)
    ensure_dirs(os.path.join(paths.data, app), os.path.join(paths.logs, app))  # release may write there
    files = set(os.listdir(release_dir))
    runtime, label, builder = plan_runtime(files, workers, RUNTIMES)
    port = choose_port(paths, app, settings, listens=bool({"web", "wsgi"} & set(workers)))
    env = dict(settings)
    env.update(computed_env(paths, app, settings, port, base["HOME"], base["USER"], base["PATH"],
                            src_layout=runtime.startswith("python") and "src" in files
                            and os.path.isdir(os.path.join(release_dir, "src"))))
    plan = {"paths": paths, "app": app, "release_dir": release_dir, "workers": workers,
            "settings": settings, "build": b, "runtime": runtime, "port": port, "env": env,
            "scaling": plan_scaling(workers, load_scaling(paths, app))}
    if build:
        step(label)
        if "preflight" in workers:
            run_phase(plan, "preflight")
        builder(b)
    else:
        b.python = venv_python_version(b.venv)
    plan["wsgi_mode"] = choose_wsgi_mode(plan)
    plan["preboot"] = plan_preboot(settings, plan["scaling"])
    plan["standby"] = choose_standby_port(paths, app, settings, port) if plan["preboot"] == "web" else None
    return plan


def choose_wsgi_mode(plan):
    if "wsgi" not in plan["workers"]:
        return None
    b = plan["build"]
    if not b.python:
        raise PikuError("a wsgi worker needs a Python app (requirements.txt or pyproject.toml)")
    name, plugin_version = uwsgi_python_plugin(b.env)
    mode, notice = plan_wsgi_mode(setting(plan["settings"], "PIKU_PYUWSGI"), b.python, plugin_version)
    plan["python_plugin"] = name
    if mode == "native":
        plan["extra_plugins"] = native_loop_plugins(plan["settings"], uwsgi_plugin_dirs(b.env))
    if notice:
        step(notice[0].upper() + notice[1:])
    if mode == "pyuwsgi":
        ensure_pyuwsgi(b)
    return mode


def process_env(plan, kind, index=1, environ=None):
    """The environment a worker or phase command sees: system basics + LIVE_ENV + PROC_TYPE."""
    env = {k: v for k, v in clean_env(environ if environ is not None else os.environ).items()
           if k in ("LANG", "LC_ALL", "TZ", "TERM", "SHELL", "LOGNAME")}
    env.update(plan["env"])
    env["PROC_TYPE"] = kind
    env["PROC_INDEX"] = str(index)
    return env


def run_phase(plan, kind):
    """Run the Procfile's release/preflight command in the new release; failure rejects the push."""
    cmd = plan["workers"][kind]
    step(f"Running {kind}: {cmd}")
    import subprocess
    proc = subprocess.run(["/bin/sh", "-c", cmd], cwd=plan["release_dir"], stdin=subprocess.DEVNULL,
                          env=process_env(plan, kind))
    if proc.returncode != 0:
        raise PikuError(f"{kind} command failed (exit {proc.returncode}); nothing was changed, "
                        "the previous release keeps serving")


def vassal_specs(plan):
    """{filename: ini text} for every worker of the plan, plus extra files (inner inis)."""
    import time
    p, app, s = plan["paths"], plan["app"], plan["settings"]
    stamp = os.path.basename(plan["release_dir"]) + f" {time.time():.3f}"
    nginx_on = bool(split_names(s.get("NGINX_SERVER_NAME", "")))
    vassals, extra = {}, {}
    for name, (kind, n) in plan_vassals(app, plan["scaling"]).items():
        mode = plan["wsgi_mode"] if kind == "wsgi" else "daemon"
        v = {"app": app, "kind": kind, "index": n, "paths": p, "settings": s, "port": plan["port"],
             "piku": piku_argv(), "python_plugin": plan.get("python_plugin"), "mode": mode,
             "extra_plugins": plan.get("extra_plugins"),
             # pyuwsgi: the outer vassal stays as it is; its inner uWSGI reloads in place
             "release": "pyuwsgi (reloaded in place)" if mode == "pyuwsgi" else stamp,
             "socket": os.path.join(p.nginx, f"{app}.{n}.sock") if nginx_on and kind == "wsgi" else None}
        vassals[name] = render_vassal(v)
        if mode == "pyuwsgi":
            extra[os.path.join(p.state, app, f"{kind}.{n}.ini")] = render_inner_ini(v)
    return vassals, extra


def nginx_sockets(plan):
    p, app = plan["paths"], plan["app"]
    return [os.path.join(p.nginx, f"{app}.{n}.sock") for n in range(1, plan["scaling"].get("wsgi", 0) + 1)]


def render_app_nginx(plan, app_dir=None):
    """nginx conf text for the plan, or None when NGINX_SERVER_NAME is unset. Files of the app
    are referred to through apps/<app> (the live link) unless app_dir says otherwise."""
    s, p, app = plan["settings"], plan["paths"], plan["app"]
    if not split_names(s.get("NGINX_SERVER_NAME", "")):
        return None
    kinds = plan["workers"]
    has_backend = plan["scaling"].get("wsgi", 0) > 0 or plan["scaling"].get("web", 0) > 0
    cert = ensure_certificate(plan)
    return render_nginx({"app": app, "settings": s, "paths": p, "kinds": kinds,
                         "sockets": nginx_sockets(plan) if plan["scaling"].get("wsgi") else [],
                         "port": plan["port"], "standby": plan.get("standby"),
                         "app_dir": app_dir or os.path.join(p.apps, app),
                         "cert": cert, "has_backend": has_backend})


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
    import tempfile
    p, app, s = plan["paths"], plan["app"], plan["settings"]
    crt, key, _ = cert_paths(p, app)
    names = split_names(s.get("NGINX_SERVER_NAME", ""))
    record = read_cert_record(p, app)
    if os.path.exists(crt) and os.path.exists(key) and (record is None or record.get("names") == names):
        return True
    if record is None and (os.path.exists(crt) or os.path.exists(key)):
        warn(f"{crt} or {key} is missing: the admin's certificate is incomplete, serving HTTP only")
        return False
    openssl = which("openssl")
    if not openssl or not names:
        return False
    tmp = tempfile.mkdtemp(prefix="piku-cert-")
    try:
        san = ",".join(f"DNS:{n}" for n in names)
        run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj",
             f"/CN={names[0]}", "-addext", f"subjectAltName={san}", "-keyout", f"{tmp}/k",
             "-out", f"{tmp}/c"], capture=True)
        install_certificate(p, app, read_text(f"{tmp}/c"), read_text(f"{tmp}/k"),
                            {"names": names, "source": "self-signed"})
    finally:
        remove_path(tmp)
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


def challenge_served(plan, name, timeout=15.0):
    """True once nginx serves acme/<app>/.well-known/acme-challenge/ for `name` (nginx reloads a
    moment after its config is written, and the CA must find the challenge there)."""
    import http.client
    import secrets
    import time
    p, app, s = plan["paths"], plan["app"], plan["settings"]
    d = os.path.join(p.acme, app, ".well-known", "acme-challenge")
    ensure_dirs(d)
    token = "piku-probe-" + secrets.token_hex(8)
    write_atomic(os.path.join(d, token), token)
    addr = connect_host(setting(s, "NGINX_IPV4_ADDRESS"))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection(addr, setting_int(s, "NGINX_HTTP_PORT"), timeout=2)
                conn.request("GET", f"/.well-known/acme-challenge/{token}", headers={"Host": name})
                resp = conn.getresponse()
                if resp.status == 200 and resp.read().decode("ascii", "replace").strip() == token:
                    return True
            except OSError:
                pass
            time.sleep(0.2)
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
    proc = run(argv, env=acme_env(s), capture="merged", check=False, timeout=600)
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


def relisten_for_check(text, ports):
    """Map every `listen ADDR:PORT` to a free loopback port (same address -> same port)."""
    def sub(m):
        if m.group(1) not in ports:
            ports[m.group(1)] = free_port("127.0.0.1")
        return f"listen 127.0.0.1:{ports[m.group(1)]}"
    return re.sub(r"listen (\S+:\d+)", sub, text)


def nginx_binary():
    """nginx's path (it is in /usr/sbin, often not on the piku user's PATH), or None."""
    return which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def check_nginx(paths, app, text):
    """`nginx -t` on the full piku config with this app's candidate in place of its current one."""
    import shutil
    import tempfile
    others = {n: read_text(os.path.join(paths.nginx, n), "") for n in sorted(os.listdir(paths.nginx))
              if n.endswith(".conf") and n != f"{app}.conf"}
    # nginx only warns about a name two server blocks claim, and gives it to the first one
    owners = server_name_owners({n[:-5]: t for n, t in others.items() if n != "_piku.conf"})
    for name in server_name_owners({app: text}):
        if name in owners:
            raise PikuError(f"NGINX_SERVER_NAME: {name} is already served by app {owners[name]}: "
                            f"remove it there first (config:set {owners[name]} NGINX_SERVER_NAME=...)")
    nginx = nginx_binary()
    if not nginx:
        warn("nginx is not installed: its config was written but not checked")
        return
    tmp = tempfile.mkdtemp(prefix="piku-nginx-")
    try:
        # nginx -t binds the listen addresses: test on free loopback ports, one per address.
        ports = {}
        confs = list(others.items()) + [("candidate.conf", text)]
        for name, body in confs:
            write_atomic(os.path.join(tmp, "check-" + name), relisten_for_check(body, ports))
        candidate = os.path.join(tmp, "check-candidate.conf")
        conf = os.path.join(tmp, "nginx.conf")
        write_atomic(conf, render_nginx_check_conf(tmp, [os.path.join(tmp, "check-" + n) for n, _ in confs]))
        proc = run([nginx, "-t", "-q", "-p", tmp, "-c", conf, "-e", os.path.join(tmp, "error.log")],
                   capture="merged", check=False)
        if proc.returncode != 0:
            msg = [l for l in proc.stdout.splitlines() if "emerg" in l or "error" in l] or [proc.stdout]
            raise PikuError("nginx rejected the new config, the old one stays live: "
                            + msg[0].replace(candidate, f"{app}.conf").strip())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def activate(plan, switch=True, restart="auto"):
    """Make the plan live: symlink switch, env files, vassals, nginx. Returns an undo record.
    restart: 'auto' (running workers restart unless PIKU_AUTO_RESTART=false), 'always' (the
    restart command) or 'never' (ps:scale: only new workers start)."""
    p, app = plan["paths"], plan["app"]
    auto_restart = restart == "always" or (restart == "auto" and
                                           setting_bool(plan["settings"], "PIKU_AUTO_RESTART"))
    vassals, extra = vassal_specs(plan)
    nginx_text = render_app_nginx(plan)
    if nginx_text is not None:  # checked against the new release's files (include, statics)
        check_nginx(p, app, render_app_nginx(plan, plan["release_dir"]))
    app_link = os.path.join(p.apps, app)
    live_env_text = render_env(plan["env"])
    boot = os.path.join(p.state, app, "wsgi_boot.py")
    nginx_conf = os.path.join(p.nginx, f"{app}.conf")
    stale = [n for n in vassals_of(p, app) if n not in vassals]
    touched = ([os.path.join(p.envs, app, "LIVE_ENV"), os.path.join(p.envs, app, "SCALING"), boot,
                nginx_conf] + list(extra) + [os.path.join(d, n) for n in list(vassals) + stale
                                             for d in (p.uwsgi_available, p.uwsgi_enabled)])
    undo = {"link": os.readlink(app_link) if os.path.islink(app_link) else None,
            "files": {path: read_text(path) for path in touched}, "written": {}}
    ensure_dirs(os.path.join(p.envs, app), os.path.join(p.state, app), os.path.join(p.logs, app),
                os.path.join(p.data, app))
    if switch:
        switch_link(p, app, plan["release_dir"])
    write_atomic(os.path.join(p.envs, app, "LIVE_ENV"), live_env_text, mode=0o600)
    write_atomic(os.path.join(p.envs, app, "SCALING"), render_scaling(plan["scaling"]), mode=0o600)
    if plan["wsgi_mode"]:
        module = plan["workers"]["wsgi"]
        write_atomic(boot, render_wsgi_boot(plan["build"].venv, app_link, module, {**plan["env"], "PROC_TYPE": "wsgi"},
                                            ".".join(plan["build"].python.split(".")[:2])), mode=0o600)
    for path, text in extra.items():
        write_atomic(path, text, mode=0o600)
    for name, text in vassals.items():
        enabled = os.path.join(p.uwsgi_enabled, name)
        if not auto_restart and os.path.exists(enabled):
            continue
        log = os.path.join(p.logs, app, name[len(app) + 1:-4] + ".log")
        undo["written"][name] = (log, os.path.getsize(log) if os.path.exists(log) else 0)
        inner = os.path.join(p.state, app, name[len(app) + 1:-4] + ".ini")
        if read_text(enabled) == text and inner in extra and undo["files"].get(inner) == extra[inner] \
                and reload_inner_uwsgi(p, app, name):
            undo.setdefault("reloaded", []).append(name)
            continue
        write_atomic(os.path.join(p.uwsgi_available, name), text)
        write_vassal(enabled, text)
    for name in stale:
        remove_path(os.path.join(p.uwsgi_enabled, name))
        remove_path(os.path.join(p.uwsgi_available, name))
    if nginx_text is not None:
        write_atomic(nginx_conf, nginx_text, only_if_changed=True)
    elif os.path.exists(nginx_conf):
        os.unlink(nginx_conf)
    return undo


def reload_inner_uwsgi(paths, app, vassal_name):
    """Chain-reload the workers of the virtualenv's uWSGI that a pyuwsgi vassal runs, through its
    master FIFO: each new worker loads the new code (lazy-apps) while the master keeps the
    sockets open. (A full reload would re-exec the base interpreter, outside the venv.) False
    when that uWSGI is not running."""
    fifo = os.path.join(paths.state, app, vassal_name[len(app) + 1:-4] + ".fifo")
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: nobody reads it
    except OSError:
        return False
    try:
        os.write(fd, b"c")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def write_vassal(path, text):
    """Write a vassal ini so the emperor sees it change: it compares whole-second mtimes."""
    old = int(os.stat(path).st_mtime) if os.path.exists(path) else None
    write_atomic(path, text)
    if old is not None and int(os.stat(path).st_mtime) <= old:
        os.utime(path, (old + 1, old + 1))


def switch_link(paths, app, release_dir):
    """Atomically point apps/<app> at release_dir (a legacy real directory is moved aside once)."""
    import time
    link = os.path.join(paths.apps, app)
    if os.path.isdir(link) and not os.path.islink(link):
        legacy = os.path.join(paths.releases, app, "legacy-" + time.strftime("%Y%m%d-%H%M%S"))
        ensure_dirs(os.path.dirname(legacy))
        os.rename(link, legacy)
    tmp = link + ".piku-new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(release_dir, tmp)
    os.replace(tmp, link)


def rollback(paths, app, undo):
    link = os.path.join(paths.apps, app)
    if undo["link"]:
        tmp = link + ".piku-new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(undo["link"], tmp)
        os.replace(tmp, link)
    elif os.path.islink(link):
        os.unlink(link)
    for path, text in undo["files"].items():
        if text is None:
            if os.path.lexists(path):
                os.unlink(path)
        elif path.startswith(paths.uwsgi_enabled + os.sep):
            write_vassal(path, text)
        else:
            write_atomic(path, text, mode=0o600 if path.startswith((paths.envs, paths.state)) else 0o644)
    for name in undo.get("reloaded", []):
        reload_inner_uwsgi(paths, app, name)


def health_check(plan, undo):
    """Wait until restarted wsgi workers log that the app loaded and web/wsgi accept connections
    on PORT. None when they do; else why not (a timeout, a wsgi worker that failed to load the
    app, a web command that keeps exiting)."""
    import time
    if not (plan["scaling"].get("wsgi") or plan["scaling"].get("web")):
        return None
    host, port = setting(plan["settings"], "BIND_ADDRESS"), plan["port"]
    timeout = setting_int(plan["settings"], "PIKU_HEALTH_TIMEOUT")
    generic = f"its workers did not load the app or listen on port {port} within {timeout}s"
    deadline = time.monotonic() + timeout
    # A restarted worker says so in its log: wsgi when the app is loaded (pyuwsgi reloaded in
    # place: when its chain reload is over), web when the daemon is respawned (the old one is
    # gone by then, so an open port is the new one).
    markers = {f"{plan['app']}_wsgi.": "WSGI app 0 (mountpoint='') ready",
               f"{plan['app']}_web.": "[uwsgi-daemons] spawning"}
    pending = {name: (log, offset, "chain reloading complete" if name in undo.get("reloaded", ()) else
                      next(text for m, text in markers.items() if name.startswith(m)))
               for name, (log, offset) in undo["written"].items() if any(name.startswith(m) for m in markers)}
    host = connect_host(host)
    webs = {name: (log, offset) for name, (log, offset) in undo["written"].items()
            if name.startswith(f"{plan['app']}_web.")}
    while True:
        for name, (log, offset, marker) in list(pending.items()):
            fresh = read_tail(log, offset)
            if marker in fresh:
                del pending[name]
            elif "no app loaded" in fresh or "unable to load app" in fresh:
                return generic
        # a web command that keeps dying (not found, crashes at import) fails now, not at the timeout
        for log, offset in webs.values():
            fresh = read_tail(log, offset)
            if crash_looping(fresh):
                restarts, throttled = daemon_restarts(fresh)
                return "its web command kept exiting" + (
                    f" (uWSGI restarted it {restarts} times{' and then held it back' if throttled else ''})"
                    if restarts else " (uWSGI held it back for dying too fast)")
        if not pending and port_open(host, port):
            return None
        if time.monotonic() > deadline:
            return generic
        time.sleep(0.05)


def read_tail(path, offset):
    """Text appended to path after byte offset ('' if none or the file is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset if os.path.getsize(path) >= offset else 0)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def worker_log_tail(paths, app, lines=15):
    out = []
    d = os.path.join(paths.logs, app)
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.endswith(".log") and name.startswith(("wsgi", "web")):
            text = read_text(os.path.join(d, name), "")
            out += [f"{name[:-4]}: {l}" for l in text.splitlines()[-lines:]]
    return out


def deploy_release(paths, app, release_dir, environ, label, t0=None):
    """Build, release phase, switch, health check; any failure leaves the old release live."""
    import time
    t0 = t0 or time.monotonic()
    plan = prepare(paths, app, release_dir, environ)
    if "release" in plan["workers"]:
        run_phase(plan, "release")
    step("Releasing")
    tail = (": rolled back, the previous release keeps serving (see `logs APP`)" if live_release(paths, app) else
            ": its workers were stopped; the app had no earlier release, so nothing serves it until a push "
            f"succeeds (see `logs {app}`)")
    _, waited = go_live(plan, "the new release failed its health check ({reason})" + tail)
    prune_releases(paths, app, setting_int(plan["settings"], "PIKU_RELEASES_KEPT"))
    ensure_dirs(os.path.join(paths.state, app))
    with open(os.path.join(paths.state, app, "deploys.log"), "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {label} -> {os.path.basename(release_dir)}\n")
    url = app_url(plan)
    total = time.monotonic() - t0
    step(f"Deployed {app} ({label}) in {total:.2f}s (piku {total - waited:.2f}s, workers starting "
         f"{waited:.2f}s)" + (f": {url}" if url else ""))
    acme_certificate(plan)
    return plan


def go_live(plan, failure, switch=True, undo_on_failure=True, restart="auto"):
    """Activate the plan and wait for its workers; a web worker behind nginx is prebooted on
    the standby port first, so requests never find nothing listening. On failure: rolled back
    (unless undo_on_failure is False) and PikuError(failure), where `{reason}` says why the
    health check failed. Returns (undo, seconds spent waiting for workers to start)."""
    import time
    p, app = plan["paths"], plan["app"]
    t0 = time.monotonic()
    preboot = start_preboot(plan)
    waited = time.monotonic() - t0
    try:
        undo = activate(plan, switch=switch, restart=restart)
        t1 = time.monotonic()
        unhealthy = health_check(plan, undo)
        waited += time.monotonic() - t1
        if unhealthy:
            if undo_on_failure:
                restore_venv(p, app)  # before the old workers start again
                rollback(p, app, undo)
            for line in worker_log_tail(p, app):
                warn(line)
            raise PikuError(failure.replace("{reason}", unhealthy))
        t1 = time.monotonic()
        wait_for_nginx(plan, undo)
        waited += time.monotonic() - t1
    finally:
        t2 = time.monotonic()
        stop_preboot(preboot)
        waited += time.monotonic() - t2
    return undo, waited


def wait_for_nginx(plan, undo, timeout=10.0):
    """An app that has just got its nginx config, or a new name in it: wait until nginx routes
    the (first new) name (nginx reloads a moment after nginx/ changes), so it answers when the
    push or config:set returns; warn if it never does. Other changes are served by the old
    config meanwhile: no wait."""
    p, app, s = plan["paths"], plan["app"], plan["settings"]
    conf = os.path.join(p.nginx, f"{app}.conf")
    before = server_name_owners({app: undo["files"].get(conf) or ""})
    names = [n for n in split_names(s.get("NGINX_SERVER_NAME", "")) if n.lower() not in before]
    if not names or not os.path.exists(conf) or not nginx_binary():
        return
    if not challenge_served(plan, probe_host(names[0]), timeout):
        warn(f"nginx has not loaded {app}'s config after {timeout:.0f}s: is nginx running, and is it "
             f"reloaded when {p.nginx} changes (piku-nginx.path, or `piku.py nginx-watch`)? "
             "See docs/TROUBLESHOOTING.md")


def _die_with_parent():
    """preexec_fn: the prebooted process gets SIGTERM if piku dies before stopping it."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_preboot(plan):
    """Start the new release's web command on the standby port and wait until it listens (nginx
    falls back to it while the web worker restarts). Returns a handle for stop_preboot, or None."""
    import subprocess
    import time
    p, app, s, port = plan["paths"], plan["app"], plan["settings"], plan.get("standby")
    if plan.get("preboot") != "web" or not port or \
            not os.path.exists(os.path.join(p.uwsgi_enabled, f"{app}_web.1.ini")):
        return None  # (nothing is serving yet: nothing to cover for)
    env = process_env(plan, "web")
    env["PORT"] = str(port)
    ensure_dirs(os.path.join(p.logs, app))
    log_path = os.path.join(p.logs, app, "web.1.log")
    with open(log_path, "ab") as log:
        start = log.tell()
        proc = subprocess.Popen(["/bin/sh", "-c", plan["workers"]["web"]], cwd=plan["release_dir"], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    host = connect_host(setting(s, "BIND_ADDRESS"))
    deadline = time.monotonic() + setting_int(s, "PIKU_HEALTH_TIMEOUT")
    while not port_open(host, port, timeout=0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = (f"exited with status {proc.returncode} before it listened" if proc.returncode is not None
                   else f"did not listen on $PORT within {setting(s, 'PIKU_HEALTH_TIMEOUT')}s (it must "
                   "bind $BIND_ADDRESS:$PORT, not a fixed port)")
            stop_preboot(proc)
            for line in read_tail(log_path, start).splitlines()[-15:]:
                warn(f"web: {line}")
            raise PikuError(f"the new release's web process {why}, tried on standby port {port}: nothing "
                            f"was changed, the previous release keeps serving (see `logs {app} web`)")
        time.sleep(0.05)
    detail(f"new web process answering on standby port {port} while the worker restarts")
    return proc


def stop_preboot(proc, grace=10):
    """Stop a prebooted web process and everything it started (its own process group)."""
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


def app_url(plan):
    s = plan["settings"]
    names = split_names(s.get("NGINX_SERVER_NAME", ""))
    if names:
        https = setting_bool(s, "NGINX_HTTPS_ONLY") and os.path.exists(cert_paths(plan["paths"], plan["app"])[0])
        return f"{'https' if https else 'http'}://{names[0]}/"
    if plan["scaling"].get("wsgi") or plan["scaling"].get("web"):
        return f"http://{host_port(setting(s, 'BIND_ADDRESS'), plan['port'])}/"
    return None


def prune_releases(paths, app, keep):
    """Remove all but the `keep` newest releases; never the live one, nor one that a running
    process still works in (its current directory is inside it)."""
    base = os.path.join(paths.releases, app)
    live = live_release(paths, app)
    olds = sorted((os.path.join(base, n) for n in os.listdir(base)), key=os.path.getmtime, reverse=True)
    doomed = [p for p in olds[keep:] if os.path.realpath(p) != live]
    busy = releases_in_use(doomed) if doomed else set()
    for path in doomed:
        if path not in busy:
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


def deploy_rev(paths, app, rev, label, environ):
    """Check out rev into a new release and deploy it; the release dir is removed on failure."""
    import time
    t0 = time.monotonic()
    release_dir = new_release(paths, app, rev, environ)
    try:
        plan = deploy_release(paths, app, release_dir, environ, label, t0)
    except BaseException:
        if live_release(paths, app) != os.path.realpath(release_dir):
            remove_path(release_dir)
            if restore_venv(paths, app):
                detail("the virtualenv is back as the live release had it")
        raise
    discard_venv_snapshot(paths, app)
    return plan


def reconfigure(paths, app, environ):
    """Apply changed settings: same release and venv, new environment, workers restarted."""
    release_dir = live_release(paths, app)
    if not release_dir:
        detail("not deployed yet: the settings apply on the first push")
        return
    plan = prepare(paths, app, release_dir, environ, build=False)
    go_live(plan, f"{app} did not come back on port {plan['port']} with the new settings: "
                  "restored the previous ones (see `logs APP`)", switch=False)
    if setting_bool(plan["settings"], "PIKU_AUTO_RESTART"):
        step(f"Restarted {app} with the new settings")
    else:
        step(f"Saved; PIKU_AUTO_RESTART is false, so {app} runs with the old settings until `restart`")
    acme_certificate(plan)


def stop_app(paths, app):
    names = vassals_of(paths, app)
    for name in names:
        remove_path(os.path.join(paths.uwsgi_enabled, name))
    return names


def restart_app(paths, app, environ):
    """Start (or restart) every worker of the live release with its current settings."""
    release_dir = live_release(paths, app)
    if not release_dir:
        raise PikuError(f"{app} has never been deployed: push to it first")
    plan = prepare(paths, app, release_dir, environ, build=False)
    go_live(plan, f"{app} was restarted but its workers did not load the app or listen on port "
                  f"{plan['port']} (see `logs APP`)", switch=False, undo_on_failure=False, restart="always")
    return plan


def destroy_app(paths, app):
    """Remove an app's code, repo, env, logs, releases, state, vassals and nginx files."""
    stop_app(paths, app)
    for name in vassals_of(paths, app, paths.uwsgi_available):
        remove_path(os.path.join(paths.uwsgi_available, name))
    removed = []
    for path in (os.path.join(paths.apps, app), os.path.join(paths.repos, app),
                 os.path.join(paths.envs, app), os.path.join(paths.logs, app),
                 os.path.join(paths.releases, app), os.path.join(paths.state, app),
                 os.path.join(paths.acme, app), os.path.join(paths.locks, f"{app}.lock"),
                 os.path.join(paths.state, "_acme", "dehydrated", "certs", app),
                 os.path.join(paths.state, "_acme", "dehydrated", f"{app}.conf")) + tuple(
            os.path.join(paths.nginx, f"{app}{ext}") for ext in (".conf", ".crt", ".key")):
        if os.path.lexists(path):
            remove_path(path)
            removed.append(path)
    for name in os.listdir(paths.nginx) if os.path.isdir(paths.nginx) else []:
        if re.fullmatch(re.escape(app) + r"\.\d+\.sock", name):
            remove_path(os.path.join(paths.nginx, name))
            removed.append(os.path.join(paths.nginx, name))
    return removed


# === 12. Git and SSH plumbing ===

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
        parts = line.split()
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
        deploy_rev(paths, app, rev, f"{ref.replace('refs/heads/', '')}@{rev[:10]}", environ)
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
    return text, [(i, k) for i, k in enumerate(map(parse_key_line, split_lines(text))) if k]


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
    lines = [l.strip() for l in key_text.splitlines() if l.strip() and not l.startswith("#")]
    if len(lines) != 1:
        raise PikuError("expected exactly one public key line")
    key = parse_key_line(lines[0]) if KEY_TYPE_RE.match(lines[0].split()[0]) else None
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
        kept = "".join(l for i, l in enumerate(split_lines(text)) if i not in drop)
        write_atomic(authorized_keys_path(), kept, mode=0o600)
    return key, len(drop)


# === 13. Logs ===

def log_files(paths, app, process=None):
    d = os.path.join(paths.logs, app)
    names = sorted(n for n in os.listdir(d) if n.endswith(".log")) if os.path.isdir(d) else []
    if process:
        names = [n for n in names if n[:-4] == process or n.split(".")[0] == process]
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
    (found by process title). A master with no child runs nothing (its daemon is down)."""
    out, me = {}, os.getuid()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid != me:  # another user's piku may have the same app names
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0].decode("utf-8", "replace")
            except OSError:
                continue
            if title.endswith(" uWSGI master"):
                try:
                    with open(f"/proc/{pid}/task/{pid}/children") as f:
                        children = f.read().split()
                except OSError:
                    children = ["?"]  # no way to tell: count the master alone
                out.setdefault(title.split(" ")[0], []).extend(children)
    return out


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


# === 14. CLI ===

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 120, "terminal_width": 120}
BUILD_KEYS_RE = re.compile(r"^(PYTHON_VERSION|UV_\w+|PATH|PIKU_PYUWSGI|PIKU_USE_UV)$")


def P():
    return paths_for(default_root())


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@click.version_option(__version__, "--version", prog_name="piku.py")
@click.pass_context
def cli(ctx):
    """piku.py: git push deploys; these commands manage apps."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command("apps")
def cmd_apps():
    """List apps; running ones are marked with *."""
    paths = P()
    for app in known_apps(paths):
        click.echo(("* " if vassals_of(paths, app) else "  ") + app)


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
        if not ENV_KEY_RE.match(key):
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
        validate_settings(new)
        write_config(paths, app, new)
        for key in sorted(keys):
            detail(f"{key}: {'set' if key in new else 'unset'}")
        try:
            if any(BUILD_KEYS_RE.match(k) for k in keys) and live_release(paths, app):
                step("A build setting changed: redeploying")
                rev, ref = head_rev(paths, app)
                deploy_rev(paths, app, rev, f"{ref.replace('refs/heads/', '')}@{rev[:10]}", os.environ)
            else:
                reconfigure(paths, app, os.environ)
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
    """Rebuild and redeploy the app's last pushed revision."""
    paths = P()
    app = app_must_exist(paths, app)
    with AppLock(paths, app):
        rev, ref = head_rev(paths, app)
        deploy_rev(paths, app, rev, f"{ref.replace('refs/heads/', '')}@{rev[:10]}", os.environ)


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


@cli.command("logs")
@click.argument("app")
@click.argument("process", required=False)
@click.option("-n", "lines", default=50, show_default=True, help="lines per worker to show")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
def cmd_logs(app, process, lines, follow):
    """Show the app's worker logs (all workers, or one kind / kind.N)."""
    paths = P()
    print_logs(paths, app_must_exist(paths, app), process, max(0, lines), follow)


@cli.command("ps")
@click.argument("app")
def cmd_ps(app):
    """Show each worker kind's configured count and how many are running."""
    paths = P()
    app = app_must_exist(paths, app)
    scaling = load_scaling(paths, app)
    running = running_workers()
    enabled = vassals_of(paths, app)
    for kind, count in scaling.items():
        crashing = [n for n in range(1, count + 1) if f"{app}_{kind}.{n}.ini" in enabled
                    and worker_crashing(paths, app, f"{kind}.{n}")]
        up = sum(1 for n in range(1, count + 1)
                 if worker_up(running, f"{app}:{kind}.{n}", kind) and n not in crashing)
        on = sum(1 for n in range(1, count + 1) if f"{app}_{kind}.{n}.ini" in enabled)
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


def live_settings(paths, app):
    """The settings the live release runs with (repo ENV < config), without building."""
    release = live_release(paths, app)
    repo_env = read_repo_env(paths, app, release, env_file_base(paths, app, os.environ))
    return validate_settings({**repo_env, **load_config(paths, app)})


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
    failed = 0
    for name in [app_must_exist(paths, app)] if app else known_apps(paths):
        settings = live_settings(paths, name)
        if not split_names(settings.get("NGINX_SERVER_NAME", "")):
            continue
        if read_cert_record(paths, name) is None and os.path.exists(cert_paths(paths, name)[0]):
            detail(f"{name}: certificate provided by the admin, left as it is")
            continue
        with AppLock(paths, name):
            record = acme_certificate({"paths": paths, "app": name, "settings": settings}, force=force)
        if record and record.get("source") == "acme":
            detail(f"{name}: certificate valid (from {record['ca']})")
        else:
            failed += 1
    if app and failed:
        raise PikuError(f"{app}: no ACME certificate (see the lines above)")


@cli.command("ps:scale")
@click.argument("app")
@click.argument("settings", nargs=-1, required=True)
def cmd_ps_scale(app, settings):
    """Set worker counts: KIND=N ...; starts or stops exactly the difference."""
    paths = P()
    app = app_must_exist(paths, app)
    release_dir = live_release(paths, app)
    if not release_dir:
        raise PikuError(f"{app} has not been deployed yet")
    workers, _ = read_procfile(release_dir)
    kinds = {k for k in workers if k not in SPECIAL_KINDS and k != "static"}
    changes = parse_scale_args(settings, kinds)
    with AppLock(paths, app):
        scaling = {**plan_scaling(workers, load_scaling(paths, app)), **changes}
        write_atomic(os.path.join(paths.envs, app, "SCALING"), render_scaling(scaling), mode=0o600)
        plan = prepare(paths, app, release_dir, os.environ, build=False)
        activate(plan, switch=False, restart="never")
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
        restart_app(paths, app, os.environ)
    step(f"Restarted {app}")


@cli.command("stop")
@click.argument("app")
def cmd_stop(app):
    """Stop the app's workers (restart starts them again)."""
    paths = P()
    app = app_must_exist(paths, app)
    with AppLock(paths, app):
        names = stop_app(paths, app)
        left = wait_workers_gone(app, names)
    if left:
        warn(f"still stopping after 30s: {', '.join(left)} (the emperor stops them; see `ps {app}`)")
    step(f"Stopped {app}" + ("" if names else " (it was not running)"))


def wait_workers_gone(app, vassal_names, timeout=30.0):
    """Wait until the uWSGI masters of these vassals have exited (the emperor notices a removed
    vassal within a second, then stops it gracefully), so `stop` returns when the app is down.
    Returns the workers still running at the timeout."""
    import time
    keys = {f"{app}:{n[len(app) + 1:-4]}" for n in vassal_names}
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(keys & set(running_workers()))
        if not left or time.monotonic() > deadline:
            return [k.split(":", 1)[1] for k in left]
        time.sleep(0.1)


@cli.command("setup")
@click.option("--write-units", type=click.Path(file_okay=False),
              help="Write the systemd units into this directory instead of printing them.")
def cmd_setup(write_units):
    """Create the PIKU_ROOT tree and the uWSGI emperor config; print (or write) service units."""
    import getpass
    paths = P()
    setup_tree(paths)
    me = os.path.abspath(__file__)
    step(f"piku {__version__} is set up in {paths.root}")
    detail(f"nginx: add `include {paths.nginx}/*.conf;` to the http block of nginx.conf")
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
    detail(f"  PIKU_ROOT={paths.root} {sys.executable} {me} nginx-watch -- nginx -s reload")
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
    import tempfile
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
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(me), prefix=".piku-update-", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    proc = run([sys.executable, tmp, "--version"], capture="merged", check=False)
    if proc.returncode != 0 or "piku" not in proc.stdout:
        os.unlink(tmp)
        raise PikuError("the new piku.py does not run (`--version` failed); nothing was replaced")
    os.chmod(tmp, 0o755)
    os.replace(tmp, me)
    step(f"Updated piku.py: {proc.stdout.strip()}")


# Internal commands: git and uWSGI call these; they are not for people.

@cli.command("git-receive-pack", hidden=True)
@click.argument("app")
def cmd_git_receive_pack(app):
    paths = P()
    app = parse_app_name(app)
    if app not in known_apps(paths):
        clash = name_clash(app, known_apps(paths))
        if clash:
            raise PikuError(f"app name {app} is refused: with app {clash} it could share worker file "
                            "names (<app>_<kind>.N.ini): choose another name (neither may be the other "
                            "followed by `_`)")
    setup_tree(paths)
    repo = ensure_repo(paths, app)
    os.execvpe("git", ["git", "receive-pack", repo], clean_env(os.environ) | {"PIKU_ROOT": paths.root})


@cli.command("git-upload-pack", hidden=True)
@click.argument("app")
def cmd_git_upload_pack(app):
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
    if rel.startswith("..") or rel == "." or not APP_NAME_RE.match(app) \
            or not os.path.isdir(os.path.join(data, app)):
        raise PikuError(f"refused: scp only reaches an app's data directory ({paths.data}/<app>/...)")
    os.execvp("scp", ["scp"] + flags + ["--", path])


@cli.command("git-hook", hidden=True)
@click.argument("app")
def cmd_git_hook(app):
    paths = P()
    git_hook(paths, parse_app_name(app), sys.stdin.read().splitlines(), dict(os.environ))


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
@click.argument("app")
@click.argument("kind")
@click.argument("index", type=int)
def cmd_exec_worker(app, kind, index, if_due, at_start):
    paths = P()
    app = parse_app_name(app)
    if kind.startswith("cron"):
        sys.exit(cron_worker(paths, app, kind, index, if_due, at_start))
    app_dir = os.path.join(paths.apps, app)
    workers, _ = read_procfile(app_dir)
    if kind not in workers:
        raise PikuError(f"{app} has no {kind} process in its Procfile")
    if kind == "wsgi":  # only run this way in pyuwsgi mode: the venv's own uWSGI serves it
        inner = os.path.join(paths.state, app, f"wsgi.{index}.ini")
        # Drop the emperor's UWSGI_* variables, or the inner uWSGI believes it is a vassal too.
        env = {k: v for k, v in os.environ.items() if not k.startswith("UWSGI_")}
        uwsgi = os.path.join(paths.envs, app, "bin", "uwsgi")
        os.execve(uwsgi, [uwsgi, "--ini", inner], env)
    os.chdir(app_dir)
    os.execve("/bin/sh", ["/bin/sh", "-c", workers[kind]], worker_env(paths, app, kind, index, os.environ))


def worker_env(paths, app, kind, index, environ):
    """What a worker or cron job runs with: the caller's LANG, LC_ALL and TZ, the live
    environment, PROC_TYPE and PROC_INDEX."""
    env = {k: v for k, v in environ.items() if k in ("LANG", "LC_ALL", "TZ")}
    env.update(load_live_env(paths, app))
    env.update({"PROC_TYPE": kind, "PROC_INDEX": str(index)})
    return env


def cron_job(paths, app, kind):
    """(schedule sets, or None for @reboot; command) of the live release's cron job KIND."""
    release = live_release(paths, app)
    if not release:
        raise PikuError(f"{app} has not been deployed yet")
    workers, _ = read_procfile(release)
    jobs = [k for k in workers if k.startswith("cron")]
    if kind not in jobs:
        raise PikuError(f"{app} has no cron job {kind[:40]!r}: " + (f"its cron jobs are {', '.join(jobs)}" if jobs
                        else "its Procfile has none (their kinds start with `cron`)"))
    return parse_cron(workers[kind])


def cron_worker(paths, app, kind, index, if_due, at_start):
    """What a cron vassal asks for: at its master's start, an @reboot job (in the background:
    uWSGI waits for the hook); every minute (--if-due), a job whose schedule matches now, once
    per minute; with neither flag, the job now. Returns the exit code for uWSGI."""
    import time
    sets, command = cron_job(paths, app, kind)
    now = time.localtime()
    if at_start:
        if sets is None:
            run_in_background(lambda: run_cron_job(paths, app, kind, index, command, "@reboot", os.environ))
        return 0
    if if_due and (not cron_matches(sets, now) or not claim_cron_minute(paths, app, f"{kind}.{index}", now)):
        return 0
    return run_cron_job(paths, app, kind, index, command, "scheduled", os.environ).code or 0


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


def run_cron_job(paths, app, kind, index, command, how, environ):
    """Run a cron job once, as the schedule, its worker's start (@reboot) and cron:run all do: its
    lock held for the run's life (PIKU_CRON_OVERLAP=forbid skips a run while another holds it),
    start, end, exit code and duration recorded in its log. code None: skipped (busy: who runs)."""
    import subprocess
    import time
    worker, env = f"{kind}.{index}", worker_env(paths, app, kind, index, environ)
    fd, busy = take_cron_lock(paths, app, kind)
    if fd is None and setting(env, "PIKU_CRON_OVERLAP") == "forbid":
        cron_log(paths, app, worker, f"skipped ({how}): the previous run ({busy}) is still running "
                                     "and PIKU_CRON_OVERLAP=forbid")
        return CronRun(None, 0.0, busy)
    try:
        cron_log(paths, app, worker, f"started ({how}): {command}")
        t0 = time.monotonic()
        code = subprocess.run(["/bin/sh", "-c", command], cwd=os.path.join(paths.apps, app), env=env,
                              stdin=subprocess.DEVNULL).returncode
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


@cli.command("nginx-watch", hidden=True, context_settings={"ignore_unknown_options": True})
@click.option("--interval", default=1.0, show_default=True)
@click.argument("reload_cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def cmd_nginx_watch(interval, reload_cmd):
    """Run RELOAD_CMD whenever a file in nginx/ changes (for hosts without systemd)."""
    import time
    paths = P()

    def signature():
        try:
            return sorted((n, os.stat(os.path.join(paths.nginx, n)).st_mtime_ns)
                          for n in os.listdir(paths.nginx) if n.endswith((".conf", ".crt", ".key")))
        except OSError:
            return None
    last = signature()
    while True:
        time.sleep(interval)
        now = signature()
        if now != last:
            run(list(reload_cmd), check=False)
            last = now


# === 15. main() ===

SSH_ALLOWED = {"apps", "certs", "certs:renew", "config", "config:get", "config:set", "config:unset", "config:live",
               "config:export", "config:import", "deploy", "destroy", "logs", "ps", "ps:scale", "run", "restart",
               "stop", "cron:run", "setup", "setup:ssh", "keys", "keys:add", "keys:remove", "update", "help", "git-receive-pack", "git-upload-pack", "--version", "--help", "-h"}


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



# === 16. The piku client (a developer's machine) ===
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
    if remote and not REMOTE_NAME_RE.match(remote):
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
                "ENV": render_starter_env(app if APP_NAME_RE.match(app) else "myapp")}
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
