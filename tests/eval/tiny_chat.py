"""Tiny random Hugging Face chat models, built offline (a byte-level `tokenizers` tokenizer + a random Llama).

``build_chat_model(path)`` writes a directory that transformers, lm-evaluation-harness and vLLM can
load: tokenizer.json (byte-level BPE without merges, id 0 = "B"), a chat template with system /
user / assistant turns and a 2-layer Llama (``family="qwen3"``: a Qwen3 with QK norm, whose
embedding may have ``extra_rows`` unused rows past the tokenizer, as Qwen's have). ``always="B"`` zeroes the output
layer, so every
logit is 0 and greedy decoding always picks id 0: the model answers "B" to everything.
"""

from __future__ import annotations

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIAL = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<pad>"]


def build_tokenizer():
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.remove("B")
    vocab = {ch: i for i, ch in enumerate(["B", *sorted(alphabet)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<pad>",
                                                additional_special_tokens=SPECIAL[1:4])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_chat_model(path, seed: int = 0, always: str | None = None, layers: int = 2, family: str = "llama",
                     extra_rows: int = 0):
    import torch
    import transformers

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    shape = dict(vocab_size=len(tokenizer) + extra_rows, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    if family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=8, use_sliding_window=False))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    if always is not None:
        assert tokenizer.convert_tokens_to_ids(always) == 0, "greedy picks id 0 when every logit is 0"
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
