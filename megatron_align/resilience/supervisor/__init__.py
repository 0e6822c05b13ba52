"""megatron_align.resilience.supervisor.supervisor: the restart manager outside the ranks (`megatron-align launch`).

It starts the job (:mod:`.jobs`), watches exit codes and heartbeat files (:mod:`.watchdog`),
classifies failures (:mod:`.failures`), restarts, and reports the run's goodput (:mod:`.run_report`,
:mod:`.goodput`). It never imports the trainer or torch: it knows the ranks only through
exit codes and files in the run dir (:mod:`megatron_align.resilience.exit_codes`).
"""
