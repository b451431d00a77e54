"""Compute budgets (the paper's Memory-Adjusted FLOPs): one step measured (:mod:`.step_measure`), its records and their
cache (:mod:`.budget_records`), the paper's arithmetic from FLOPs to steps per task (:mod:`.budget_math`), and the plan
a run follows (:mod:`.budget`). What a whole sweep will cost before launch is :mod:`fomo_ray.planning`."""
