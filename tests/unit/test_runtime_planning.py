"""Issue 13 item 8: runtimes other than Python: detection, the argv of each build, the
environment they give the app, and the content-keyed caches (pure parts and plain files)."""
import os
import types

import pytest

import piku
from piku import PikuError

WEB = {"web": "run-it"}


def runtime(files, workers=WEB):
    return piku.plan_runtime(set(files), workers, piku.RUNTIMES)[0]


@pytest.mark.parametrize("files, expected", [
    (["requirements.txt"], "python-requirements"),
    (["pyproject.toml"], "python-uv"),
    (["requirements.txt", "package.json"], "python-requirements+node"),
    (["pyproject.toml", "uv.lock", "package.json"], "python-uv+node"),
    (["Gemfile", "package.json"], "ruby"),           # the original's order: Ruby before Node
    (["package.json", "package-lock.json"], "node"),
    (["package.json", "go.mod"], "node"),
    (["pom.xml", "build.gradle"], "maven"),
    (["build.gradle"], "gradle"),
    (["build.gradle.kts"], "gradle"),
    (["go.mod", "main.go"], "go"),
    (["server.go"], "go"),
    (["Godeps"], "go"),
    (["deps.edn"], "clojure-cli"),
    (["project.clj"], "leiningen"),
    (["deps.edn", "project.clj"], "clojure-cli"),
    (["Cargo.toml"], "rust"),
    (["Cargo.toml", "rust-toolchain.toml"], "rust"),
    (["README.md"], "generic"),
])
def test_detection_follows_the_original_order(files, expected):
    assert runtime(files) == expected


def test_static_only_and_nothing_to_run():
    assert runtime(["index.html"], {"static": "."}) == "static"
    with pytest.raises(PikuError, match="nothing to run"):
        runtime(["index.html"], {"release": "true"})


def test_php_line_detected_and_built_beside_other_runtimes():
    workers, _ = piku.map_legacy_kinds({"php": "public", "worker": "x"}, [])
    assert runtime([], workers) == "php"
    assert runtime(["package.json"], workers) == "node+php"
    assert runtime(["requirements.txt", "package.json"], workers) == "python-requirements+node+php"


def test_companions_build_in_order_with_one_label():
    calls = []
    table = (("python-uv", "Python (uv) app detected", piku.detect_pyproject, lambda b: calls.append("py")),
             ("node", "Node.js app detected", piku.detect_node, lambda b: calls.append("node")))
    name, label, build = piku.plan_runtime({"pyproject.toml", "package.json"}, WEB, table)
    build(None)
    assert name == "python-uv+node" and calls == ["py", "node"]
    assert label == "Python (uv) app detected; then Node.js"


def test_a_node_app_does_not_build_python_or_go_beside_it():
    name, label, _ = piku.plan_runtime({"package.json", "requirements.txt.bak", "main.go"}, WEB, piku.RUNTIMES)
    assert name == "node" and label == "Node.js app detected"


# -- PHP ------------------------------------------------------------------------

def test_php_becomes_the_web_process_with_a_constant_command():
    workers, warnings = piku.map_legacy_kinds({"php": "public/", "worker": "python w.py"}, [])
    assert workers == {"web": piku.PHP_WEB_COMMAND, "worker": "python w.py"} and warnings == []
    assert "public" not in piku.PHP_WEB_COMMAND  # the docroot comes from the environment
    for option in ('--http-socket "$BIND_ADDRESS:$PORT"', "--plugin 0:php", '--php-docroot "$PIKU_PHP_DOCROOT"',
                   "-u UWSGI_GEVENT", "--die-on-term"):
        assert option in piku.PHP_WEB_COMMAND


@pytest.mark.parametrize("value, rel", [("public", "public"), ("/public/", "public"), ("/", "."), (".", "."),
                                        ("web/root", "web/root")])
def test_php_docroot_is_a_directory_of_the_app(value, rel):
    assert piku.parse_php_docroot(value) == rel


@pytest.mark.parametrize("value", ["../etc", "a/../../b", "pub lic", "x;rm -rf ~", "$HOME", "a\\b"])
def test_php_docroot_refuses_paths_outside_or_odd(value):
    with pytest.raises(PikuError, match="php: wants a directory"):
        piku.map_legacy_kinds({"php": value}, [])


@pytest.mark.parametrize("other", ["web", "wsgi"])
def test_php_and_another_server_refused(other):
    with pytest.raises(PikuError, match=f"php and {other} both serve"):
        piku.map_legacy_kinds({"php": ".", other: "app:app" if other == "wsgi" else "x"}, [])


