"""The example app: a tiny WSGI callable. Its one dependency (markupsafe) lives in the venv."""
import os

from markupsafe import escape


def application(environ, start_response):
    name = escape(environ.get("QUERY_STRING", "") or "world")
    body = f"Hello, {name}! This is {os.environ.get('APP')} on piku.py.\n"
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    return [body.encode()]
