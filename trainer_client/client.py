"""The typed HTTP client of the trainer API: one per process, blocking, built on requests."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import requests

from schemas.events import NotAnEvent, TrainEvent, decode_event

REQUEST_ID_HEADER = "X-Request-ID"
API_KEY_HEADER = "X-Api-Key"
# Sent by the calls that create something: a retried call with the same key answers the first result.
IDEMPOTENCY_HEADER = "Idempotency-Key"
LAST_EVENT_ID_HEADER = "Last-Event-ID"
# Connect quickly or report the API as unreachable; a large upload may take longer to answer.
TIMEOUT_S = (3.05, 30.0)
# A followed stream sends at least a keepalive comment every 15 s; a longer silence is a dead connection.
STREAM_TIMEOUT_S = (3.05, 60.0)
DOWNLOAD_CHUNK_BYTES = 256 * 1024


class ApiError(Exception):
    """A failed call: the API's error envelope, or a transport problem (status 0) or a malformed answer."""

    def __init__(self, *, status: int, code: str, message: str, request_id: str) -> None:
        super().__init__(f"{code} ({status}): {message} [request_id {request_id}]")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class ModelSize:
    size: str
    n_layer: int
    n_embd: int
    n_head: int
    params: int


@dataclass(frozen=True)
class ModelFamily:
    family: str
    sizes: tuple[ModelSize, ...]


@dataclass(frozen=True)
class ModelCatalog:
    default_family: str
    default_size: str
    families: tuple[ModelFamily, ...]
    # The API's JSON as it came, for callers that pass it on (`trainer models --json`).
    raw: Mapping[object, object] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class TrainOrder:
    """What POST /runs/train is sent; exactly one of corpus_id and corpus_path names the corpus."""

    user_id: int
    model_family: str
    model_size: str
    num_epochs: int
    batch_size: int
    learning_rate: float
    corpus_id: str | None = None
    corpus_path: str | None = None
    seed: int | None = None
    # A share of the corpus kept apart for POST /runs/{run_id}/evaluate with split "test"; None: none.
    test_fraction: float | None = None
    # None: the server's defaults (queue "training", or "gpu" for accelerator "gpu"; "auto"; 1 device).
    queue: str | None = None
    accelerator: str | None = None
    devices: int | None = None

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {
            "user_id": self.user_id,
            "model_family": self.model_family,
            "model_size": self.model_size,
            "num_epochs": self.num_epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
        }
        if self.corpus_id is not None:
            body["corpus_id"] = self.corpus_id
        if self.corpus_path is not None:
            body["corpus_path"] = self.corpus_path
        if self.seed is not None:
            body["seed"] = self.seed
        if self.test_fraction is not None:
            body["test_fraction"] = self.test_fraction
        for name, value in (
            ("queue", self.queue),
            ("accelerator", self.accelerator),
            ("devices", self.devices),
        ):
            if value is not None:
                body[name] = value
        return body


@dataclass(frozen=True)
class TrainAccepted:
    run_id: str
    job_id: str


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str
    user_id: int
    message: str
    created_at: float
    loss: float | None
    perplexity: float | None
    error_kind: str | None
    artifact_path: str | None = None
    queue: str | None = None
    # While queued: 1 when the run is the next its queue gives a worker.
    queue_position: int | None = None
    worker: str | None = None
    raw: Mapping[object, object] = field(default_factory=dict, compare=False, repr=False)


def runs_ahead(position: int) -> str:
    """A queued run's place for its owner: position 1 is the next a worker takes."""
    ahead = position - 1
    if ahead == 0:
        return "next in line"
    return f"{ahead} run{'s' if ahead > 1 else ''} ahead of yours"


@dataclass(frozen=True)
class QueueWorker:
    hostname: str
    host: str
    concurrency: int
    accelerator: str
    devices: int


@dataclass(frozen=True)
class QueueInfo:
    """A queue a live worker consumes: its workers and the tasks waiting in it."""

    name: str
    length: int
    workers: tuple[QueueWorker, ...]
    raw: Mapping[object, object] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class EvaluationAccepted:
    run_id: str
    split: str
    job_id: str


@dataclass(frozen=True)
class Links:
    """Paths on the API that work without a key until `expires_at` (Unix seconds)."""

    download: str
    events: str
    expires_at: int


@dataclass(frozen=True)
class Corpus:
    corpus_id: str
    name: str
    bytes: int
    lines: int
    created_at: float


