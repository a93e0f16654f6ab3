"""`python -m aigw_bench`: what `scripts/bench` runs."""

import sys

from aigw_bench.cli import main

sys.exit(main(sys.argv[1:]))
