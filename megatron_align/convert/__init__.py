"""Checkpoint conversion between megatron_align dist checkpoints and Hugging Face Llama (tools/ wraps these).

* :mod:`.mapping` — the one tensor mapping (grouped QKV, SwiGLU fc1, vocab padding), in checkpoint key space
* :mod:`.dist_reader` — read any-layout torch_dist checkpoints on one process, one layer slice at a time
* :mod:`.hf_io` — HF config.json and streamed, sharded safetensors
* :mod:`.to_hf` / :mod:`.from_hf` — the two directions (CLI verbs ``convert to-hf`` / ``convert from-hf``)
* :mod:`.verify` — logits of our GPTModel vs transformers on the same tokens
* :mod:`.inspect` — ``checkpoint inspect``
"""
