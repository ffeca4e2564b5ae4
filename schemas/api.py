"""Marshmallow schemas for the HTTP API's v1 bodies and answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate, validates_schema

from schemas.models import DEFAULT_FAMILY, DEFAULT_SIZE
from schemas.queues import GPU_QUEUE, LIGHT_QUEUE, QUEUE_NAME, TRAINING_QUEUE
from schemas.status import JOB_STATUSES, RUN_STATUSES

CORPUS_FIELDS = ("corpus_id", "corpus_path")
EXACTLY_ONE_CORPUS = "give exactly one of corpus_id and corpus_path"
EVALUATION_SPLITS = ("validation", "test")
TOKENIZER_METHODS = ("bpe",)
# What a run trains on: "auto" is a GPU where the worker has one, else its CPU.
ACCELERATORS = ("cpu", "gpu", "auto")
MAX_DEVICES = 64
# A Discord user id is a snowflake, a 64-bit integer; 0 stands for no Discord user.
MAX_USER_ID = 2**63 - 1
SNOWFLAKE_RANGE = validate.Range(
    min=0, max=MAX_USER_ID, error=f"must be a Discord user id from 0 to {MAX_USER_ID} (0: no Discord user)"
)


class CorpusChoiceSchema(Schema):
    """A body that names its corpus by `corpus_id` (an upload) or `corpus_path`, exactly one."""

    corpus_id = fields.String(
        validate=validate.Length(min=1),
        metadata={"description": "An uploaded corpus (POST /corpora)."},
    )
    corpus_path = fields.String(
        validate=validate.Length(min=1),
        metadata={"description": "A file inside the corpus root: absolute, or relative to the root."},
    )

    # Runs beside field errors so one answer names every problem; presence is judged on the raw
    # body, so a field that failed its own check still counts as given.
    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def exactly_one_corpus(self, data: Mapping[str, object], original: object, **_: object) -> None:
        if not isinstance(original, Mapping):
            return
        if sum(name in original for name in CORPUS_FIELDS) != 1:
            raise ValidationError({name: [EXACTLY_ONE_CORPUS] for name in CORPUS_FIELDS})


class TrainRequestSchema(CorpusChoiceSchema):
    """POST /runs/train; unknown fields are rejected (marshmallow's default RAISE)."""

    model_family = fields.String(load_default=DEFAULT_FAMILY)
    model_size = fields.String(load_default=DEFAULT_SIZE)
    max_seq_len = fields.Integer(strict=True, load_default=128, validate=validate.Range(min=8))
    num_epochs = fields.Integer(strict=True, load_default=1, validate=validate.Range(min=1))
    batch_size = fields.Integer(strict=True, load_default=16, validate=validate.Range(min=1))
    learning_rate = fields.Float(
        load_default=1e-3, validate=validate.Range(min=0, min_inclusive=False), allow_nan=False
    )
    tokenizer_id = fields.String(
        load_default="auto",
        metadata={
            "description": '"auto" trains a byte-level BPE tokenizer on the corpus; otherwise the id of '
            "a completed tokenizer (POST /tokenizers/train)."
        },
    )
    user_id = fields.Integer(
        strict=True,
        required=True,
        validate=SNOWFLAKE_RANGE,
        metadata={"description": "Discord user id to notify (a snowflake); 0 means no Discord user."},
    )
    seed = fields.Integer(strict=True, load_default=1337, validate=validate.Range(min=0, max=2**32 - 1))
    holdout_fraction = fields.Float(
        load_default=0.1,
        validate=validate.Range(min=0, max=0.5, min_inclusive=False),
        metadata={"description": "Share of the corpus's tokens held out for validation."},
    )
    test_fraction = fields.Float(
        load_default=0.0,
        validate=validate.Range(min=0, max=0.5, max_inclusive=False),
        metadata={
            "description": "Share held out as a test split for POST /runs/{run_id}/evaluate; 0 for none."
        },
    )
    accelerator = fields.String(
        load_default="auto",
        validate=validate.OneOf(ACCELERATORS),
        metadata={
            "description": '"gpu" fails on a worker without one; "auto" uses a GPU where there is one.'
        },
    )
    devices = fields.Integer(
        strict=True,
        load_default=1,
        validate=validate.Range(min=1, max=MAX_DEVICES),
        metadata={"description": "GPUs (or CPU processes) one run trains on; above 1, DDP."},
    )
    # No load default: an unnamed queue depends on the accelerator (TrainRequest.from_mapping).
    queue = fields.String(
        validate=[
            validate.Regexp(QUEUE_NAME, error="must be 1 to 64 letters, digits, '.', '_' or '-'"),
            validate.NoneOf([LIGHT_QUEUE], error="the light queue is for tokenizers and evaluations"),
        ],
        metadata={
            "description": 'The Celery queue that trains the run (GET /queues lists them); by default "gpu" '
            'for accelerator "gpu", else "training".'
        },
    )


@dataclass(frozen=True)
class TrainRequest:
    """A loaded train request, typed; the same shape travels in the run record to the worker."""

    model_family: str
    model_size: str
    max_seq_len: int
    num_epochs: int
    batch_size: int
    learning_rate: float
    corpus_path: str
    tokenizer_id: str
    user_id: int
    seed: int
    holdout_fraction: float = 0.1
    test_fraction: float = 0.0
    corpus_id: str | None = None
    queue: str = TRAINING_QUEUE
    accelerator: str = "auto"
    devices: int = 1

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> TrainRequest:
        """Typed reads of a mapping that TrainRequestSchema has loaded; raises TypeError otherwise."""

        def text(name: str) -> str:
            value = data.get(name)
            if not isinstance(value, str):
                raise TypeError(f"train request field {name!r} must be a string")
            return value

        def integer(name: str) -> int:
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"train request field {name!r} must be an integer")
            return value

        def number(name: str, default: float | None = None) -> float:
            value = data.get(name, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"train request field {name!r} must be a number")
            return float(value)

        corpus_id = data.get("corpus_id")
        accelerator = data.get("accelerator", "auto")
        devices = data.get("devices", 1)
        queue = data.get("queue") or (GPU_QUEUE if accelerator == "gpu" else TRAINING_QUEUE)

        return cls(
            model_family=text("model_family"),
            model_size=text("model_size"),
            max_seq_len=integer("max_seq_len"),
            num_epochs=integer("num_epochs"),
            batch_size=integer("batch_size"),
            learning_rate=number("learning_rate"),
            corpus_path=text("corpus_path"),
            tokenizer_id=text("tokenizer_id"),
            user_id=integer("user_id"),
            seed=integer("seed"),
            holdout_fraction=number("holdout_fraction", 0.1),
            test_fraction=number("test_fraction", 0.0),
            corpus_id=corpus_id if isinstance(corpus_id, str) else None,
            queue=queue if isinstance(queue, str) else TRAINING_QUEUE,
            accelerator=accelerator if isinstance(accelerator, str) else "auto",
            devices=devices if isinstance(devices, int) else 1,
        )

    def to_mapping(self) -> dict[str, object]:
        # Every field is a str, a number or None: a shallow copy is the whole of it (asdict deep-copies).
        return dict(vars(self))


