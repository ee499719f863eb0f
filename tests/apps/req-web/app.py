"""A plain WSGI callable served by gunicorn (a `web:` worker)."""
import os


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"req-web v1 port={os.environ.get('PORT')} proc={os.environ.get('PROC_TYPE')}\n".encode()]
