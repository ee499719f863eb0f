"""Unit tests for issue 14 item 1, backup and restore: archive members, the manifest, unpacking
(what restore refuses), a backup's round trip through a real git bundle, the commands'
refusals, and the client's handling of archives."""
import gzip
import io
import json
import os
import subprocess
import tarfile

import pytest

import piku
from piku import PikuError


# -- phases and the client ----------------------------------------------------------

def test_postdeploy_and_backup_are_phases_not_processes():
    workers = {"web": "x", "postdeploy": "echo", "backup": "dump", "release": "m"}
    assert piku.plan_scaling(workers, {}) == {"web": 1}
    assert not piku.detect_generic({}, {"backup": "x", "postdeploy": "y"})


def test_the_client_puts_the_app_into_backup_and_restore_but_not_backup_all():
    assert piku.plan_client_call("backup", [], "app") == ["backup", "app"]
    assert piku.plan_client_call("restore", ["--force"], "app") == ["restore", "app", "--force"]
    assert piku.plan_client_call("backup", ["--all"], None) == ["backup", "--all"]
    assert {"backup", "restore"} <= piku.SSH_ALLOWED


# -- archive members --------------------------------------------------------------

@pytest.mark.parametrize("name,kind,link,clean", [
    ("manifest.json", "file", "", "manifest.json"),
    ("repo.bundle", "file", "", "repo.bundle"),
    ("config/ENV", "file", "", "config/ENV"),
    ("tls/key", "file", "", "tls/key"),
    ("data/", "dir", "", "data"),
    ("data/a/b.txt", "file", "", "data/a/b.txt"),
    ("data/a/", "dir", "", "data/a"),
    ("data/l", "link", "a/b.txt", "data/l"),
    ("data/a/up", "link", "../b", "data/a/up"),
    ("data/self", "link", ".", "data/self"),
])
def test_backup_members_accepted(name, kind, link, clean):
    assert piku.parse_backup_member(name, kind, 10, link) == clean


@pytest.mark.parametrize("name,kind,link,text", [
    ("../evil", "file", "", "leads out of the archive's folder"),
    ("data/../../evil", "file", "", "leads out of the archive's folder"),
    ("/etc/passwd", "file", "", "leads out of the archive's folder"),
    ("./manifest.json", "file", "", "leads out of the archive's folder"),
    ("data//x", "file", "", "leads out of the archive's folder"),
    ("data/l", "link", "/etc/passwd", "leads out of the app's data"),
    ("data/l", "link", "../x", "leads out of the app's data"),
    ("data/a/l", "link", "../../repo.bundle", "leads out of the app's data"),
    ("config/ENV", "link", "../data/x", "leads out of the app's data"),
    ("data/h", "hard link", "", "is a hard link"),
    ("data/f", "FIFO", "", "is a FIFO"),
    ("data/d", "device", "", "is a device"),
    ("evil.sh", "file", "", "is not part of a piku backup"),
    ("config/other", "file", "", "is not part of a piku backup"),
    ("data", "file", "", "is not part of a piku backup"),
    ("repo.bundle", "dir", "", "is not part of a piku backup"),
])
def test_backup_members_refused(name, kind, link, text):
    with pytest.raises(PikuError, match=text):
        piku.parse_backup_member(name, kind, 10, link)


def test_piku_files_in_an_archive_have_a_size_limit():
    with pytest.raises(PikuError, match="more than a backup's ever is"):
        piku.parse_backup_member("config/ENV", "file", 3 << 20)


# -- the manifest -----------------------------------------------------------------

INFO = {"app": "shop", "release": "20260101-000000-abcdef0123", "rev": "a" * 40, "branch": "refs/heads/main",
        "piku": "0.1.0", "python": "3.11.7", "created": "2026-01-01T00:00:00Z"}
FILES = {"repo.bundle": "1" * 64, "config/ENV": "2" * 64, "data/db.sqlite": "3" * 64}
LINKS = {"data/current": "db.sqlite"}


def manifest(**changes):
    m = json.loads(piku.render_backup_manifest(INFO, FILES, LINKS))
    m.update(changes)
    return m