def test_procfile_without_php_is_untouched():
    workers = {"web": "node index.js"}
    assert piku.map_legacy_kinds(workers, ["w"]) == (workers, ["w"])


@pytest.mark.parametrize("kind, plugin", [("jwsgi", "JVM"), ("rwsgi", "rack")])
def test_jvm_and_rack_kinds_run_as_workers_with_a_warning(kind, plugin):
    workers, warnings = piku.map_legacy_kinds({kind: "java -jar app.jar"}, [])
    assert workers == {kind: "java -jar app.jar"}
    assert warnings == [f"Procfile: {kind}: (uWSGI's {plugin} plugin in the original piku) runs as a background "
                        "worker here: serve HTTP with web: on $PORT"]


# -- Node -----------------------------------------------------------------------

@pytest.mark.parametrize("value, words", [(None, ["npm"]), ("", ["npm"]), ("npm", ["npm"]),
                                          ("npm --package-lock=false", ["npm", "--package-lock=false"]),
                                          ("yarn --production", ["yarn", "--production"]), ("pnpm", ["pnpm"])])
def test_package_manager_parsed(value, words):
    assert piku.parse_package_manager(value) == words


@pytest.mark.parametrize("value", ["bun", "npm install", "npm; rm -rf ~", "npm $(id)", "npm --x=`id`", "../npm"])
def test_package_manager_refused(value):
    with pytest.raises(PikuError, match="NODE_PACKAGE_MANAGER"):
        piku.validate_settings({"NODE_PACKAGE_MANAGER": value})


@pytest.mark.parametrize("files, manager, argv, lock", [
    (["package.json", "package-lock.json"], ["npm"], ["npm", "ci", "--no-audit", "--no-fund"], "package-lock.json"),
    (["package.json", "npm-shrinkwrap.json"], ["npm"], ["npm", "ci", "--no-audit", "--no-fund"], "npm-shrinkwrap.json"),
    (["package.json"], ["npm"], ["npm", "install", "--no-audit", "--no-fund"], None),
    (["package.json"], ["npm", "--package-lock=false"], ["npm", "install", "--no-audit", "--no-fund",
                                                         "--package-lock=false"], None),
    (["package.json", "yarn.lock"], ["yarn"], ["yarn", "install", "--frozen-lockfile"], "yarn.lock"),
    (["package.json", "package-lock.json"], ["yarn"], ["yarn", "install"], None),
    (["package.json", "pnpm-lock.yaml"], ["pnpm"], ["pnpm", "install", "--frozen-lockfile"], "pnpm-lock.yaml"),
])
def test_node_install_argv(files, manager, argv, lock):
    assert piku.plan_node_install(manager, set(files)) == (argv, lock)


@pytest.mark.parametrize("installed, wanted, ok", [("v20.11.1", "20", True), ("v20.11.1", "20.11", True),
                                                   ("v20.11.1", "v20.11.1", True), ("v20.11.1", "18", False),
                                                   ("v20.11.1", "20.1", False), ("v2.0.1", "20", False),
                                                   ("", "20", False)])
def test_node_version_matching(installed, wanted, ok):
    assert piku.node_version_matches(installed, wanted) is ok


@pytest.mark.parametrize("value", ["lts", "20.x", ">=18", "20.1.2.3", "node-20", "v"])
def test_node_version_refused(value):
    with pytest.raises(PikuError, match="NODE_VERSION"):
        piku.validate_settings({"NODE_VERSION": value})


def test_node_settings_trigger_a_rebuild():
    for key in ("NODE_VERSION", "NODE_PACKAGE_MANAGER", "NODE_ENV", "NPM_CONFIG_REGISTRY", "BUNDLE_WITHOUT"):
        assert piku.BUILD_KEYS_RE.match(key), key
    assert not piku.BUILD_KEYS_RE.match("NODE_PATHX_SECRET")


def test_count_node_packages(tmp_path):
    nm = tmp_path / "node_modules"
    for d in ("ms", "express", ".bin", "@types/node", "@types/ms"):
        (nm / d).mkdir(parents=True)
    (nm / ".package-lock.json").write_text("{}")
    assert piku.count_node_packages(str(nm)) == 4
    assert piku.count_node_packages(str(tmp_path / "none")) == 0


# -- the other builds -------------------------------------------------------------

def test_go_build_argv():
    assert piku.plan_go_build({"go.mod", "main.go"}) == ["go", "build", "-o", "bin/", "./..."]
    assert piku.plan_go_build({"b.go", "a.go", "a_test.go", "Godeps"}) == ["go", "build", "-o", "bin/", "a.go", "b.go"]
    assert piku.plan_go_build({"Godeps"}) is None