class TrainAcceptedSchema(Schema):
    run_id = fields.String(required=True)
    job_id = fields.String(required=True)


class ProgressSchema(Schema):
    epoch = fields.Integer()
    total_epochs = fields.Integer()
    step = fields.Integer()
    loss = fields.Float()
    samples_per_sec = fields.Float()
    tokens_per_sec = fields.Float()
    ts = fields.Float()


class RunStatusSchema(Schema):
    run_id = fields.String(required=True)
    job_id = fields.String()
    status = fields.String(required=True, validate=validate.OneOf(RUN_STATUSES))
    last_heartbeat_ts = fields.Float(allow_none=True, metadata={"description": "Unix seconds"})
    message = fields.String()
    user_id = fields.Integer()
    created_at = fields.Float()
    started_at = fields.Float(allow_none=True)
    finished_at = fields.Float(allow_none=True)
    attempt = fields.Integer()
    progress = fields.Nested(ProgressSchema, allow_none=True)
    loss = fields.Float(allow_none=True)
    perplexity = fields.Float(allow_none=True)
    artifact_path = fields.String(allow_none=True)
    error_kind = fields.String(allow_none=True)
    queue = fields.String(metadata={"description": "The Celery queue the run is sent to."})
    worker = fields.String(
        allow_none=True, metadata={"description": "The Celery hostname of the worker that took the run."}
    )
    queue_position = fields.Integer(
        allow_none=True,
        metadata={"description": "While queued: 1 when the run is the next its queue gives a worker."},
    )