def test_a_manifest_round_trips():
    m = piku.parse_backup_manifest(piku.render_backup_manifest(INFO, FILES, LINKS), FILES, LINKS)
    assert {k: m[k] for k in INFO} == INFO and m["files"] == FILES and m["format"] == piku.BACKUP_FORMAT


@pytest.mark.parametrize("text,files,links,error", [
    ("", FILES, LINKS, "the archive has no manifest.json"),
    ("[1]", FILES, LINKS, "the archive has no manifest.json"),
    (json.dumps({k: v for k, v in manifest().items() if k != "digest"}), FILES, LINKS, "manifest has no digest \\(unsigned\\)"),
    (json.dumps(manifest(app="other")), FILES, LINKS, "does not match its digest"),
    (json.dumps(manifest(format=9)), FILES, LINKS, "made by a newer piku.py"),
    (piku.render_backup_manifest(INFO, FILES, LINKS), {**FILES, "data/db.sqlite": "4" * 64}, LINKS,
     "data/db.sqlite does not match the manifest"),
    (piku.render_backup_manifest(INFO, FILES, LINKS), {k: v for k, v in FILES.items() if k != "config/ENV"}, LINKS,
     "config/ENV of the manifest is missing from the archive"),
    (piku.render_backup_manifest(INFO, FILES, LINKS), {**FILES, "data/extra": "5" * 64}, LINKS,
     "data/extra is in the archive but not in its manifest"),
    (piku.render_backup_manifest(INFO, FILES, LINKS), FILES, {"data/current": "../../x"},
     "data/current does not match the manifest"),
    (piku.render_backup_manifest({**INFO, "rev": "HEAD"}, FILES, LINKS), FILES, LINKS, "no valid 'rev'"),
    (piku.render_backup_manifest({**INFO, "app": "../x"}, FILES, LINKS), FILES, LINKS, "no valid 'app'"),
    (piku.render_backup_manifest({**INFO, "branch": "refs/heads/a..b"}, FILES, LINKS), FILES, LINKS,
     "no valid 'branch'"),
    (piku.render_backup_manifest(INFO, {"config/ENV": "2" * 64}, {}), {"config/ENV": "2" * 64}, {},
     "holds no repo.bundle"),
])
def test_manifests_that_cannot_be_verified(text, files, links, error):
    with pytest.raises(PikuError, match=error):
        piku.parse_backup_manifest(text, files, links)


# -- unpacking archives -----------------------------------------------------------

