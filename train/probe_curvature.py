"""``python -m train.probe_curvature`` from a checkout (installed: ``hacbo-probe-curvature``); see
:mod:`hacbo_jax.experiments.curvature.run`."""

import sys

from hacbo_jax.experiments.curvature.run import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.probe_curvature"))
