"""Issue 13 item 8: Node.js, Go, Ruby, Rust and PHP apps build and serve with the real
toolchains (Debian's packages; npm installs from the npm registry); a failing build or a
missing toolchain rejects the push and changes nothing."""
import glob
import os

import pytest

from harness import REPO, need

APPS = os.path.join(REPO, "tests", "apps")


@pytest.fixture(scope="module")
def npm_ready(server):
    """npm as the piku user, trusting the machine's CA bundle (outbound TLS may go through a
    local CA here; an admin does the same in the piku user's ~/.npmrc)."""
    for binary in ("node", "npm"):
        need(binary)
    npmrc = os.path.join(server.home, ".npmrc")
    with open(npmrc, "w") as f:
        f.write("cafile=/etc/ssl/certs/ca-certificates.crt\nupdate-notifier=false\n")
    server.chown(npmrc)
    yield
    os.unlink(npmrc)


def push_ok(server, repo, app):
    r = server.push(repo, app)
    assert r.returncode == 0, r.stdout + server.logs()
    return r.stdout


def remote_lines(out):
    return [(line[len("remote: "):] if line.startswith("remote: ") else line).rstrip() for line in out.splitlines()]


def live_release(server, app):
    return os.path.realpath(server.path("apps", app))


def node_entries(server, app):
    base = server.path("state", app, "node")
    return sorted(n for n in os.listdir(base) if len(n) == 64)


def files_state(top):
    """{path: (inode, mtime)} of every file under top (what a later build must not touch)."""
    out = {}
    for d, _, files in os.walk(top):
        for n in files:
            st = os.lstat(os.path.join(d, n))
            out[os.path.join(d, n)] = (st.st_ino, st.st_mtime_ns)
    return out


def test_node_app_npm_ci_then_reused_for_an_unchanged_lock(server, npm_ready, tmp_path):
    repo = server.make_app("node-web", tmp_path / "nodeapp")
    out = push_ok(server, repo, "nodeapp")
    lines = remote_lines(out)
    assert "-----> Node.js app detected" in lines, out
    assert "-----> Installing Node.js packages: npm ci (package-lock.json)" in lines, out
    assert any(line.startswith("       1 package in node_modules (installed in ") for line in lines), out
    port = server.app_port("nodeapp")
    release1 = live_release(server, "nodeapp")
    _, body = server.wait_http(port, contains="node-web v1 ms=2d")
    assert f"path0={release1}/node_modules/.bin" in body
    # node_modules of the release: hard links to the cache entry keyed by the lock
    (key,) = node_entries(server, "nodeapp")
    cached = server.path("state", "nodeapp", "node", key, "node_modules", "ms", "index.js")
    assert os.stat(cached).st_ino == os.stat(os.path.join(release1, "node_modules", "ms", "index.js")).st_ino
    before = files_state(release1)
    entry_before = files_state(server.path("state", "nodeapp", "node", key))

    server.commit(repo, "v2", {"index.js": open(os.path.join(APPS, "node-web", "index.js")).read()
                                           .replace("node-web v1", "node-web v2")})
    out = push_ok(server, repo, "nodeapp")
    assert "-----> Node.js packages unchanged (package-lock.json): reusing an earlier install" in out, out
    assert "npm ci" not in out
    server.wait_http(port, contains="node-web v2 ms=2d")
    release2 = live_release(server, "nodeapp")
    assert release2 != release1 and os.path.isdir(os.path.join(release2, "node_modules", "ms"))
    assert files_state(release1) == before  # the old release is untouched ...
    assert files_state(server.path("state", "nodeapp", "node", key)) == entry_before  # ... and so is the cache
    assert node_entries(server, "nodeapp") == [key]


def test_node_failing_install_rejects_the_push_and_changes_nothing(server, npm_ready, tmp_path):
    repo = server.make_app("node-web", tmp_path / "nodefail")
    push_ok(server, repo, "nodefail")
    port = server.app_port("nodefail")
    server.wait_http(port, contains="node-web v1")
    before = server.tree()
    # package.json asks for a package the lock does not have: `npm ci` refuses
    pkg = open(os.path.join(repo, "package.json")).read().replace('"ms": "2.1.3"', '"ms": "2.1.3", "left-pad": "1.3.0"')
    server.commit(repo, "out of sync", {"package.json": pkg, "index.js": "syntax error v2\n"})
    r = server.push(repo, "nodefail")
    assert r.returncode != 0, r.stdout
    assert "npm ci failed (exit" in r.stdout, r.stdout
    assert server.tree() == before
    server.wait_http(port, contains="node-web v1")


