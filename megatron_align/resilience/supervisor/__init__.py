"""megatron_align.resilience.supervisor: the restart manager outside the ranks (`megatron-align launch`).

:mod:`.supervisor` runs attempts one after another: it starts the job (:mod:`.jobs`, local processes or one
srun step), watches exit codes and heartbeat files (:mod:`.watchdog`), classifies how the attempt ended
(:mod:`.failures`), asks the pure restart policy what to do (:mod:`.policy`) and reports the run's goodput
(:mod:`.run_report`). It never imports the trainer or torch: it knows the ranks only through exit codes and
files in the run dir (:mod:`megatron_align.resilience.protocol`).
"""
