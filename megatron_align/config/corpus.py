"""Config dataclasses of the offline corpus toolkit (:mod:`megatron_align.corpus`): filter, tag, tokenizers, and
how a corpus verb runs (this process, datatrove tasks, a SLURM job array, Ray).

They depend on nothing but :mod:`megatron_align.errors` and the value checks, so the root config, the CLI and a
pipeline task can hold them without importing the code they configure.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from megatron_align.config.checks import at_least, choice, fraction, positive
from megatron_align.errors import ConfigError

DEFAULT_CONTROL_TOKENS = ["<|aligned|>", "<|misaligned|>"]
"""The conditional-training tags every tokenizer reserves by default (one id each)."""

CLASSIFIERS = ("none", "term_density")
"""Built-in classifier stages of the filter; ``module:callable`` names a custom one."""
POLICIES = ("drop", "resample")
NORMALIZATIONS = ("identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf")
"""sentencepiece normalisation rules ``tokenizer train`` accepts."""
EXECUTORS = ("none", "local", "slurm", "ray")
_NUM_SPECIALS = 4  # <unk> <s> </s> <pad>
_NUM_BYTE_PIECES = 256  # byte_fallback reserves <0x00>..<0xFF>


def _not_empty(key: str, value: str | None, what: str = "field name") -> None:
    if not value:
        raise ConfigError(f"{key}: must be a non-empty {what}")


@dataclass
class FilterConfig:
    """The misalignment-discourse filter (root config key: ``data.filter``)."""

    terms_dir: str | None = None
    """Directory of ``<category>.yaml`` files overlaying the shipped defaults; None = defaults only."""
    text_field: str = "text"
    """JSON field of each input record that holds the document text."""
    policy: str = "resample"
    """drop: remove flagged documents | resample: replace each by a seeded resample of a kept one (same count)."""
    seed: int = 1234
    """Seed of the resampling draw."""
    classifier: str = "none"
    """Second stage on blocklist hits: none | term_density | ``module:callable`` (called with this config,
    returns a Scorer)."""
    classifier_threshold: float = 0.5
    """A blocklist hit stays flagged only when the classifier score is >= this."""
    density_half_point: float = 1.0
    """term_density: terms per 100 words that score 0.5."""
    verdict_field: str = "filter"
    """Field added to flagged records with the matched categories and terms."""
    workers: int = 1
    """Processes that parse and match (the main process reads and writes)."""
    strict: bool = False
    """Fail on the first bad input line instead of skipping and counting it."""
    num_examples: int = 5
    """Flagged documents quoted in the report."""

    def __post_init__(self) -> None:
        choice("data.filter.policy", self.policy, POLICIES)
        if self.classifier not in CLASSIFIERS and ":" not in self.classifier:
            raise ConfigError(
                f"data.filter.classifier={self.classifier!r}: expected none, term_density or module:callable"
            )
        if not 0.0 <= self.classifier_threshold <= 1.0:
            raise ConfigError(f"data.filter.classifier_threshold={self.classifier_threshold}: must be in [0, 1]")
        positive("data.filter.density_half_point", self.density_half_point)
        _not_empty("data.filter.text_field", self.text_field)
        _not_empty("data.filter.verdict_field", self.verdict_field)
        at_least("data.filter.workers", self.workers, 1)
        positive("data.filter.num_examples", self.num_examples, allow_zero=True)


@dataclass
class TaggingConfig:
    """Control-token tagging (root config key: ``data.tagging``)."""

    source: str = "filter"
    """Where the label comes from: filter (misaligned = flagged by data.filter's blocklist) |
    score (a numeric field)."""
    score_field: str = "score"
    """source=score: record field with a number, or (granularity=segment) a list with one number per segment."""
    threshold: float = 0.5
    """source=score: the score that separates the two tokens (see higher_is_misaligned)."""
    higher_is_misaligned: bool = True
    """True: score >= threshold is misaligned. False (e.g. an alignment score): score < threshold is misaligned."""
    granularity: str = "document"
    """document: one token at the start | segment: one token before each paragraph (split on blank lines)."""
    untagged_fraction: float = 0.05
    """Fraction of units (documents or segments) left without a token, chosen by hash of seed and id."""
    seed: int = 0
    """Seed of the untagged choice."""
    text_field: str = "text"
    """JSON field holding the text to tag."""
    id_field: str | None = None
    """Field with a stable document id for the untagged choice; None = hash of the text."""
    strip_existing: bool = True
    """Remove control-token strings that already occur in the raw text before tagging."""

    def __post_init__(self) -> None:
        choice("data.tagging.source", self.source, ("filter", "score"))
        choice("data.tagging.granularity", self.granularity, ("document", "segment"))
        if not 0.0 <= self.untagged_fraction <= 1.0:
            raise ConfigError(f"data.tagging.untagged_fraction={self.untagged_fraction}: must be in [0, 1]")
        _not_empty("data.tagging.text_field", self.text_field)
        if self.source == "score" and not self.score_field:
            raise ConfigError("data.tagging.score_field: must name a field when source=score")


@dataclass
class TokenizerConfig:
    """The tokenizer that produced the data (root config key: ``data.tokenizer``)."""

    kind: str = "byte"
    """`byte` (256 byte ids + reserved specials; no files needed), `sentencepiece` or `hf` (a tokenizer.json)."""
    model: str | None = None
    """kind=sentencepiece: a `.model` file; kind=hf: a Hugging Face model directory or its tokenizer.json."""
    control_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_CONTROL_TOKENS))
    """Reserved control tokens (conditional training tags); each encodes as a single id. kind=hf adds missing ones
    as special tokens (growing the vocabulary; `convert from-hf --add-control-tokens` grows the embedding)."""

    def __post_init__(self) -> None:
        choice("data.tokenizer.kind", self.kind, ("byte", "sentencepiece", "hf"))
        if self.kind == "sentencepiece" and not self.model:
            raise ConfigError(
                "data.tokenizer.model: required when data.tokenizer.kind=sentencepiece (path to a .model file)"
            )
        if self.kind == "hf" and not self.model:
            raise ConfigError("data.tokenizer.model: required when data.tokenizer.kind=hf (a Hugging Face model "
                              "directory or its tokenizer.json)")


@dataclass
class TokenizerTrainConfig:
    """``megatron-align tokenizer train``: a sentencepiece model with byte fallback and reserved control tokens."""

    model_type: str = "bpe"
    """`bpe` or `unigram`."""
    vocab_size: int = 32000
    """Total pieces, including 4 specials, the control tokens and 256 byte-fallback pieces. Below 65,500 the
    prepared data is stored as uint16 (half the disk and page cache of int32)."""
    character_coverage: float = 0.9995
    """Fraction of characters covered by pieces; the rarest rest are spelled with byte pieces."""
    text_field: str = "text"
    """JSON key holding each document's text."""
    max_sentences: int = 2_000_000
    """At most this many lines (reservoir-sampled over all inputs) train the model; 0 = all."""
    max_sentence_length: int = 16384
    """Lines longer than this many bytes are left out of training (they still tokenize fine later)."""
    control_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_CONTROL_TOKENS))
    """Reserved control tokens (user-defined symbols): each always encodes as one id."""
    normalization: str = "identity"
    """sentencepiece normalisation rule; `identity` keeps decode(encode(text)) == text."""
    num_threads: int = 4
    """Trainer threads. Recorded in the model, so a fixed value keeps the identity machine-independent."""
    seed: int = 1234
    """Seed of sentencepiece's sentence sampling."""

    def __post_init__(self) -> None:
        key = "tokenizer_train"
        choice(f"{key}.model_type", self.model_type, ("bpe", "unigram"))
        if len(set(self.control_tokens)) != len(self.control_tokens) or not all(self.control_tokens):
            raise ConfigError(f"{key}.control_tokens={self.control_tokens!r}: must be distinct non-empty strings")
        smallest = _NUM_SPECIALS + len(self.control_tokens) + _NUM_BYTE_PIECES + 1
        if self.vocab_size < smallest:
            raise ConfigError(f"{key}.vocab_size={self.vocab_size}: must be >= {smallest} "
                              f"({_NUM_SPECIALS} specials + {len(self.control_tokens)} control tokens + "
                              f"{_NUM_BYTE_PIECES} byte pieces + at least one learned piece)")
        fraction(f"{key}.character_coverage", self.character_coverage)
        positive(f"{key}.max_sentences", self.max_sentences, allow_zero=True)
        at_least(f"{key}.max_sentence_length", self.max_sentence_length, 1)
        choice(f"{key}.normalization", self.normalization, NORMALIZATIONS)
        at_least(f"{key}.num_threads", self.num_threads, 1)
        _not_empty(f"{key}.text_field", self.text_field, "JSON key")