def test_missing_toolchain_is_a_clear_error(server, tmp_path):
    repo = server.make_app("node-web", tmp_path / "nonode", {"ENV": "PATH=/nonexistent\n"})
    r = server.push(repo, "nonode")
    assert r.returncode != 0
    assert "node is not installed: as root, apt-get install nodejs npm" in r.stdout, r.stdout
    assert "Traceback" not in r.stdout
    assert not os.path.lexists(server.path("apps", "nonode"))
    assert glob.glob(server.path("uwsgi-enabled", "nonode_*")) == []


def test_node_version_settings(server, npm_ready, tmp_path):
    major = server.as_user(["node", "--version"]).stdout.strip().lstrip("v").split(".")[0]
    repo = server.make_app("node-web", tmp_path / "nodever", {"ENV": f"NODE_VERSION={major}\n"})
    out = push_ok(server, repo, "nodever")
    assert f"(NODE_VERSION={major})" in out, out
    port = server.app_port("nodever")
    server.wait_http(port, contains=f"node=v{major}.")
    # a version the server lacks, without nodeenv: refused, nothing changed
    before = server.tree()
    r = server.ssh("config:set", "nodever", "NODE_VERSION=12.22.12")
    assert r.returncode != 0, r.stdout
    assert "NODE_VERSION=12.22.12, but the server's Node.js is v" in r.stdout + r.stderr
    assert "apt-get install nodeenv" in r.stdout + r.stderr
    assert server.tree() == before
    # NODE_ENV is part of what decides node_modules: setting it reinstalls
    r = server.ssh("config:set", "nodever", "NODE_ENV=production")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "A build setting changed: redeploying" in r.stdout and "npm ci (package-lock.json)" in r.stdout, r.stdout
    server.wait_http(port, contains="node-web v1")
    assert len(node_entries(server, "nodever")) == 2  # both releases still use theirs


def test_python_app_with_package_json_builds_python_then_node(server, npm_ready, tmp_path):
    files = {name: open(os.path.join(APPS, "node-web", name)).read() for name in ("package.json", "package-lock.json")}
    repo = server.make_app("req-web", tmp_path / "pynode", files)
    out = push_ok(server, repo, "pynode")
    lines = remote_lines(out)
    assert "-----> Python (requirements.txt) app detected; then Node.js" in lines, out
    py = next(i for i, line in enumerate(lines) if line.startswith("-----> Installing requirements"))
    js = lines.index("-----> Installing Node.js packages: npm ci (package-lock.json)")
    assert py < lines.index("-----> Then Node.js") < js, out
    server.wait_http(server.app_port("pynode"), contains="req-web v1")
    live = server.read("envs/pynode/LIVE_ENV")
    assert f"NODE_PATH={live_release(server, 'pynode')}/node_modules" in live
    assert os.path.isdir(os.path.join(live_release(server, "pynode"), "node_modules", "ms"))
    # Python changes, then Node.js fails: rejected, and the live release keeps its virtualenv
    pkg = files["package.json"].replace('"ms": "2.1.3"', '"ms": "2.1.3", "left-pad": "1.3.0"')
    server.commit(repo, "v2", {"package.json": pkg, "requirements.txt": "gunicorn\nsix\n",
                               "app.py": open(repo / "app.py").read().replace("req-web v1", "req-web v2")})
    r = server.push(repo, "pynode")
    assert r.returncode != 0 and "+ six==" in r.stdout and "npm ci failed" in r.stdout, r.stdout
    assert "six" not in " ".join(os.listdir(glob.glob(server.path("envs", "pynode", "lib", "python3*"))[0]
                                           + "/site-packages"))
    r = server.ssh("restart", "pynode")
    assert r.returncode == 0, r.stdout + r.stderr
    server.wait_http(server.app_port("pynode"), contains="req-web v1")


