"""megatron_align.resilience: detectors inside the ranks, a supervisor outside them, and what they share.

The boundary is the layout. :mod:`.inrank` holds the trainer callbacks that run in every rank
(straggler scores, faulty-GPU checks, NaN/spike and trajectory monitors, heartbeat writer, fault
injection); :mod:`.supervisor` holds ``megatron-align launch`` (jobs, hang watchdog, failure
classification, restarts, run report, goodput model). Neither imports the other. They talk only
through exit codes and files in the run dir, whose vocabulary is the top level: :mod:`.exit_codes`,
:mod:`.heartbeat_files`, the fault grammar (:mod:`.faults`) and the config (:mod:`.config`).
"""
