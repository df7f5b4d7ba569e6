"""Research tools built on the trainer, each in one place: multi-seed comparisons
(``compare``), learning-rate search (``sweep``), the evidence pipeline (``evidence``), AutoLRS
(``autolrs``), the curvature probe (``curvature``), the lr·wd sweep (``lrwd``), run reports
(``report``) and their statistics (``stats``). Needs the ``research`` extra."""