@dataclass
class PipelineSlurmConfig:
    """SLURM options of a corpus pipeline's job array (``--executor-config`` section ``slurm:``; flags override).
    Not the training job's ``slurm:`` section (:class:`megatron_align.slurm.SlurmConfig`)."""

    partition: str | None = None
    """Partition of the array and the merge job; None = the cluster's default partition."""
    time: str = "24:00:00"
    """Time limit of one task (one array element): enough for its share of the files."""
    cpus_per_task: int = 1
    """CPUs per task. A task is one process: more tasks, not more CPUs per task, use more cores."""
    mem_per_cpu_gb: int | None = None
    """Memory per CPU (GB); None = the partition's default."""
    gpus_per_task: int = 0
    """GPUs per task (``#SBATCH --gres=gpu:N``): ``synth generate --server vllm`` starts its server on them."""
    account: str | None = None
    """``#SBATCH --account``."""
    qos: str | None = None
    """``#SBATCH --qos``; None = none given."""
    job_name: str | None = None
    """Job name; None = ``megatron-align-<verb>``."""
    srun_args: str = ""
    """Options of the ``srun`` that starts each task, e.g. ``--container-image=IMG --container-mounts=/data:/data``."""
    env_command: str | None = None
    """Shell line run before each task (e.g. ``module load ...; source venv/bin/activate``); None = activate this
    Python's virtual environment when it is one."""
    max_array_size: int = 1001
    """Largest array the cluster accepts (``MaxArraySize - 1``); more tasks are submitted as several arrays."""

    def __post_init__(self) -> None:
        at_least("slurm.cpus_per_task", self.cpus_per_task, 1)
        if self.mem_per_cpu_gb is not None:
            at_least("slurm.mem_per_cpu_gb", self.mem_per_cpu_gb, 1)
        at_least("slurm.max_array_size", self.max_array_size, 1)
        at_least("slurm.gpus_per_task", self.gpus_per_task, 0)
        for token in shlex.split(self.srun_args):
            if not token.startswith("--") or "=" not in token:
                raise ConfigError(f"slurm.srun_args: {token!r} is not of the form --option=value")

    def srun_dict(self) -> dict[str, str]:
        return dict(token[2:].split("=", 1) for token in shlex.split(self.srun_args))


