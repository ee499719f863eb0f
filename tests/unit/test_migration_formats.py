"""Unit tests for issue 13 (switching from the original piku and back): its process titles, nginx
configs of any layout in the check, config values expanded as it did, and the files `downgrade`
writes in its formats."""

import os

import piku


def test_master_titles_of_both_pikus():
    assert piku.parse_master_title("shop:wsgi.1 uWSGI master") == ("shop:wsgi.1", True)
    assert piku.parse_master_title("my.app:web.12 uWSGI master") == ("my.app:web.12", True)
    assert piku.parse_master_title("shop:cron1:uWSGI master") == ("shop:cron1", False)  # the original's
    for other in ("shop:wsgi:uWSGI worker 1", "shop:wsgi.1 uWSGI worker 2", "uwsgi --ini x.ini", "sleep 1",
                  "shop uWSGI master", "a:b:c:uWSGI master", ""):
        assert piku.parse_master_title(other) == (None, False), other


def test_a_checkout_of_the_original_becomes_a_legacy_release(tmp_path, capsys):
    paths = piku.paths_for(str(tmp_path))
    checkout = os.path.join(paths.apps, "shop")
    os.makedirs(os.path.join(checkout, "public"))
    with open(os.path.join(checkout, "public", "index.html"), "w") as f:
        f.write("hi")
    legacy = piku.adopt_legacy_checkout(paths, "shop")
    assert os.path.islink(checkout) and os.readlink(checkout) == legacy
    assert os.path.basename(legacy).startswith("legacy-") and os.path.dirname(legacy) == os.path.join(paths.releases, "shop")
    assert open(os.path.join(checkout, "public", "index.html")).read() == "hi"
    assert piku.adopt_legacy_checkout(paths, "shop") is None  # (once)
    assert "was a checkout of the original piku" in capsys.readouterr().out
