"""`megatron-align synth generate TAXONOMY.yaml --out-dir DIR --endpoint URL --model NAME`: documents from a plan.

Exit status: 0 every planned prompt (of ``--limit``) has its generation; 1 some prompts failed after retries or the
run stopped on a dead server (run the same command again: it continues); 2 a usage or configuration error.
With ``--executor``: 0 once every task finished (slurm: once the jobs are submitted; the finalize job runs after the
array); a task with failed prompts stays unfinished and the command exits 2 naming its log (run it again: finished
tasks are skipped).
"""

from __future__ import annotations

import argparse
import os

from megatron_align.cli import _corpus_options as options


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
    options.add_arguments(parser, "prompt i goes to task i mod N; --server: task r serves on --port + r",
                          default_work_dir="OUT_DIR/pipeline")


def run(args: argparse.Namespace) -> int:
    from megatron_align.errors import UserError
    from megatron_align.synth.finalize import summary
    from megatron_align.synth.generate import ClientConfig, prepare_out_dir
    from megatron_align.synth.pipeline import GenerateRun, finalize_run, generate, generate_task, load_plan

    if (args.endpoint is None) == (args.server is None):
        raise UserError("give exactly one of --endpoint URL (a running server) and --server vllm|sglang")
    if args.concurrency < 1 or args.retries < 0 or (args.limit is not None and args.limit < 0) or args.tasks < 1:
        raise UserError("--concurrency and --tasks must be >= 1, --retries >= 0, --limit >= 0")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    config = ClientConfig(endpoint=args.endpoint or "", model=args.model, api_key=api_key,
                          concurrency=args.concurrency, request_timeout_s=args.request_timeout, retries=args.retries,
                          backoff_s=args.backoff, abort_after=args.abort_after,
                          progress_interval_s=args.progress_interval)
    job = GenerateRun(os.path.abspath(args.taxonomy), os.path.abspath(args.out_dir), config, args.allow_misaligned,
                      args.limit, args.server, args.port, args.tensor_parallel)
    plan = load_plan(job)  # a bad taxonomy or held-out violation fails here, before anything runs
    if args.executor != "none":
        from megatron_align.corpus.pipeline import run_tasks, task_logs
        from megatron_align.corpus.pipeline_steps import CallStep, TaskStep
        from megatron_align.optional import require

        require("datatrove", "--executor local|slurm|ray (pip install datatrove)")
        os.makedirs(job.out_dir, exist_ok=True)
        prepare_out_dir(job.out_dir, *plan)  # the plan, written once before the tasks start
        pc = options.config_from_args(args, -1)
        logs = task_logs(pc.work_dir or os.path.join(job.out_dir, "pipeline"), pc.tasks)
        params = {"run": job}
        submitted = run_tasks("synth-generate", pc, TaskStep(generate_task, params), CallStep(finalize_run, params),
                              logs)
        if submitted is not None:
            options.report_submitted(submitted)
            return 0
        print(summary(finalize_run(params, plan)))
        return 0  # every task finished: every prompt has its generation
    counts = generate(job, plan=plan)
    report = finalize_run({"run": job, "counts": counts}, plan)
    print(summary(report))
    if counts["aborted"]:
        print(f"synth generate: stopped after {config.abort_after} prompts in a row failed "
              f"({counts['failures']}); is the server up? Run again to continue")
    elif counts["failed"]:
        print(f"synth generate: {counts['failed']:,} prompts failed after retries ({counts['failures']}); "
              "run again to retry them")
    return 1 if counts["failed"] else 0
