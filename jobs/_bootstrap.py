"""Lets `python jobs/<job>.py` import vcc_dist from a checkout that is not pip-installed
(e.g. a `ray job submit --working-dir .` upload).

It also takes the jobs/ folder itself off ``sys.path`` (Python puts a script's folder first):
Ray hands the driver's ``sys.path`` to its workers, and a job file named like a standard-library
module would shadow it there (a ``jobs/statistics.py`` once broke ``torch._inductor``'s
``from statistics import median`` inside DeepSpeed's import of its Muon optimizer). The jobs' shared helpers are therefore imported as
``jobs._cli`` (the checkout root is on ``sys.path``), not as a top-level ``_cli``."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(ROOT, "jobs")
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != JOBS]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
