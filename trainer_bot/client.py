"""The typed HTTP client of the trainer API: one per process, blocking, built on requests."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import requests

REQUEST_ID_HEADER = "X-Request-ID"
API_KEY_HEADER = "X-Api-Key"
# Connect quickly or report the API as unreachable; a large upload may take longer to answer.
TIMEOUT_S = (3.05, 30.0)


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


class TrainerClient:
    """Every call sends the API key and a fresh X-Request-ID, and answers typed values or raises ApiError."""

    def __init__(self, base_url: str, api_key: str | None = None, session: requests.Session | None = None):
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._session = session or requests.Session()

    def models(self) -> ModelCatalog:
        return _catalog(_Json(self._json("GET", "/models"), "GET /models"))

    def train(self, order: TrainOrder) -> TrainAccepted:
        answer = _Json(self._json("POST", "/runs/train", json=order.body()), "POST /runs/train")
        return TrainAccepted(run_id=answer.text("run_id"), job_id=answer.text("job_id"))

    def run(self, run_id: str) -> RunInfo:
        return _run(_Json(self._json("GET", f"/runs/{run_id}"), "GET /runs/{run_id}"))

    def runs(self, user_id: int, limit: int = 20) -> list[RunInfo]:
        answer = _Json(self._json("GET", "/runs", params={"user_id": user_id, "limit": limit}), "GET /runs")
        return [_run(item) for item in answer.objects("runs")]

    def cancel(self, run_id: str) -> str:
        answer = _Json(self._json("POST", f"/runs/{run_id}/cancel"), "POST /runs/{run_id}/cancel")
        return answer.text("status")

    def upload_corpus(self, filename: str, data: bytes) -> Corpus:
        files = {"file": (filename, data, "text/plain")}
        return _corpus(_Json(self._json("POST", "/corpora", files=files), "POST /corpora"))

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

    def _json(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, int] | None = None,
        json: dict[str, object] | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
    ) -> object:
        response = self._call(method, path, params=params, json=json, files=files)
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
    ) -> requests.Response:
        request_id = uuid.uuid4().hex
        headers = {REQUEST_ID_HEADER: request_id}
        if self._api_key:
            headers[API_KEY_HEADER] = self._api_key
        try:
            response = self._session.request(
                method,
                self._base_url + path,
                headers=headers,
                timeout=TIMEOUT_S,
                params=params,
                json=json,
                files=files,
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
    return ApiError(status=response.status_code, code=code, message=message, request_id=request_id)


def _bad_answer(response: requests.Response, message: str) -> ApiError:
    return ApiError(
        status=response.status_code,
        code="BAD_RESPONSE",
        message=message,
        request_id=response.headers.get(REQUEST_ID_HEADER, ""),
    )


def _str_or(value: object, default: str) -> str:
    return value if isinstance(value, str) else default


class _Json:
    """Typed reads of a JSON object from the API; anything else raises ApiError BAD_RESPONSE."""

    def __init__(self, payload: object, where: str) -> None:
        if not isinstance(payload, dict):
            raise _malformed(where, "is not a JSON object")
        self._payload: Mapping[object, object] = payload
        self._where = where

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
    )


def _corpus(answer: _Json) -> Corpus:
    return Corpus(
        corpus_id=answer.text("corpus_id"),
        name=answer.optional_text("name") or "",
        bytes=answer.integer("bytes"),
        lines=answer.integer("lines"),
        created_at=answer.optional_number("created_at") or 0.0,
    )
