"""megatron_align.resilience.protocol: everything the ranks and the supervisor agree on, and nothing else.

The supervisor never talks to a rank; they share only exit codes, environment variables and files in the run
dir. Each module here is one part of that vocabulary, standard library only (no torch), imported by both sides:

- :mod:`.exit_codes` -- what a rank's exit code means (86 hardware, 87 numerics, 88 checkpoint load, ...);
- :mod:`.run_files` -- the ``*.jsonl`` records the detectors append (names, append, read);
- :mod:`.exclude_nodes` -- ``exclude_nodes.txt``, the nodes no later attempt may use;
- :mod:`.heartbeats` -- per-rank heartbeat files, stack dumps, ``stop_request``, the supervisor's env vars;
- :mod:`.rank_exit` -- each srun rank's own exit record (and the tiny wrapper that writes it);
- :mod:`.storage` -- storage faults (errno classification, the records, the one-message verdict);
- :mod:`.faults` -- the fault-injection grammar (``kind[:arg]@step[@rank]``) and the fire-once plan.
"""