def archive(*members, compress=True):
    """A tar.gz of (name, kind, content-or-target) members. The same bytes in every process
    (gzip header time 0): they are test ids, which pytest-xdist workers must agree on."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "link": tarfile.SYMTYPE,
                         "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}[kind]
            data = value.encode() if kind == "file" else b""
            info.size, info.mode = len(data), 0o644 if kind == "file" else 0o755
            if kind in ("link", "hard"):
                info.linkname = value
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return gzip.compress(buf.getvalue(), mtime=0) if compress else buf.getvalue()


@pytest.fixture
def staging(tmp_path):
    d = tmp_path / "inside" / "staging"
    d.mkdir(parents=True)
    return d


def outside(tmp_path):
    """Every path under tmp_path that is not in the staging folder."""
    return sorted(str(p) for p in tmp_path.rglob("*") if "staging" not in p.parts)


def test_an_archive_unpacks_with_its_hashes(staging):
    files, links = piku.extract_backup(io.BytesIO(archive(
        ("data/a/b.txt", "file", "hello"), ("data", "dir", ""), ("data/l", "link", "a/b.txt"),
        ("config/ENV", "file", "A=1\n"))), str(staging))
    assert set(files) == {"data/a/b.txt", "config/ENV"} and links == {"data/l": "a/b.txt"}
    assert (staging / "data" / "l").read_text() == "hello"
    assert oct((staging / "config" / "ENV").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("members,text", [
    ([("../evil", "file", "x")], "leads out of the archive's folder"),
    ([("data/../../evil", "file", "x")], "leads out of the archive's folder"),
    ([("/tmp/evil", "file", "x")], "leads out of the archive's folder"),
    ([("data/l", "link", "/etc")], "leads out of the app's data"),
    ([("data/l", "link", "../..")], "leads out of the app's data"),
    # each link stays in data/ as written, but followed they lead out (data/l2 is staging's parent)
    ([("data/l1", "link", "."), ("data/l2", "link", "l1/.."), ("data/l3", "link", "l2/..")],
     "leads out of the app's data \\(through another link\\)"),
    ([("data/d", "link", "sub"), ("data/d/x", "file", "x")], "would be written through a symbolic link"),
    ([("data/x", "file", "1"), ("data/x", "file", "2")], "is in the archive twice"),
    ([("data/x", "link", "y"), ("data/x", "dir", "")], "is in the archive twice"),
    ([("data/h", "hard", "data/x")], "is a hard link"),
    ([("data/f", "fifo", "")], "is a FIFO"),
    ([("data/c", "chr", "")], "is a device"),
    ([("run.sh", "file", "#!/bin/sh\n")], "is not part of a piku backup"),
])
def test_archives_restore_refuses(tmp_path, staging, members, text):
    before = outside(tmp_path)
    with pytest.raises(PikuError, match=text):
        piku.extract_backup(io.BytesIO(archive(*members)), str(staging))
    assert outside(tmp_path) == before


@pytest.mark.parametrize("data,text", [
    (b"", "not a whole tar.gz archive"),
    (b"this is not gzip at all", "not a whole tar.gz archive"),
    (archive(("data/x", "file", "".join(map(str, range(30000)))))[:3000], "not a whole tar.gz archive"),
    (archive(("data/x", "file", "x"), compress=False), "not a whole tar.gz archive"),
])
def test_damaged_streams_are_refused(staging, data, text):
    with pytest.raises(PikuError, match=text):
        piku.extract_backup(io.BytesIO(data), str(staging))


# -- a backup and its verification, with a real git bundle ---------------------------------

GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.invalid")


@pytest.fixture
def pushed(tmp_path, monkeypatch):
    """A PIKU_ROOT with app `shop`: a repository with one commit, settings, TLS files and data."""
    monkeypatch.setenv("PIKU_ROOT", str(tmp_path / "piku"))
    monkeypatch.delenv("SSH_ORIGINAL_COMMAND", raising=False)
    paths = piku.paths_for(str(tmp_path / "piku"))
    piku.ensure_dirs(*paths[1:])
    src = tmp_path / "src"
    src.mkdir()
    (src / "Procfile").write_text("web: python3 -m http.server $PORT\n")
    for argv in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "first"]):
        subprocess.run(["git", *argv], cwd=src, env=GIT_ENV, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(src), os.path.join(paths.repos, "shop")], check=True)
    piku.write_config(paths, "shop", {"SECRET": 'a "b" $c\nd'})
    crt, key, record = piku.cert_paths(paths, "shop")
    piku.install_certificate(paths, "shop", "CERT\n", "KEY\n", {"names": ["shop.test"], "source": "self-signed"})
    data = tmp_path / "piku" / "data" / "shop"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "db.txt").write_text("rows")
    os.symlink("sub/db.txt", data / "current")
    os.symlink(str(data / "sub"), data / "absolute")  # absolute, inside: stored relative
    os.symlink("/etc/passwd", data / "escape")  # out of the app's data: left out
    return paths


def backup_bytes(paths, app="shop"):
    out = io.BytesIO()
    piku.backup_app(paths, app, out, os.environ)
    return out.getvalue()


def test_a_backup_verifies_and_holds_everything(pushed, tmp_path, capsys):
    data = backup_bytes(pushed)
    assert "data/escape is a symbolic link out of the app's data" in capsys.readouterr().err
    staging = tmp_path / "staging"
    staging.mkdir()
    m = piku.unpack_backup(str(staging), io.BytesIO(data), os.environ)
    assert m["app"] == "shop" and m["branch"] == "refs/heads/main" and m["head"] == m["rev"] and m["release"] is None
    assert m["links"] == {"data/current": "sub/db.txt", "data/absolute": "sub"}
    assert set(m["files"]) == {"repo.bundle", "config/ENV", "tls/crt", "tls/key", "tls/certificate.json",
                               "data/sub/db.txt"}
    assert piku.parse_env((staging / "config" / "ENV").read_text()) == {"SECRET": 'a "b" $c\nd'}
    assert (staging / "data" / "absolute" / "db.txt").read_text() == "rows"
    log = subprocess.run(["git", "--git-dir", str(staging / "repo.git"), "log", "--format=%s", "main"],
                         capture_output=True, text=True)
    assert log.stdout == "first\n"


def test_a_changed_byte_anywhere_is_refused(pushed, tmp_path):
    data = backup_bytes(pushed)
    raw = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for m in raw.getmembers():
            body = raw.extractfile(m).read() if m.isreg() else None
            if m.name == "data/sub/db.txt":
                body = b"ROWS"
            tar.addfile(m, io.BytesIO(body) if body is not None else None)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(PikuError, match="data/sub/db.txt does not match the manifest"):
        piku.unpack_backup(str(staging), io.BytesIO(out.getvalue()), os.environ)


def test_nothing_pushed_nothing_to_back_up(pushed):
    subprocess.run(["git", "init", "-q", "--bare", os.path.join(pushed.repos, "empty")], check=True)
    with pytest.raises(PikuError, match="empty has nothing pushed yet: nothing to back up"):
        backup_bytes(pushed, "empty")


def call(capsys, monkeypatch, argv, stdin=b""):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = piku.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tree(root):
    return sorted((str(p), p.stat().st_size if p.is_file() else None) for p in root.rglob("*"))


@pytest.mark.parametrize("argv,stdin,code,text", [
    (["backup"], b"", 2, "backup takes an app or --all"),
    (["backup", "shop", "--all"], b"", 2, "backup takes an app or --all"),
    (["backup", "nosuchapp"], b"", 1, "no such app: nosuchapp"),
    (["restore", "../x"], b"", 1, "invalid app name"),
    (["restore", "shop"], b"", 1, "shop exists: `restore shop --force` replaces"),
    (["restore", "other"], b"garbage", 1, "restore refused: the archive is not a whole tar.gz archive"),
    (["restore", "other"], archive(("../../evil", "file", "x")), 1, "leads out of the archive's folder"),
    (["restore", "other"], archive(("data/x", "file", "x")), 1, "the archive has no manifest.json"),
])
def test_backup_and_restore_refusals_change_nothing(pushed, tmp_path, capsys, monkeypatch, argv, stdin, code, text):
    before = tree(tmp_path)
    got, out, err = call(capsys, monkeypatch, argv, stdin)
    assert got == code and text in err and len(err.strip().splitlines()) == 1, (got, out, err)
    assert tree(tmp_path) == before


def test_restore_refuses_the_data_of_a_destroyed_app_without_force(pushed, capsys, monkeypatch):
    os.makedirs(os.path.join(pushed.data, "gone"))
    code, _, err = call(capsys, monkeypatch, ["restore", "gone"], backup_bytes(pushed))
    assert code == 1 and "data/gone exists (kept when an app of that name was destroyed?)" in err


class TtyOut(io.StringIO):
    def isatty(self):
        return True


def test_the_client_takes_backup_and_restore_from_one_server_and_never_to_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith(("PIKU_", "GIT_"))]:
        monkeypatch.delenv(k)
    for argv in (["init", "-q"], ["remote", "add", "one", "piku@one.example:shop"],
                 ["remote", "add", "two", "piku@two.example:shop"], ["config", "piku.group.prod", "one two"]):
        subprocess.run(["git", *argv], check=True)
    for argv in (["-g", "prod", "backup"], ["-r", "one", "-r", "two", "restore"]):
        assert piku.client_main(argv) == 2
        assert f"{argv[-1]} works with one server at a time" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdout", TtyOut())
    assert piku.client_main(["-r", "one", "backup"]) == 2
    assert "backup writes an archive to stdout: redirect it" in capsys.readouterr().err