def test_go_app_built_into_bin_and_served(server, tmp_path):
    need("go")
    repo = server.make_app("go-web", tmp_path / "goapp")
    out = push_ok(server, repo, "goapp")
    assert "-----> Go app detected" in out and "-----> Building: go build -o bin/ ./..." in out, out
    assert "Built bin/goweb in " in out, out
    server.wait_http(server.app_port("goapp"), contains="go-web v1 go1.")
    assert os.access(os.path.join(live_release(server, "goapp"), "bin", "goweb"), os.X_OK)
    # a compile error rejects the push; v1 keeps serving
    server.commit(repo, "broken", {"main.go": "package main\n\nfunc main() { undefined() }\n"})
    r = server.push(repo, "goapp")
    assert r.returncode != 0 and "go build failed" in r.stdout and "undefined" in r.stdout, r.stdout
    server.wait_http(server.app_port("goapp"), contains="go-web v1")


def test_ruby_app_bundled_and_served(server, tmp_path):
    need("ruby")
    need("bundle")
    repo = server.make_app("ruby-web", tmp_path / "rbapp")
    out = push_ok(server, repo, "rbapp")
    assert "-----> Ruby app detected" in out and "-----> Installing gems: bundle install (no Gemfile.lock)" in out, out
    server.wait_http(server.app_port("rbapp"), contains="ruby-web v1 ruby=3")
    release1 = live_release(server, "rbapp")
    config = open(os.path.join(release1, ".bundle", "config")).read()
    assert server.path("state", "rbapp", "ruby") in config
    server.commit(repo, "v2", {"app.rb": open(os.path.join(APPS, "ruby-web", "app.rb")).read()
                                         .replace("ruby-web v1", "ruby-web v2")})
    out = push_ok(server, repo, "rbapp")
    assert "-----> Gems unchanged (Gemfile): reusing an earlier install" in out, out
    server.wait_http(server.app_port("rbapp"), contains="ruby-web v2")
    # the lock bundler wrote on the first push comes back with the reused gems
    assert os.path.exists(os.path.join(live_release(server, "rbapp"), "Gemfile.lock"))


def test_rust_app_built_and_run_with_cargo_run(server, tmp_path):
    need("cargo")
    repo = server.make_app("rust-web", tmp_path / "rsapp")
    out = push_ok(server, repo, "rsapp")
    assert "-----> Rust app detected" in out and "-----> Building: cargo build" in out, out
    server.wait_http(server.app_port("rsapp"), contains="rust-web v1")
    assert os.path.exists(os.path.join(live_release(server, "rsapp"), "target", "debug", "rustweb"))
    assert f"CARGO_HOME={server.path('state', 'rsapp', 'cargo')}" in server.read("envs/rsapp/LIVE_ENV")


def test_php_app_served_by_uwsgi_php_plugin_behind_nginx(server, tmp_path):
    assert os.path.exists("/usr/lib/uwsgi/plugins/php_plugin.so"), \
        "uwsgi-plugin-php is not installed: run `bash scripts/install-deps` as root"
    repo = server.make_app("php-web", tmp_path / "phpapp", {"ENV": server.nginx_env("php.test")})
    out = push_ok(server, repo, "phpapp")
    assert "-----> PHP app detected" in out and "uWSGI's php plugin serves public/ as the web process" in out, out
    _, body = server.wait_http(server.app_port("phpapp"), contains="php-web v1 php=8")
    assert "app=phpapp" in body
    server.wait_http(server.nginx_port, host="php.test", contains="php-web v1")
    server.wait_http(server.nginx_port, "/hello.txt", host="php.test", contains="a static file")
    # a second push preboots the new release like any web process
    server.commit(repo, "v2", {"public/index.php": open(os.path.join(APPS, "php-web", "public", "index.php")).read()
                                                   .replace("php-web v1", "php-web v2")})
    push_ok(server, repo, "phpapp")
    server.wait_http(server.nginx_port, host="php.test", contains="php-web v2")
    r = server.ssh("ps", "phpapp")
    assert "web" in r.stdout, r.stdout


def test_php_line_with_a_bad_docroot_is_refused(server, tmp_path):
    repo = server.make_app("php-web", tmp_path / "phpbad", {"Procfile": "php: ../../etc\n"})
    r = server.push(repo, "phpbad")
    assert r.returncode != 0 and "php: wants a directory of the app" in r.stdout, r.stdout
    assert not os.path.lexists(server.path("apps", "phpbad"))
