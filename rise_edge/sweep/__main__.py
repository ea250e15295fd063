"""`python -m rise_edge.sweep SPEC.json`: one run of the local pool, in its own process."""

import sys

from rise_edge.startup import quiet_ctrl_c_while_starting

quiet_ctrl_c_while_starting()  # the sweep's Ctrl-C reaches its workers while they import torch

from rise_edge.sweep.launch import run_worker  # noqa: E402

sys.exit(run_worker(sys.argv[1]))
