"""The one compiled part: nfqueue.py's hot loop (dataplane/queue/_nfqueue.c).

Optional: where it cannot be built (no gcc, no Python headers) pip still
installs dataplane, and nfqueue.py decides in Python instead. Everything
else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("dataplane.queue._nfqueue", ["dataplane/queue/_nfqueue.c"],
                             extra_compile_args=["-O2", "-Wall"], optional=True)])
