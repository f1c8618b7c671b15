"""Load generator: workloads, arrivals, streaming client, SLO metrics and reports."""
