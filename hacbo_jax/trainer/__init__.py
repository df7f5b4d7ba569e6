"""The fine-tuning stack, from a config to a jitted step: ``config`` (schema, loading,
checks), ``run_parts.build_run`` (everything a run is made of), ``step`` (the jitted training
step), ``loop.TrainingLoop`` (steps, evaluation, checkpoints, logs, signals), ``checkpoint``,
``logs``, ``sharding`` and ``distributed`` (device meshes), ``evaluate`` (exact match), and the
commands ``finetune``, ``export`` and ``pretrain_base``. Needs the ``train`` extra."""
