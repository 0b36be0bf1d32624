"""`make bench`: load the real `pgrelay serve` and report latency, throughput,
memory per idle connection, catch-up time and the doorbell's write cost.

Run with ``python -m bench.run`` (see bench/README.md).
"""
