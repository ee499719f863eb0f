"""The test server comes up: sshd forces every login through piku.py."""


def test_ssh_help_and_apps(server):
    r = server.ssh("help")
    assert r.returncode == 0, r.stderr
    assert "config:set" in r.stdout and "ps:scale" in r.stdout
    assert server.ssh("apps").returncode == 0
    assert "Added key" in server.setup_ssh_output and "piku-test" in server.setup_ssh_output
