"""`megatron-align synth generate TAXONOMY.yaml --out-dir DIR --endpoint URL --model NAME`: documents from a plan.

Exit status: 0 every planned prompt (of ``--limit``) has its generation; 1 some prompts failed after retries or the
run stopped on a dead server (run the same command again: it continues); 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("taxonomy", help="taxonomy YAML (see examples/synth/taxonomy.yaml)")
    parser.add_argument("--out-dir", required=True, help="generations, documents.jsonl, report.json, summary.txt")
    parser.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="model name the server serves (or, with --server, loads)")
    parser.add_argument("--api-key-env", default=None, metavar="VAR", help="environment variable holding the API key")
    parser.add_argument("--server", choices=("vllm", "sglang"), default=None,
                        help="start this server on this node (GPU; vLLM/SGLang installed) instead of --endpoint")
    parser.add_argument("--port", type=int, default=8000, help="--server: port on 127.0.0.1")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="--server: GPUs per model replica")
    parser.add_argument("--limit", type=int, default=None, help="generate only the first N prompts of the plan")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument("--retries", type=int, default=3, help="retries of a failed request (default 3)")
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubling)")
    parser.add_argument("--abort-after", type=int, default=50, help="stop after N prompts in a row failed")
    parser.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--allow-misaligned", action="store_true",
                        help="allow stance: misaligned (documents labelled stance=misaligned)")


def run(args: argparse.Namespace) -> int:
    from megatron_align.errors import UserError
    from megatron_align.synth.finalize import finalize, summary
    from megatron_align.synth.generate import ClientConfig, run_generation, start_server
    from megatron_align.synth.plan import expand
    from megatron_align.synth.taxonomy import load_taxonomy

    if (args.endpoint is None) == (args.server is None):
        raise UserError("give exactly one of --endpoint URL (a running server) and --server vllm|sglang")
    if args.concurrency < 1 or args.retries < 0 or (args.limit is not None and args.limit < 0):
        raise UserError("--concurrency must be >= 1, --retries >= 0, --limit >= 0")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    taxonomy = load_taxonomy(args.taxonomy, allow_misaligned=args.allow_misaligned)
    prompts = expand(taxonomy)
    server = None
    endpoint = args.endpoint
    if args.server:
        os.makedirs(args.out_dir, exist_ok=True)
        server = start_server(args.server, args.model, args.port, args.tensor_parallel,
                              os.path.join(args.out_dir, f"{args.server}.log"))
        endpoint = f"http://127.0.0.1:{args.port}/v1"
    config = ClientConfig(endpoint=endpoint, model=args.model, api_key=api_key, concurrency=args.concurrency,
                          request_timeout_s=args.request_timeout, retries=args.retries, backoff_s=args.backoff,
                          abort_after=args.abort_after, progress_interval_s=args.progress_interval)
    try:
        counts = run_generation(config, taxonomy, prompts, args.out_dir, args.limit)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    report = finalize(taxonomy, prompts, args.out_dir, args.model, run_counts=counts)
    print(summary(report))
    if counts["aborted"]:
        print(f"synth generate: stopped after {config.abort_after} prompts in a row failed "
              f"({counts['failures']}); is the server up? Run again to continue")
    elif counts["failed"]:
        print(f"synth generate: {counts['failed']:,} prompts failed after retries ({counts['failures']}); "
              "run again to retry them")
    return 1 if counts["failed"] else 0
