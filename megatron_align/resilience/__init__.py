"""megatron_align.resilience: detectors inside the ranks, a supervisor outside them, and what they share.

The boundary is the layout. :mod:`.inrank` holds the trainer callbacks that run in every rank
(straggler scores, faulty-GPU checks, NaN/spike and trajectory monitors, heartbeat writer, fault
injection); :mod:`.supervisor` holds ``megatron-align launch`` (the pure restart policy, jobs, hang
watchdog, failure classification, run report). Neither imports the other. They talk only through exit
codes and files in the run dir, whose whole vocabulary is :mod:`.protocol`. The config dataclasses live
in :mod:`megatron_align.config.resilience`.
"""
