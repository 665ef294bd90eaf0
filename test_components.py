#!/usr/bin/env python3
"""The guide's "run first" component check: ``python3 test_components.py`` (= ``stage1 check``).

Runs every component once on synthetic data with the test config and checks each result; takes
seconds. Exit status 0 when all pass, 2 with one line naming the failing component otherwise.
"""

import sys

from stage1.cli import main

if __name__ == "__main__":
    sys.exit(main(["check", *sys.argv[1:]]))
