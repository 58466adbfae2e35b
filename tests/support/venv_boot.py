"""Run a module of this checkout with the system interpreter and the venv's packages.

    /usr/bin/python3.11 -S venv_boot.py <venv site-packages> <module> [args...]

For processes that run as another uid than the venv's owner (tests/support/transparent_netns.py):
a venv made from an interpreter under a private home cannot be executed by them. `-S` keeps the
system's own site-packages out; the venv's are added with their .pth files (the editable
install of this checkout among them).
"""

import runpy
import site
import sys

if __name__ == "__main__":
    site.addsitedir(sys.argv.pop(1))
    if len(sys.argv) > 1 and sys.argv[1] == "-m":  # python -m MODULE ARGS...
        sys.argv.pop(1)
    module = sys.argv.pop(1)
    if module.endswith(".py"):
        runpy.run_path(module, run_name="__main__")
    else:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
