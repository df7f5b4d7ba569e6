"""The GSM8K fine-tuning stack: config (``config``), the parts of a run (``run_parts.build_run``),
the loop (``loop.TrainingLoop``), the jitted step (``step``), data, micro-dev buffer, evaluation,
checkpoints, logs, comparisons and reports. Entry points: ``finetune``, ``compare``, ``sweep``,
``report`` (``main`` of each; console scripts ``hacbo-*``)."""
