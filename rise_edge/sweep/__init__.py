"""The sweep stage: a grid of runs launched (locally or on SLURM) and collected into one table.

    launch.py   `rise-edge sweep`: expand the grid, launch each run (train, export, bench)
    collect.py  `rise-edge collect`: read every run's records, pick by source validation, tabulate
    __main__.py `python -m rise_edge.sweep SPEC.json`: one run of the local pool, in its own process
"""
