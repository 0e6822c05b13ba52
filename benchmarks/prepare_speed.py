"""Tokens/s per core of `prepare` (workers=1) vs raw encoding, sentencepiece and HF `tokenizers`, same texts.

Generates a synthetic JSONL corpus (Zipf-distributed made-up words, multi-line
documents) and three tokenizers of the same vocabulary size trained on it:

- ``sp``: a sentencepiece BPE (``tokenizer train``, ``data.tokenizer.kind=sentencepiece``);
- ``bytelevel``: a byte-level BPE trained with `tokenizers` (GPT-2 pre-tokenizer regex, as
  Llama 3 / Qwen use), saved as tokenizer.json (``kind=hf``);
- ``sp-json``: the *same* sentencepiece model as a tokenizer.json (vocabulary and merges read
  by transformers' ``SentencePieceExtractor``, Metaspace pre-tokenizer); its ids are asserted
  equal to sentencepiece's on every document, so this pairs the two libraries on one tokenization.

Rows: "raw" = the library's encode over texts already in memory (sentencepiece in a Python loop,
`tokenizers` ``encode_batch`` / ``encode_batch_fast`` over chunks of 1024 documents, a fresh
``Tokenizer`` each time as prepare starts cold); "HFTokenizer.encode_batch" = our wrapper, the
call prepare makes per chunk; "prepare" = ``prepare_source(..., workers=1)``
end to end (read, JSON parse, tokenize, write .bin/.idx, checksum inputs, manifest).

Rates are per CPU-second of the process, all threads counted (the per-core measure), with MB
of input text per CPU-second and wall-clock rates beside them; best of ``--repeats``
alternating runs. ``--threads`` pins the `tokenizers` pool (default 1: per core).

Load-independent instruction counts: ``--workdir DIR`` keeps corpus and tokenizers between
runs and ``--only ROW`` runs one row once, so ``valgrind --tool=cachegrind --cache-sim=no``
of ``--only ROW`` minus a baseline is that row's instructions: ``--only none`` (setup and the
untimed first prepare) for prepare rows, ``--only none-raw`` (setup) for raw rows (docs/benchmarks.md).
Usage: ``python benchmarks/prepare_speed.py [--documents N] [--repeats R] [--workdir DIR] [--only ROW]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

CHUNK = 1024  # documents per encode_batch call, as prepare's chunks


def make_corpus(path: str, num_documents: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choices(letters, weights=range(26, 0, -1), k=rng.randint(1, 10))) for _ in range(20000)]
    cum_weights, total = [], 0.0
    for rank in range(len(vocab)):  # Zipf: the r-th word is 1/r as frequent as the first
        total += 1.0 / (rank + 1)
        cum_weights.append(total)
    texts = []
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_documents):
            paragraphs = []
            for _ in range(rng.randint(1, 6)):
                words = rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(20, 120))
                paragraphs.append(" ".join(words).capitalize() + ".")
            text = "\n\n".join(paragraphs)
            texts.append(text)
            f.write(json.dumps({"text": text, "meta": {"source": "synthetic"}}) + "\n")
    return texts


def train_hf_bpe(texts: list[str], out_dir: str, vocab_size: int):
    """A byte-level BPE with `tokenizers`, saved as OUT/tokenizer.json + tokenizer_config.json (EOS only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    _save(tok, out_dir, "<|endoftext|>")
    return tok


def sentencepiece_as_tokenizer_json(model_file: str, out_dir: str):
    """The sentencepiece BPE's own vocabulary and merges as a `tokenizers` BPE (byte fallback, Metaspace split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    parts = SentencePieceExtractor(model_file).extract(models.BPE)
    tok = Tokenizer(models.BPE(vocab=parts["vocab"], merges=parts["merges"], byte_fallback=True, unk_token="<unk>",
                               fuse_unk=True))
    tok.add_special_tokens(parts["additional_special_tokens"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    _save(tok, out_dir, "</s>")
    return tok


def _save(tok, out_dir: str, eos: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": eos, "bos_token": None}, f)


def setup(work: str, args) -> dict:
    """Corpus + the three tokenizers in WORK (reused when already there, for --only runs)."""
    import sentencepiece as spm

    from megatron_align.config.corpus import TokenizerTrainConfig
    from megatron_align.corpus.tokenizer_train import train_tokenizer

    corpus, done = os.path.join(work, "corpus.jsonl"), os.path.join(work, "setup.json")
    if os.path.exists(done):
        with open(done) as f:
            info = json.load(f)
        with open(corpus, encoding="utf-8") as f:
            info["texts"] = [json.loads(line)["text"] for line in f]
        return info
    texts = make_corpus(corpus, args.documents, args.seed)
    t0 = time.perf_counter()
    summary = train_tokenizer(corpus, os.path.join(work, "sp"),
                              TokenizerTrainConfig(vocab_size=args.vocab_size, max_sentences=200_000))
    train_s = time.perf_counter() - t0
    train_hf_bpe(texts, os.path.join(work, "bytelevel"), args.vocab_size)
    sp_json = sentencepiece_as_tokenizer_json(summary["model"], os.path.join(work, "sp-json"))
    sp = spm.SentencePieceProcessor(model_file=summary["model"])
    differ = sum(sp.encode(t) != sp_json.encode(t, add_special_tokens=False).ids for t in texts)
    assert differ == 0, f"sentencepiece as tokenizer.json gives other ids on {differ} documents"
    with open(os.path.join(work, "warm.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": texts[0]}) + "\n")
    info = {"corpus": corpus, "sp_model": summary["model"], "vocab_size": summary["vocab_size"], "train_s": train_s,
            "mb": sum(len(t.encode()) for t in texts) / 1e6, "documents": len(texts)}
    with open(done, "w") as f:
        json.dump(info, f)
    info["texts"] = texts
    return info


def rows(work: str, info: dict):
    """(warm-up, {row name -> () -> tokens without EOD}), each row run from a cold tokenizer."""
    import sentencepiece as spm
    import tokenizers

    from megatron_align.config.corpus import TokenizerConfig
    from megatron_align.corpus.prepare import prepare_source

    texts = info["texts"]
    chunks = [texts[i:i + CHUNK] for i in range(0, len(texts), CHUNK)]
    configs = {"sp": TokenizerConfig(kind="sentencepiece", model=info["sp_model"])}
    for name in ("bytelevel", "sp-json"):
        configs[name] = TokenizerConfig(kind="hf", model=os.path.join(work, name), control_tokens=[])

    def raw_sp():
        sp = spm.SentencePieceProcessor(model_file=info["sp_model"])
        return sum(len(sp.encode(text)) for text in texts)

    def raw_hf(name, method):
        def run():
            tok = tokenizers.Tokenizer.from_file(os.path.join(work, name, "tokenizer.json"))
            encode = getattr(tok, method)
            return sum(len(e.ids) for chunk in chunks for e in encode(chunk, add_special_tokens=False))
        return run

    def ours_hf(name):  # what prepare calls per chunk (HFTokenizer.encode_batch), without the rest of prepare
        def run():
            from megatron_align.corpus.tokenizer import build_tokenizer

            tok = build_tokenizer(configs[name])
            return sum(len(ids) for chunk in chunks for ids in tok.encode_batch(chunk))
        return run

    def prepare(name):
        def run():
            manifest = prepare_source(info["corpus"], os.path.join(work, "out", name), configs[name], workers=1)
            return manifest["tokens"] - manifest["documents"]
        return run

    def warm():  # the first prepare loads the tokenizer: never timed
        for name, config in configs.items():
            prepare_source(os.path.join(work, "warm.jsonl"), os.path.join(work, "warm", name), config)

    return warm, {"raw sentencepiece encode loop": raw_sp,
            "prepare sentencepiece": prepare("sp"),
            "raw tokenizers encode_batch, sp-json": raw_hf("sp-json", "encode_batch"),
            "raw tokenizers encode_batch_fast, sp-json": raw_hf("sp-json", "encode_batch_fast"),
            "HFTokenizer.encode_batch, sp-json": ours_hf("sp-json"),
            "prepare hf, sp-json": prepare("sp-json"),
            "raw tokenizers encode_batch, bytelevel": raw_hf("bytelevel", "encode_batch"),
            "raw tokenizers encode_batch_fast, bytelevel": raw_hf("bytelevel", "encode_batch_fast"),
            "HFTokenizer.encode_batch, bytelevel": ours_hf("bytelevel"),
            "prepare hf, bytelevel": prepare("bytelevel")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best counts")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="tokenizers thread pool (RAYON_NUM_THREADS)")
    parser.add_argument("--workdir", help="keep corpus and tokenizers here (default: a temporary directory)")
    parser.add_argument("--only", help="run this row once (a row name; baselines 'none', 'none-raw'), for "
                                       "instruction counts under valgrind")
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before tokenizers starts its pool

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        info = setup(work, args)
        warm, table = rows(work, info)
        if args.only is not None:  # baselines: "none" = setup + warm-up (for prepare rows), "none-raw" = setup
            if args.only == "none" or args.only.startswith("prepare"):
                warm()
            tokens = table[args.only]() if args.only in table else 0
            print(f"only {args.only!r}: {tokens} tokens")
            return
        warm()
        best = {name: [float("inf"), float("inf"), 0] for name in table}
        for _ in range(args.repeats):  # alternate: the dev box is shared, so load comes and goes
            for name, run in table.items():
                t0, c0 = time.perf_counter(), time.process_time()
                tokens = run()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                best[name] = [min(best[name][0], cpu), min(best[name][1], wall), tokens]

    counts = {name: b[2] for name, b in best.items()}
    assert counts["prepare sentencepiece"] == counts["raw sentencepiece encode loop"] == counts["prepare hf, sp-json"]
    assert counts["prepare hf, bytelevel"] == counts["raw tokenizers encode_batch_fast, bytelevel"]
    print(f"corpus: {info['documents']:,} documents, {info['mb']:.1f} MB of text; vocab {info['vocab_size']:,} "
          f"(sentencepiece trained in {info['train_s']:.1f} s); sentencepiece {counts['prepare sentencepiece']:,} "
          f"tokens, byte-level BPE {counts['prepare hf, bytelevel']:,}; tokenizers threads {args.threads}; "
          f"best of {args.repeats} alternating runs")
    print(f"{'':44s} {'tokens/CPU-s':>13s} {'MB/CPU-s':>9s} {'tokens/s wall':>14s}")
    for name, (cpu, wall, tokens) in best.items():
        print(f"{name:44s} {tokens / cpu:13,.0f} {info['mb'] / cpu:9.2f} {tokens / wall:14,.0f}")
    cpu = {name: b[0] for name, b in best.items()}
    print(
        "ratio prepare sentencepiece / raw loop: "
        f"{cpu['raw sentencepiece encode loop'] / cpu['prepare sentencepiece']:.2f}x "
        "per CPU-second (goal >= 0.8x)"
    )
    for name in ("sp-json", "bytelevel"):
        print(f"ratio HFTokenizer.encode_batch / raw encode_batch_fast, {name}: "
              f"{cpu[f'raw tokenizers encode_batch_fast, {name}'] / cpu[f'HFTokenizer.encode_batch, {name}']:.2f}x")
        print(f"ratio prepare hf / raw encode_batch_fast, {name}: "
              f"{cpu[f'raw tokenizers encode_batch_fast, {name}'] / cpu[f'prepare hf, {name}']:.2f}x per CPU-second")
    print(f"ratio prepare hf / prepare sentencepiece, same tokenization (sp-json): "
          f"{cpu['prepare sentencepiece'] / cpu['prepare hf, sp-json']:.2f}x per CPU-second (goal >= 1x)")
    bytelevel_rate = counts["prepare hf, bytelevel"] / cpu["prepare hf, bytelevel"]
    sentencepiece_rate = counts["prepare sentencepiece"] / cpu["prepare sentencepiece"]
    print(
        f"ratio prepare hf bytelevel / prepare sentencepiece, tokens per CPU-second: "
        f"{bytelevel_rate / sentencepiece_rate:.2f}x"
    )


if __name__ == "__main__":
    main()
