"""`python -m store.cli`: the same as `aigw`."""

import sys

from store.cli import main

sys.exit(main())
