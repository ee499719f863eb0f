"""A wsgi app: its body shows a package that exists only in the app's virtualenv."""
import os
import sys

import markupsafe


def application(environ, start_response):
    body = (f"uv-wsgi v1 markupsafe={markupsafe.__version__} "
            f"python={sys.version_info[0]}.{sys.version_info[1]} app={os.environ.get('APP')}\n")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
