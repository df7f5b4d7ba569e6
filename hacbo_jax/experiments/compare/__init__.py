"""Multi-seed comparisons of methods at equal budgets: the grid (``run``), the base model's
evaluation (``base``), the paired statistics (``stats``) and the report (``report``)."""
