"""The sweep engine before launch, without Ray: the sweep YAML, its presets and plan (:mod:`.sweep_spec`,
:mod:`.presets`), trial params, the sweep's directory state and resume (:mod:`.sweep_state`), early stopping and the
sweep-wide budget rules, the pre-launch check (:mod:`.sweep_inputs`) and what the sweep will cost (:mod:`.cost_estimate`,
:mod:`.throughput`, :mod:`.overhead`). ``fomo-ray sweep --dry-run`` runs on this folder alone."""