def test_gradle_prefers_the_wrapper_and_never_leaves_a_daemon():
    assert piku.plan_gradle_build({"build.gradle"}) == ["gradle", "--no-daemon", "build"]
    assert piku.plan_gradle_build({"build.gradle", "gradlew"}) == ["/bin/sh", "./gradlew", "--no-daemon", "build"]


@pytest.mark.parametrize("name, argv, binaries", [
    ("maven", ["mvn", "-B", "package"], ["java", "mvn"]),
    ("clojure-cli", ["clojure", "-T:build", "release"], ["java", "clojure"]),
    ("leiningen", ["lein", "uberjar"], ["java", "lein"]),
    ("rust", ["cargo", "build"], ["cargo", "rustc"]),
])
def test_one_command_builds(name, argv, binaries):
    got_argv, tools = piku.TOOL_BUILDS[name]
    assert got_argv == argv and [t[0] for t in tools] == binaries
    assert all(package for _, package in tools)


def fake_build(tmp_path, path="/nonexistent", **settings):
    paths = piku.paths_for(str(tmp_path / "piku"))
    release = os.path.join(paths.releases, "app", "r2")
    os.makedirs(release)
    return types.SimpleNamespace(paths=paths, app="app", release_dir=release, settings=settings,
                                 state=os.path.join(paths.state, "app"), env={"PATH": path}, verbose=False)


@pytest.mark.parametrize("tools, message", [
    ((("npm", "npm"),), "npm is not installed: as root, apt-get install npm"),
    ((("go", "golang-go"),), "go is not installed: as root, apt-get install golang-go"),
    ((("bundle", "ruby-bundler"),), "bundle is not installed: as root, apt-get install ruby-bundler"),
    (piku.TOOL_BUILDS["clojure-cli"][1][1:], "clojure is not installed: install the Clojure CLI (clojure.org's "
                                             "linux-install script; Debian's clojure package has no -T)"),
])
def test_missing_toolchain_names_the_debian_package(tmp_path, tools, message):
    with pytest.raises(PikuError) as e:
        piku.need_tools(fake_build(tmp_path), tools)
    assert str(e.value) == message


@pytest.mark.parametrize("builder, binary, package", [
    (piku.build_maven, "java", "default-jdk-headless"), (piku.build_leiningen, "java", "default-jdk-headless"),
    (piku.build_clojure_cli, "java", "default-jdk-headless"), (piku.build_rust, "cargo", "cargo"),
    (piku.build_go, "go", "golang-go"), (piku.build_ruby, "ruby", "ruby"),
])
def test_builders_check_their_toolchain_first(tmp_path, builder, binary, package):
    b = fake_build(tmp_path)
    with pytest.raises(PikuError, match=f"^{binary} is not installed: as root, apt-get install {package}$"):
        builder(b)
    assert os.listdir(b.release_dir) == []


def test_node_without_node_names_the_packages(tmp_path):
    b = fake_build(tmp_path)
    with pytest.raises(PikuError, match="node is not installed: as root, apt-get install nodejs npm"):
        piku.build_node(b)


def test_node_version_without_nodeenv_is_refused(tmp_path):
    b = fake_build(tmp_path, NODE_VERSION="12.22.0")
    with pytest.raises(PikuError, match="NODE_VERSION=12.22.0, but the server's Node.js is not installed.*nodeenv"):
        piku.build_node(b)


# -- environment ------------------------------------------------------------------

def env_of(tmp_path, runtime, procfile="web: x\n", **settings):
    b = fake_build(tmp_path)
    with open(os.path.join(b.release_dir, "Procfile"), "w") as f:
        f.write(procfile)
    out = piku.runtime_env(b.paths, "app", b.release_dir, runtime, settings, {"PATH": "/venv/bin:/usr/bin"})
    return b, out


def test_node_env_puts_the_release_bins_first(tmp_path):
    b, env = env_of(tmp_path, "python-uv+node")
    assert env["PATH"] == f"{b.release_dir}/node_modules/.bin:/venv/bin:/usr/bin"
    assert env["NODE_PATH"] == f"{b.release_dir}/node_modules"


def test_node_env_uses_a_finished_nodeenv_install(tmp_path):
    b, _ = env_of(tmp_path, "node")
    d = os.path.join(b.state, "nodeenv", "18.20.1")
    os.makedirs(d)
    env = piku.runtime_env(b.paths, "app", b.release_dir, "node", {"NODE_VERSION": "v18.20.1"}, {"PATH": "/usr/bin"})
    assert env["PATH"] == f"{b.release_dir}/node_modules/.bin:/usr/bin"  # not complete yet
    open(os.path.join(d, piku.CACHE_DONE), "w").close()
    env = piku.runtime_env(b.paths, "app", b.release_dir, "node", {"NODE_VERSION": "v18.20.1"}, {"PATH": "/usr/bin"})
    assert env["PATH"] == f"{b.release_dir}/node_modules/.bin:{d}/bin:/usr/bin"


