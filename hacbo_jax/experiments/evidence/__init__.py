"""The evidence pipeline: tuning, equal-budget comparison and stability grid (``run``), and
its summary and report (``report``)."""
