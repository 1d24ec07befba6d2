"""Lets `python jobs/<job>.py` import vcc_dist from a checkout that is not pip-installed
(e.g. a `ray job submit --working-dir .` upload)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
