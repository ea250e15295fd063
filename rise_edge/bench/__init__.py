"""The bench stage: every artefact of a run timed and scored per domain, in one report.

    driver.py     `rise-edge bench`: accuracy per domain, latency and resources, row by engine
    report.py     report.json, report.md and its plots
    resources.py  the machine: CPU, GPU, memory, Jetson tegrastats
"""