@dataclass(frozen=True)
class ArtifactFile:
    name: str
    bytes: int | None


@dataclass(frozen=True)
class ServerSentEvent:
    """One event of a `text/event-stream` answer; `event` is "message" unless the server named it."""

    data: str
    event: str = "message"
    id: str | None = None


@dataclass(frozen=True)
class Download:
    """A body being read: its size when the server sent one, and its bytes in chunks."""

    size: int | None
    chunks: Iterator[bytes]


@dataclass(frozen=True)
class RunEvent:
    """One of a run's events: its entry id (to resume after) and the v1 event, or what could not be read."""

    entry_id: str
    event: TrainEvent | NotAnEvent


class TrainerClient:
    """Every call sends the API key and a fresh X-Request-ID, and answers typed values or raises ApiError."""

    def __init__(self, base_url: str, api_key: str | None = None, session: requests.Session | None = None):
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._session = session or requests.Session()

    def models(self) -> ModelCatalog:
        return _catalog(_Json(self._json("GET", "/models"), "GET /models"))

    def train(self, order: TrainOrder, idempotency_key: str | None = None) -> TrainAccepted:
        answer = _Json(
            self._json("POST", "/runs/train", json=order.body(), idempotency_key=idempotency_key),
            "POST /runs/train",
        )
        return TrainAccepted(run_id=answer.text("run_id"), job_id=answer.text("job_id"))

    def retry(self, run_id: str, idempotency_key: str | None = None) -> TrainAccepted:
        """A new run with the same request and owner as `run_id`."""
        where = "POST /runs/{run_id}/retry"
        answer = _Json(self._json("POST", f"/runs/{run_id}/retry", idempotency_key=idempotency_key), where)
        return TrainAccepted(run_id=answer.text("run_id"), job_id=answer.text("job_id"))

    def evaluate(self, run_id: str, split: str, idempotency_key: str | None = None) -> EvaluationAccepted:
        answer = _Json(
            self._json(
                "POST", f"/runs/{run_id}/evaluate", json={"split": split}, idempotency_key=idempotency_key
            ),
            "POST /runs/{run_id}/evaluate",
        )
        return EvaluationAccepted(
            run_id=answer.text("run_id"), split=answer.text("split"), job_id=answer.text("job_id")
        )

    def links(self, run_id: str, ttl_s: int) -> Links:
        """Signed links to the run's model that need no key; prefix them with the API's public address."""
        answer = _Json(
            self._json("POST", f"/runs/{run_id}/links", json={"ttl_s": ttl_s}), "POST /runs/{run_id}/links"
        )
        return Links(
            download=answer.text("download"),
            events=answer.text("events"),
            expires_at=answer.integer("expires_at"),
        )

    def run(self, run_id: str) -> RunInfo:
        return _run(_Json(self._json("GET", f"/runs/{run_id}"), "GET /runs/{run_id}"))

    def runs(self, user_id: int, limit: int = 20) -> list[RunInfo]:
        answer = _Json(self._json("GET", "/runs", params={"user_id": user_id, "limit": limit}), "GET /runs")
        return [_run(item) for item in answer.objects("runs")]

    def queues(self) -> list[QueueInfo]:
        """The queues that have a live worker, by name."""
        answer = _Json(self._json("GET", "/queues"), "GET /queues")
        return [
            QueueInfo(
                name=queue.text("name"),
                length=queue.integer("length"),
                workers=tuple(
                    QueueWorker(
                        hostname=worker.text("hostname"),
                        host=worker.text("host"),
                        concurrency=worker.integer("concurrency"),
                        accelerator=worker.text("accelerator"),
                        devices=worker.integer("devices"),
                    )
                    for worker in queue.objects("workers")
                ),
                raw=queue.raw,
            )
            for queue in answer.objects("queues")
        ]

    def cancel(self, run_id: str) -> str:
        answer = _Json(self._json("POST", f"/runs/{run_id}/cancel"), "POST /runs/{run_id}/cancel")
        return answer.text("status")

    def upload_corpus(self, filename: str, data: bytes, idempotency_key: str | None = None) -> Corpus:
        files = {"file": (filename, data, "text/plain")}
        answer = self._json("POST", "/corpora", files=files, idempotency_key=idempotency_key)
        return _corpus(_Json(answer, "POST /corpora"))

    def corpora(self) -> list[Corpus]:
        answer = _Json(self._json("GET", "/corpora"), "GET /corpora")
        return [_corpus(item) for item in answer.objects("corpora")]

    def artifact_files(self, run_id: str) -> list[ArtifactFile]:
        answer = _Json(self._json("GET", f"/runs/{run_id}/artifact"), "GET /runs/{run_id}/artifact")
        return [
            ArtifactFile(name=item.text("name"), bytes=item.optional_integer("bytes"))
            for item in answer.objects("files")
        ]

    def artifact(self, run_id: str, name: str) -> bytes:
        """One file of a run's artifacts, such as loss_curve.png, read through the API."""
        return self._call("GET", f"/runs/{run_id}/artifact/{name}").content

    # The `trainer` command's calls.
    def log_tail(self, run_id: str, tail: int = 200) -> str:
        """The last `tail` lines the worker logged for the run, one a line."""
        return self._call("GET", f"/runs/{run_id}/logs", params={"tail": tail}).text

    def follow_log(self, run_id: str, tail: int = 200) -> Iterator[str]:
        """The last `tail` log lines, then each new one, until the run has finished."""
        response = self._call("GET", f"/runs/{run_id}/logs/stream", params={"tail": tail}, stream=True)
        with response:
            events = server_sent_events(response.iter_lines(decode_unicode=True))
            yield from (event.data for event in itertools.takewhile(lambda e: e.event != "end", events))

    def events(self, run_id: str, after: str | None = None) -> Iterator[RunEvent]:
        """The run's events from its first (or after the entry id `after`), then each new one, until the
        run has ended."""
        headers = {LAST_EVENT_ID_HEADER: after} if after else None
        response = self._call("GET", f"/runs/{run_id}/events", stream=True, headers=headers)
        with response:
            messages = server_sent_events(response.iter_lines(decode_unicode=True))
            for message in itertools.takewhile(lambda m: m.event != "end", messages):
                yield RunEvent(message.id or "", decode_event(message.data))

    @contextlib.contextmanager
    def model_zip(self, run_id: str) -> Iterator[Download]:
        """The run's model folder as one zip, read as it arrives; the response closes with the block."""
        response = self._call("GET", f"/runs/{run_id}/model.zip", stream=True)
        with response:
            length = response.headers.get("Content-Length", "")
            yield Download(
                size=int(length) if length.isdigit() else None,
                chunks=response.iter_content(chunk_size=DOWNLOAD_CHUNK_BYTES),
            )

    def corpus_named(self, name: str) -> tuple[str | None, str | None]:
        """(corpus_id, corpus_path): an uploaded corpus of that name, else a file in the corpus root."""
        for corpus in self.corpora():
            if corpus.name == name:
                return corpus.corpus_id, None
        return None, name

    def _json(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, int] | None = None,
        json: dict[str, object] | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
        idempotency_key: str | None = None,
    ) -> object:
        response = self._call(
            method, path, params=params, json=json, files=files, idempotency_key=idempotency_key
        )
        try:
            payload: object = response.json()
        except ValueError:
            raise _bad_answer(response, f"{method} {path} answered something that is not JSON") from None
        return payload

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, int] | None = None,
        json: dict[str, object] | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
        stream: bool = False,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        request_id = uuid.uuid4().hex
        headers = {**(headers or {}), REQUEST_ID_HEADER: request_id}
        if self._api_key:
            headers[API_KEY_HEADER] = self._api_key
        if idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        try:
            response = self._session.request(
                method,
                self._base_url + path,
                headers=headers,
                timeout=STREAM_TIMEOUT_S if stream else TIMEOUT_S,
                params=params,
                json=json,
                files=files,
                stream=stream,
            )
        except requests.RequestException as exc:
            raise ApiError(
                status=0,
                code="UNREACHABLE",
                message=f"the trainer API did not answer ({type(exc).__name__})",
                request_id=request_id,
            ) from exc
        if response.status_code >= 400:
            raise _error_of(response, request_id)
        return response

    def close(self) -> None:
        self._session.close()


