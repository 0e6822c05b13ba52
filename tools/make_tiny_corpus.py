#!/usr/bin/env python
"""Generate the tiny CPU example's corpus: OUT_DIR/web.jsonl and OUT_DIR/web.{bin,idx} (byte tokenizer)."""

import argparse
import sys

from megatron_align.corpus.indexed import write_indexed_dataset
from megatron_align.corpus.tokenizer import ByteTokenizer
from megatron_align.data.synthetic import general_documents, write_jsonl


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    texts = general_documents(args.documents, args.seed)
    write_jsonl(f"{args.out_dir}/web.jsonl", texts)
    tok = ByteTokenizer()
    docs, tokens = write_indexed_dataset((tok.encode(t) for t in texts), f"{args.out_dir}/web", tok.vocab_size, tok.eod)
    print(f"wrote {args.out_dir}/web.bin/.idx: {docs} documents, {tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
