"""Convert h5ad files into a vcc-dist corpus. `python jobs/convert.py --help` lists the options.

Locally: `python jobs/convert.py data/*.h5ad --out corpus/` (embedded Ray).
On a cluster: `ray job submit --working-dir . -- python jobs/convert.py ... --out /shared/corpus`,
or with inputs and corpus in object storage (no shared file system needed; AWS_* variables as in
vcc_dist/storage.py): `... jobs/convert.py s3://bucket/raw/ --out s3://bucket/corpus`.
"""

import sys

import _bootstrap  # noqa: F401

from data_conversion.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
