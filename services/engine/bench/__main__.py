"""`python -m baton.services.engine.bench`: the throughput bench (throughput.py)."""

from baton.services.engine.bench.throughput import main

raise SystemExit(main())
