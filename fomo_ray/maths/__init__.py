"""Pure functions, no state and no I/O: the CLIP loss, LR schedules, the AdamW parameter groups, micro-batches and
activation checkpointing with their costs, the merge operators (offline and continual), seed statistics and the
paper's findings as checks. Imports only the top-level leaves of :mod:`fomo_ray`."""
