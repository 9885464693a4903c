"""`python -m tokenforge.bench MODE ...`: the benchmarks without the main CLI."""

import sys

from tokenforge.bench.cli import main

sys.exit(main())
