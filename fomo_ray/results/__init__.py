"""Results and reports: a sweep's tables read back (:mod:`.sweep_results`), reports and plots (:mod:`.report`), a
run's deployed model in open_clip's format (:mod:`.export`), what an ended trial keeps (:mod:`.retention`), and
finished trials kept for reuse (:mod:`.trial_cache`)."""
