"""Convert h5ad files into a vcc-dist corpus. `python jobs/convert.py --help` lists the options.

Locally: `python jobs/convert.py data/*.h5ad --out corpus/` (embedded Ray).
On a cluster: `ray job submit --working-dir . -- python jobs/convert.py ... --out /shared/corpus`.
"""

import sys

import _bootstrap  # noqa: F401

from data_conversion.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
