# Written by piku.py on every deploy; do not edit.
import os, sys, site, importlib
os.chdir('/srv/piku/releases/demo/20261130-120000-abcdef0123')
os.environ.update({'PYTHON_VERSION': '3.13', 'APP': 'demo', 'DATA_ROOT': '/srv/piku/data/demo', 'PORT': '5000', 'VIRTUAL_ENV': '/srv/piku/venvs/demo/0123456789abcdef', 'PATH': '/srv/piku/venvs/demo/0123456789abcdef/bin:/usr/bin:/bin', 'PIKU_APP_DIR': '/srv/piku/releases/demo/20261130-120000-abcdef0123', 'PROC_TYPE': 'wsgi'})
sys.path[0:0] = ['/srv/piku/releases/demo/20261130-120000-abcdef0123'] + [p for p in os.environ.get('PYTHONPATH', '').split(':') if p]
site.addsitedir('/srv/piku/venvs/demo/0123456789abcdef/lib/python3.13/site-packages')
sys.prefix = sys.exec_prefix = '/srv/piku/venvs/demo/0123456789abcdef'
application = getattr(importlib.import_module('app'), 'application')
