"""Exit codes: how a rank tells the supervisor *what kind* of failure it saw.

The supervisor (``megatron-align launch``) never talks to a rank; it reads how the
rank ended and a few files in ``<run_dir>``. A rank's exit code says *what kind* of
failure it saw, so the supervisor can decide *what to do* without parsing logs:

====  =====================  ===========================================================
code  name                   supervisor action
====  =====================  ===========================================================
0     EXIT_OK                done (or a requested stop that was not a requeue)
2     EXIT_USER_ERROR        bad config / missing file: never retried (a restart would
                             fail the same way)
75    EXIT_REQUEUE           stopped on SIGUSR1/SIGTERM after checkpointing (EX_TEMPFAIL
                             from sysexits.h): requeue / restart, nothing is broken
86    EXIT_FAULTY_HARDWARE   a detector blamed hardware (NVML error, SDC checksum,
                             broken collective, DP weight divergence, straggler with
                             policy ``stop``): restart from the newest complete
                             checkpoint *excluding the nodes* in ``exclude_nodes.txt``
87    EXIT_NUMERICS          NaN/Inf or loss spike with policy ``stop``, too many skipped
                             steps, or a trajectory stop: restart from the newest
                             complete checkpoint (same nodes)
88    EXIT_CHECKPOINT_LOAD   this rank could not load checkpoint directory X (any
                             library error, a bad marker, a checksum mismatch); it
                             appended ``{"rank", "checkpoint": X, "error"}`` to
                             ``checkpoint_load_failures.jsonl`` first. The supervisor
                             sets X aside (``X.corrupt-<time>``, never deleted) when X
                             is one of this run's checkpoints and restarts from the one
                             before; otherwise (``checkpoint.load`` of another run, no
                             record) it stops
89    EXIT_STORAGE           a write hit ENOSPC / EDQUOT / EROFS / EIO, or the next checkpoint
                             would not fit (checked before writing); the rank appended
                             ``{rank, path, errno, free_bytes, needed_bytes}`` to
                             ``storage_failures.jsonl``: never retried (the next attempt meets
                             the same disk). The supervisor then exits 89 itself, with one
                             message (space, intact checkpoint, what to do), and under SLURM
                             does *not* requeue: freeing space needs a person, and a requeued
                             job would start and fail again (or sit held) without one
93    EXIT_DO_NOT_REQUEUE    give up: do not restart or requeue (nvidia-resiliency-ext's
                             convention)
====  =====================  ===========================================================

Any other non-zero code (a Python traceback exits 1, a signal 128+N) is an unclassified crash: the
supervisor restarts within its retry budget (:mod:`megatron_align.resilience.supervisor.policy` decides).
"""

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_REQUEUE = 75
EXIT_FAULTY_HARDWARE = 86
EXIT_NUMERICS = 87
EXIT_CHECKPOINT_LOAD = 88
EXIT_STORAGE = 89
EXIT_DO_NOT_REQUEUE = 93
