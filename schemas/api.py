"""Marshmallow schemas for the HTTP API's v1 bodies and answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate, validates_schema

from schemas.jobs import JOB_STATUSES
from schemas.models import DEFAULT_FAMILY, DEFAULT_SIZE
from schemas.runs import RUN_STATUSES

CORPUS_FIELDS = ("corpus_id", "corpus_path")
EXACTLY_ONE_CORPUS = "give exactly one of corpus_id and corpus_path"
EVALUATION_SPLITS = ("validation", "test")
TOKENIZER_METHODS = ("bpe",)


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
        validate=validate.Range(min=0),
        metadata={"description": "Discord user id to notify; 0 means no Discord user."},
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
        )

    def to_mapping(self) -> dict[str, object]:
        return asdict(self)


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


class RunListQuerySchema(Schema):
    """GET /runs: whose runs, and how many of the newest; unknown query fields are rejected."""

    user_id = fields.Integer(
        required=True,
        validate=validate.Range(min=0),
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


class HealthSchema(Schema):
    status = fields.String(required=True)


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
