#!/usr/bin/env python
"""Summarize a sweep as tables: `python scripts/summarize.py DIR [--baseline method=ce] ...`.

The code lives in kdexp/report/summary.py (also the console script `kdexp-summarize`);
`python scripts/summarize.py --help` lists the options.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's kdexp

from kdexp.report.summary import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
