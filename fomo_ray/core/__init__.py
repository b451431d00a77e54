"""The run core: the continual loop (:mod:`.loop`, read top to bottom), one training step (:mod:`.batch_step`), exact
resume (:mod:`.checkpoint`), how a config becomes a run (:mod:`.assembly`), DDP across ranks (:mod:`.distributed`) and
where a run's inputs live (:mod:`.inputs`). Runs without Ray, MLflow or the CLI."""
