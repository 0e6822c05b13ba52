"""megatron_align.resilience.inrank: the detectors that run inside every rank, as trainer callbacks.

Straggler scores (:mod:`.straggler`), faulty-GPU checks (:mod:`.health`), NaN/spike and
loss-trajectory monitors (:mod:`.numerics`), the heartbeat writer (:mod:`.heartbeat`) and the
collectives they share (:mod:`.ranks`). Nothing here talks to the supervisor except through
exit codes and files in the run dir (:mod:`megatron_align.resilience.exit_codes`).
"""
