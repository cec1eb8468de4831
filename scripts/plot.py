#!/usr/bin/env python
"""Draw a sweep as PNGs: `python scripts/plot.py SWEEP [--out DIR] [--metric val/acc]`, the same as
`kdexp-plot`. What each figure shows: kdexp/report/plots.py."""
import sys

from kdexp.report.plots import main

if __name__ == "__main__":
    sys.exit(main())
