"""megatron_align.tracking: MLflow (embedded store by default) or plain-file tracking, and run plots.

:mod:`.backends` holds the trackers, :mod:`.callback` the training callback, :mod:`.plots` the
plots drawn from a run dir's files.
"""