def _error_of(response: requests.Response, request_id: str) -> ApiError:
    """The API's envelope when it sent one; otherwise the HTTP status says what happened."""
    request_id = response.headers.get(REQUEST_ID_HEADER, request_id)
    try:
        body: object = response.json()
    except ValueError:
        body = None
    code, message = f"HTTP_{response.status_code}", response.reason or "error"
    if isinstance(body, dict):
        code = _str_or(body.get("code"), code)
        message = _str_or(body.get("message"), message)
        request_id = _str_or(body.get("request_id"), request_id)
        message += _field_details(body.get("errors"))
    return ApiError(status=response.status_code, code=code, message=message, request_id=request_id)


def _field_details(errors: object) -> str:
    """What each invalid field's check said, so a caller sees what to change without the JSON."""
    if not isinstance(errors, dict) or not errors:
        return ""
    details = [
        f"{name}: {' '.join(str(text) for text in texts)}"
        for name, texts in sorted(errors.items())
        if isinstance(texts, list)
    ]
    return " (" + "; ".join(details) + ")"


def _bad_answer(response: requests.Response, message: str) -> ApiError:
    return ApiError(
        status=response.status_code,
        code="BAD_RESPONSE",
        message=message,
        request_id=response.headers.get(REQUEST_ID_HEADER, ""),
    )


