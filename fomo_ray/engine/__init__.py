"""The sweep engine at run time, the only place Ray is imported: Ray Tune trials (:mod:`.tune_sweep`,
:mod:`.tune_callbacks`), Ray Train runs (:mod:`.ray_train`, :mod:`.final_uploads`, their local scratch
:mod:`.scratch`), starting or joining a cluster and its guards (:mod:`.ray_session`, :mod:`.preemptions`), the
stopping and budget boards (:mod:`.stop_board`), and a run on this machine without Ray (:mod:`.local_run`)."""
