"""`python -m rise_edge.sweep SPEC.json`: one run of the local pool, in its own process."""

import sys

from rise_edge.sweep.launch import run_worker

sys.exit(run_worker(sys.argv[1]))