def test_go_and_rust_env_caches_per_app_and_app_settings_win(tmp_path):
    b, env = env_of(tmp_path, "go")
    assert env["GOPATH"] == f"{b.state}/go" and env["GOCACHE"] == f"{b.state}/go-build"
    assert env["GOFLAGS"] == "-modcacherw" and env["PATH"].startswith(f"{b.release_dir}/bin:")
    b, env = env_of(tmp_path / "2", "go", GOPATH="/srv/go", GOFLAGS="-tags=prod")
    assert "GOPATH" not in env and env["GOFLAGS"] == "-tags=prod -modcacherw"
    b, env = env_of(tmp_path / "3", "rust")
    assert env == {"CARGO_HOME": f"{b.state}/cargo"}


def test_php_env_has_the_docroot_of_the_release(tmp_path):
    b, env = env_of(tmp_path, "php", "php: public/\n")
    assert env == {"PIKU_PHP_DOCROOT": f"{b.release_dir}/public"}
    b, env = env_of(tmp_path / "2", "php", "php: /\n")
    assert env == {"PIKU_PHP_DOCROOT": b.release_dir}


def test_other_runtimes_add_nothing(tmp_path):
    for name in ("python-uv", "generic", "static", "maven", "ruby"):
        assert env_of(tmp_path / name, name)[1] == {}


# -- caches -------------------------------------------------------------------------

def test_cache_entry_incomplete_is_emptied_complete_is_kept(tmp_path):
    b = fake_build(tmp_path)
    key = "a" * 64
    d, ready = piku.cache_entry(b, "node", key)
    assert not ready and os.listdir(d) == []
    open(os.path.join(d, "half-written"), "w").close()
    d, ready = piku.cache_entry(b, "node", key)
    assert not ready and os.listdir(d) == []  # a cut-off build starts over
    assert piku.fill_cache(d, lambda: open(os.path.join(d, "node_modules"), "w").close() or 7) == 7
    d, ready = piku.cache_entry(b, "node", key)
    assert ready and "node_modules" in os.listdir(d)


def test_a_failed_fill_leaves_no_entry(tmp_path):
    b = fake_build(tmp_path)
    d, _ = piku.cache_entry(b, "node", "b" * 64)

    def fail():
        open(os.path.join(d, "partial"), "w").close()
        raise PikuError("npm ci failed (exit 1)")
    with pytest.raises(PikuError, match="npm ci failed"):
        piku.fill_cache(d, fail)
    assert not os.path.exists(d)


def test_cache_entries_of_pruned_releases_are_removed(tmp_path):
    b = fake_build(tmp_path)
    base = os.path.join(b.state, "node")
    old, kept, new = "1" * 64, "2" * 64, "3" * 64
    for rid, key in (("r0", old), ("r1", kept)):
        os.makedirs(os.path.join(base, key))
        os.makedirs(os.path.join(base, "used-by"), exist_ok=True)
        with open(os.path.join(base, "used-by", rid), "w") as f:
            f.write(key + "\n")
    os.makedirs(os.path.join(b.paths.releases, "app", "r1"))  # r0 was pruned, r1 is kept
    os.makedirs(os.path.join(base, new))
    os.makedirs(os.path.join(base, "not-a-key"))
    piku.cache_used(b, "node", new)
    assert sorted(os.listdir(base)) == sorted([kept, new, "not-a-key", "used-by"])
    assert sorted(os.listdir(os.path.join(base, "used-by"))) == ["r1", "r2"]


def test_link_tree_hard_links_files_and_keeps_symlinks(tmp_path):
    src = tmp_path / "src"
    (src / "pkg" / "bin").mkdir(parents=True)
    (src / "pkg" / "index.js").write_text("x")
    (src / ".bin").mkdir()
    os.symlink("../pkg/index.js", src / ".bin" / "tool")
    piku.link_tree(str(src), str(tmp_path / "dst"))
    assert os.stat(src / "pkg" / "index.js").st_ino == os.stat(tmp_path / "dst" / "pkg" / "index.js").st_ino
    assert os.readlink(tmp_path / "dst" / ".bin" / "tool") == "../pkg/index.js"
    (tmp_path / "dst" / "pkg" / "new.js").write_text("y")  # new files stay in the copy
    assert not (src / "pkg" / "new.js").exists()
