"""MLflow, the only place it is imported: the writer (:mod:`.writer`: a parent run per sweep, a child run per trial),
one run's life from open to close (:mod:`.tracked_run`: the only code that writes to a trial's or a run's MLflow
run) and the UI (:mod:`.ui`: study views, the server, page links)."""
