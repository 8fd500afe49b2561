"""`python -m benchmarks` runs the side-by-side comparison (benchmarks/compare.py)."""

from benchmarks.compare import main

raise SystemExit(main())