class RunListQuerySchema(Schema):
    """GET /runs: whose runs, and how many of the newest; unknown query fields are rejected."""

    user_id = fields.Integer(
        required=True,
        validate=SNOWFLAKE_RANGE,
        metadata={"description": "Discord user id the runs belong to."},
    )
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))

    @post_load
    def to_query(self, data: dict[str, int], **_: object) -> RunListQuery:
        return RunListQuery(user_id=data["user_id"], limit=data["limit"])


@dataclass(frozen=True)
class RunListQuery:
    user_id: int
    limit: int


class RunListSchema(Schema):
    runs = fields.List(
        fields.Nested(RunStatusSchema), required=True, metadata={"description": "newest first"}
    )


class CancelAcceptedSchema(Schema):
    status = fields.String(required=True, metadata={"description": '"cancellation-requested"'})


class ErrorSchema(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    request_id = fields.String(required=True)
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "Validation errors by field name."},
    )


class WorkerSchema(Schema):
    hostname = fields.String(
        required=True, metadata={"description": "Celery's node name, e.g. training@host"}
    )
    host = fields.String(required=True)
    queues = fields.List(fields.String(), required=True)
    concurrency = fields.Integer(required=True, metadata={"description": "Runs it trains at once."})
    accelerator = fields.String(required=True, validate=validate.OneOf(["cpu", "gpu"]))
    devices = fields.Integer(required=True)
    torch_threads = fields.Integer(required=True, metadata={"description": "Its share of the host's cores."})
    last_seen = fields.Float(required=True, metadata={"description": "Unix seconds of its last renewal"})


class QueueSchema(Schema):
    name = fields.String(required=True)
    length = fields.Integer(
        required=True, metadata={"description": "Tasks waiting in the broker's lists for this queue."}
    )
    workers = fields.List(fields.Nested(WorkerSchema), required=True)


class QueueListSchema(Schema):
    queues = fields.List(
        fields.Nested(QueueSchema),
        required=True,
        metadata={"description": "Queues that a live worker consumes, by name."},
    )


class HealthSchema(Schema):
    status = fields.String(required=True)
    redis = fields.String(metadata={"description": "readiness only: Redis answered"})
    store = fields.String(metadata={"description": "readiness only: every root of the file store answered"})


class ModelSizeSchema(Schema):
    size = fields.String(required=True)
    n_layer = fields.Integer(required=True)
    n_embd = fields.Integer(required=True)
    n_head = fields.Integer(required=True)
    params = fields.Integer(
        required=True, metadata={"description": "at the reference vocabulary and context"}
    )


class ModelFamilySchema(Schema):
    family = fields.String(required=True)
    sizes = fields.List(fields.Nested(ModelSizeSchema), required=True)


class ModelCatalogSchema(Schema):
    default_family = fields.String(required=True)
    default_size = fields.String(required=True)
    families = fields.List(fields.Nested(ModelFamilySchema), required=True)


class CorpusUploadSchema(Schema):
    """POST /corpora: multipart/form-data with one file part; other parts are ignored."""

    class Meta:
        unknown = EXCLUDE

    file = fields.Raw(
        required=True,
        metadata={"type": "string", "format": "binary", "description": "A UTF-8 text file."},
    )


class CorpusSchema(Schema):
    corpus_id = fields.String(required=True)
    name = fields.String(required=True, metadata={"description": "The uploaded file's name."})
    bytes = fields.Integer(required=True)
    lines = fields.Integer(
        required=True, metadata={"description": "Newlines, plus one for a last line without one."}
    )


class CorpusListItemSchema(CorpusSchema):
    created_at = fields.Float(required=True, metadata={"description": "Unix seconds"})


