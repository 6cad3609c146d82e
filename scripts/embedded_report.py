"""Print the embedded model's card numbers (Markdown) — pasted into data/README.md.

    .venv/bin/python scripts/embedded_report.py [--ref data/tiny-v4] [--windows 8]
"""
import argparse

from dsv4lib.eval.embedded_report import embedded_report, format_report
from dsv4lib.paths import EMBEDDED_REF

ap = argparse.ArgumentParser()
ap.add_argument("--ref", default=str(EMBEDDED_REF))
ap.add_argument("--windows", type=int, default=8)
args = ap.parse_args()
print(format_report(embedded_report(args.ref, n_windows=args.windows)))
