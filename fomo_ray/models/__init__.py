"""Models and evaluation: open_clip backbones built as a tag was trained (:mod:`.backbones`), zero-shot and retrieval
evaluation (:mod:`.evaluation`), and the FoMo-in-Flux metrics A_KA / A_ZS / GM (:mod:`.metrics`)."""
