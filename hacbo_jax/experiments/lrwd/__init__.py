"""The lr·wd sweep: does training depend on the product of learning rate and weight decay
(``sweep``: the grid and its analysis), and the ``hacbo-sweep-lrwd`` command (``run``)."""

from hacbo_jax.experiments.lrwd.sweep import SweepResult, analyse, grid_runs, run_sweep, t_gamma

__all__ = ["SweepResult", "analyse", "grid_runs", "run_sweep", "t_gamma"]
