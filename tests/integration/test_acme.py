"""Issue 4: certificates from a real ACME CA (Debian's pebble) over HTTP-01 through the real nginx,
with Debian's dehydrated as the client; failures fall back to the self-signed certificate."""
import os
import ssl

import pytest

from test_nginx import https_get

NAMES = "acme.piku.test, www.acme.piku.test"


@pytest.fixture(scope="module")
def pebble(server):
    return server.start_pebble()


@pytest.fixture(scope="module")
def acme_app(server, pebble, tmp_path_factory):
    url, ca_file = pebble
    env = server.nginx_env(NAMES, ACME_ROOT_CA=url, ACME_CA_BUNDLE=ca_file,
                           ACME_EMAIL="ops@piku-tests.example.org")
    repo = server.make_app("kinds", tmp_path_factory.mktemp("acme") / "acme", {"ENV": env})
    r = server.push(repo, "acme")
    assert r.returncode == 0, r.stdout + server.logs()
    return repo, r.stdout


def serial(server, host, cafile):
    """The served certificate's serial, verified against cafile and host (with retries: nginx
    reloads a moment after the certificate is installed)."""
    import time
    deadline = time.monotonic() + 20
    while True:
        try:
            status, body, der = https_get(server, host, cafile=cafile)
            assert status == 200 and '"APP": "acme"' in body
            return der
        except (OSError, ssl.SSLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_certificate_issued_by_the_ca_for_every_name(server, pebble, acme_app):
    _, out = acme_app
    assert f"Requesting a certificate for acme.piku.test, www.acme.piku.test from {pebble[0]} " \
           "(dehydrated)" in out, out
    assert "certificate installed, valid until" in out
    root = server.pebble_root()
    for host in ("acme.piku.test", "www.acme.piku.test"):  # verified chain + host name check
        serial(server, host, root)
    assert oct(os.stat(server.path("nginx", "acme.key")).st_mode & 0o777) == "0o600"


def test_certs_command_shows_the_acme_certificate(server, pebble, acme_app):
    r = server.ssh("certs", "acme")
    assert r.returncode == 0 and f"acme: {NAMES} (acme from {pebble[0]}, valid until " in r.stdout, r.stdout + r.stderr


def test_redeploy_keeps_a_valid_certificate(server, acme_app):
    repo, _ = acme_app
    before = server.read("nginx/acme.crt")
    server.commit(repo, "empty")
    r = server.push(repo, "acme")
    assert r.returncode == 0, r.stdout
    assert "Requesting a certificate" not in r.stdout
    assert server.read("nginx/acme.crt") == before


def test_forced_renewal_installs_a_new_certificate(server, acme_app):
    root = server.pebble_root()
    first = serial(server, "acme.piku.test", root)
    r = server.ssh("certs:renew", "--force", "acme")
    assert r.returncode == 0, r.stdout + r.stderr
    import time
    deadline = time.monotonic() + 20
    while serial(server, "acme.piku.test", root) == first:
        assert time.monotonic() < deadline, "nginx still serves the old certificate"
        time.sleep(0.3)


def test_unreachable_ca_falls_back_to_self_signed(server, pebble, tmp_path):
    from harness import free_port
    env = server.nginx_env("down.piku.test", ACME_ROOT_CA=f"https://127.0.0.1:{free_port()}/dir",
                           ACME_CA_BUNDLE=pebble[1])
    repo = server.make_app("kinds", tmp_path / "down", {"ENV": env})
    r = server.push(repo, "down")
    assert r.returncode == 0, r.stdout
    assert "dehydrated could not get a certificate" in r.stdout and "keeping the current certificate" in r.stdout
    status, body, der = https_get(server, "down.piku.test")
    assert status == 200 and ssl.DER_cert_to_PEM_cert(der).strip() == server.read("nginx/down.crt").strip()
    assert '"source": "self-signed"' in server.read("state/down/certificate.json")


def test_bad_acme_settings_rejected(server, acme_app):
    before = server.tree()
    for kv in ("ACME_ROOT_CA=http://insecure.example/dir", "ACME_ROOT_CA=$(id)", "ACME_CLIENT=certbot",
               "ACME_EMAIL=not an address", "ACME_CA_BUNDLE=/tmp/x;rm"):
        r = server.ssh("config:set", "acme", kv)
        assert r.returncode != 0 and r.stderr.count("\n") == 1, (kv, r.stderr)
    assert server.tree() == before


def test_admin_certificate_is_never_replaced(server, pebble, tmp_path):
    """A certificate the admin put in nginx/ (piku has no record of it) stays, ACME or not."""
    import subprocess
    url, ca_file = pebble
    crt, key = server.path("nginx", "adminc.crt"), server.path("nginx", "adminc.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj",
                    "/CN=adminc.piku.test", "-keyout", key, "-out", crt], check=True, capture_output=True)
    for path in (crt, key):
        server.chown(path)
    before = open(crt).read()
    env = server.nginx_env("adminc.piku.test", ACME_ROOT_CA=url, ACME_CA_BUNDLE=ca_file)
    repo = server.make_app("kinds", tmp_path / "adminc", {"ENV": env})
    r = server.push(repo, "adminc")
    assert r.returncode == 0 and "Requesting a certificate" not in r.stdout, r.stdout
    server.ssh("certs:renew", "adminc")
    assert open(crt).read() == before
    assert "provided by the admin" in server.ssh("certs", "adminc").stdout
