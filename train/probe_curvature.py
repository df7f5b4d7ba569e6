"""``python -m train.probe_curvature`` from a checkout (installed: ``hacbo-probe-curvature``); see
:mod:`hacbo_jax.training.probe_curvature`."""

import sys

from hacbo_jax.training.probe_curvature import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.probe_curvature"))