def server_sent_events(lines: Iterator[str]) -> Iterator[ServerSentEvent]:
    """Parse `text/event-stream` lines: comments (keepalives) are skipped, a blank line ends an event."""
    data: list[str] = []
    event, event_id = "message", None
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent("\n".join(data), event, event_id)
            data, event = [], "message"
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value


def _str_or(value: object, default: str) -> str:
    return value if isinstance(value, str) else default


class _Json:
    """Typed reads of a JSON object from the API; anything else raises ApiError BAD_RESPONSE."""

    def __init__(self, payload: object, where: str) -> None:
        if not isinstance(payload, dict):
            raise _malformed(where, "is not a JSON object")
        self._payload: Mapping[object, object] = payload
        self._where = where

    @property
    def raw(self) -> Mapping[object, object]:
        return self._payload

    def _value(self, name: str) -> object:
        return self._payload.get(name)

    def text(self, name: str) -> str:
        value = self._value(name)
        if not isinstance(value, str):
            raise _malformed(self._where, f"field {name!r} is not a string")
        return value

    def optional_text(self, name: str) -> str | None:
        return None if self._value(name) is None else self.text(name)

    def integer(self, name: str) -> int:
        value = self._value(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _malformed(self._where, f"field {name!r} is not an integer")
        return value

    def optional_integer(self, name: str) -> int | None:
        return None if self._value(name) is None else self.integer(name)

    def optional_number(self, name: str) -> float | None:
        value = self._value(name)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _malformed(self._where, f"field {name!r} is not a number")
        return float(value)

    def number(self, name: str) -> float:
        value = self.optional_number(name)
        if value is None:
            raise _malformed(self._where, f"field {name!r} is missing")
        return value

    def objects(self, name: str) -> list[_Json]:
        value = self._value(name)
        if not isinstance(value, list):
            raise _malformed(self._where, f"field {name!r} is not a list")
        return [_Json(item, f"{self._where} {name}[]") for item in value]


def _malformed(where: str, problem: str) -> ApiError:
    return ApiError(status=200, code="BAD_RESPONSE", message=f"{where}: {problem}", request_id="")


def _catalog(answer: _Json) -> ModelCatalog:
    return ModelCatalog(
        default_family=answer.text("default_family"),
        default_size=answer.text("default_size"),
        families=tuple(
            ModelFamily(
                family=family.text("family"),
                sizes=tuple(
                    ModelSize(
                        size=size.text("size"),
                        n_layer=size.integer("n_layer"),
                        n_embd=size.integer("n_embd"),
                        n_head=size.integer("n_head"),
                        params=size.integer("params"),
                    )
                    for size in family.objects("sizes")
                ),
            )
            for family in answer.objects("families")
        ),
        raw=answer.raw,
    )


def _run(answer: _Json) -> RunInfo:
    return RunInfo(
        run_id=answer.text("run_id"),
        status=answer.text("status"),
        user_id=answer.integer("user_id"),
        message=answer.optional_text("message") or "",
        created_at=answer.number("created_at"),
        loss=answer.optional_number("loss"),
        perplexity=answer.optional_number("perplexity"),
        error_kind=answer.optional_text("error_kind"),
        artifact_path=answer.optional_text("artifact_path"),
        queue=answer.optional_text("queue"),
        queue_position=answer.optional_integer("queue_position"),
        worker=answer.optional_text("worker"),
        raw=answer.raw,
    )


def _corpus(answer: _Json) -> Corpus:
    return Corpus(
        corpus_id=answer.text("corpus_id"),
        name=answer.optional_text("name") or "",
        bytes=answer.integer("bytes"),
        lines=answer.integer("lines"),
        created_at=answer.optional_number("created_at") or 0.0,
    )
