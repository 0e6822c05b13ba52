"""megatron_align.eval: alignment-propensity MCQ eval (:mod:`.propensity`) and its in-training callback
(:mod:`.callback`)."""