class CorpusListSchema(Schema):
    corpora = fields.List(
        fields.Nested(CorpusListItemSchema), required=True, metadata={"description": "Newest first."}
    )


class TokenizerRequestSchema(CorpusChoiceSchema):
    """POST /tokenizers/train; unknown fields are rejected."""

    method = fields.String(load_default="bpe", validate=validate.OneOf(TOKENIZER_METHODS))
    vocab_size = fields.Integer(strict=True, load_default=8192, validate=validate.Range(min=256, max=65536))
    min_frequency = fields.Integer(strict=True, load_default=2, validate=validate.Range(min=1))
    holdout_fraction = fields.Float(
        load_default=0.1,
        validate=validate.Range(min=0, max=0.5, min_inclusive=False),
        allow_nan=False,
        metadata={"description": "Share of the corpus held out to measure the tokenizer's stats."},
    )


class TokenizerAcceptedSchema(Schema):
    tokenizer_id = fields.String(required=True)
    job_id = fields.String(required=True)


class TokenizerStatsSchema(Schema):
    vocab_size = fields.Integer(allow_none=True)
    tokens_per_char = fields.Float(allow_none=True, metadata={"description": "On the holdout."})
    multibyte_coverage = fields.Float(
        allow_none=True,
        metadata={"description": "Share of the holdout's bytes covered by tokens of more than one byte."},
    )


class TokenizerStatusSchema(Schema):
    tokenizer_id = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(JOB_STATUSES))
    message = fields.String(required=True)
    created_at = fields.Float(required=True)
    finished_at = fields.Float(required=True, allow_none=True)
    stats = fields.Nested(
        TokenizerStatsSchema,
        required=True,
        allow_none=True,
        metadata={"description": "Null until completed."},
    )
    artifact_path = fields.String(
        required=True, allow_none=True, metadata={"description": "Null until completed."}
    )


class ArtifactFileSchema(Schema):
    name = fields.String(required=True)
    bytes = fields.Integer(required=True)


class ArtifactListSchema(Schema):
    run_id = fields.String(required=True)
    files = fields.List(fields.Nested(ArtifactFileSchema), required=True)


class EvaluateRequestSchema(Schema):
    """POST /runs/{run_id}/evaluate; the body may be left out."""

    split = fields.String(
        load_default="validation",
        validate=validate.OneOf(EVALUATION_SPLITS),
        metadata={"description": '"test" needs a run trained with test_fraction > 0.'},
    )


class EvaluationAcceptedSchema(Schema):
    run_id = fields.String(required=True)
    split = fields.String(required=True)
    job_id = fields.String(required=True)


class EvaluationStatusSchema(Schema):
    run_id = fields.String(required=True)
    split = fields.String(required=True, allow_none=True)
    status = fields.String(required=True, validate=validate.OneOf(JOB_STATUSES))
    message = fields.String(required=True)
    loss = fields.Float(required=True, allow_none=True, metadata={"description": "Null until completed."})
    perplexity = fields.Float(required=True, allow_none=True)
    created_at = fields.Float(required=True)
    finished_at = fields.Float(required=True, allow_none=True)


class LogQuerySchema(Schema):
    tail = fields.Integer(
        strict=False,
        load_default=200,
        validate=validate.Range(min=1, max=10_000),
        metadata={"description": "How many of the last lines to send first."},
    )


LINK_TTL_DEFAULT_S = 7 * 24 * 3600
LINK_TTL_MAX_S = 30 * 24 * 3600


class LinkRequestSchema(Schema):
    """POST /runs/{run_id}/links; the body may be left out."""

    ttl_s = fields.Integer(
        strict=True,
        load_default=LINK_TTL_DEFAULT_S,
        validate=validate.Range(min=60, max=LINK_TTL_MAX_S),
        metadata={"description": "How long the links work, in seconds (7 days by default, 30 at most)."},
    )


class LinksSchema(Schema):
    download = fields.String(
        required=True,
        metadata={"description": "GET it with no header: the run's model folder as one .zip."},
    )
    events = fields.String(
        required=True,
        metadata={
            "description": "GET it with no header (an EventSource): the run's events, as server-sent events."
        },
    )
    expires_at = fields.Integer(required=True, metadata={"description": "Unix seconds"})