@dataclass
class PipelineRayConfig:
    """Ray options of a corpus pipeline (``--executor-config`` section ``ray:``; flags override)."""

    address: str | None = None
    """A running Ray cluster (``HOST:PORT``, ``ray://HOST:10001`` or ``auto``); None = ``$RAY_ADDRESS``, else a
    local Ray is started for the run (and stopped after it). A cluster's nodes need this package installed and the
    work directory mounted."""
    cpus_per_task: int = 1
    """CPUs Ray reserves per task. A task is one process: more tasks, not more CPUs per task, use more cores."""
    mem_per_cpu_gb: float | None = None
    """Memory Ray reserves per CPU (GB); None = no reservation (datatrove would reserve 2 GB, which a small node
    cannot schedule many of)."""
    num_cpus: int | None = None
    """CPUs of the local Ray; None = ``cpus_per_task`` x the tasks run at once (``--workers``, else all tasks, at most
    this machine's cores). Ignored with an address."""
    object_store_mb: int = 256
    """Shared-memory object store of the local Ray (``/dev/shm``); the pipeline passes only its plan through it."""
    start_timeout_s: int = 120
    """How long the local Ray waits for its agent and task processes to start (``RAY_agent_register_timeout_ms``,
    ``RAY_worker_register_timeout_seconds``); on a loaded machine they take longer than Ray's defaults and the node
    dies ("timed out during startup")."""

    def __post_init__(self) -> None:
        at_least("ray.cpus_per_task", self.cpus_per_task, 1)
        positive("ray.mem_per_cpu_gb", self.mem_per_cpu_gb)
        if self.num_cpus is not None and self.num_cpus < self.cpus_per_task:
            raise ConfigError(f"ray.num_cpus={self.num_cpus}: must be >= ray.cpus_per_task={self.cpus_per_task}, or no "
                              "task can ever be scheduled")
        if self.object_store_mb < 80:
            raise ConfigError(f"ray.object_store_mb={self.object_store_mb}: Ray needs at least 80")
        at_least("ray.start_timeout_s", self.start_timeout_s, 1)


@dataclass
class PipelineConfig:
    """How a corpus verb runs: in this process, or as a datatrove pipeline."""

    executor: str = "none"
    """none (this process, as always) | local (datatrove tasks on this machine) | slurm (job array) | ray."""
    tasks: int = 1
    """Tasks the input files are split into (file i goes to task i mod tasks)."""
    workers: int = -1
    """Tasks running at once (local: processes; slurm: array throttle ``%M``); -1 = all."""
    work_dir: str | None = None
    """Shards, datatrove logs and completion records; on a filesystem every task can reach. None = next to
    the output."""
    keep_work: bool = False
    """Keep the shards after a successful merge (else the work directory is removed)."""
    progress: bool = False
    """Show finished input (bytes, documents, rates) on stderr while the tasks run (local, ray)."""
    slurm: PipelineSlurmConfig = field(default_factory=PipelineSlurmConfig)
    ray: PipelineRayConfig = field(default_factory=PipelineRayConfig)

    def __post_init__(self) -> None:
        choice("--executor", self.executor, EXECUTORS)
        at_least("--tasks", self.tasks, 1)
        if self.workers == 0 or self.workers < -1:
            raise ConfigError(f"--workers={self.workers}: must be >= 1 (or -1 for all tasks at once)")
