"""MLflow, the only place it is imported: the writer (:mod:`.writer`: a parent run per sweep, a child run per trial)
and the UI (:mod:`.ui`: study views, the server, page links)."""
