"""The bot's typed API client against the real API over HTTP, and against broken answers at the edge."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import ClassVar

import pytest
import redis
import requests

from scripts.devstack import free_port
from tests.bot_support import OTHER_USER, USER, serve_api
from tests.conftest import DispatchRecorder
from trainer_client.client import ApiError, ModelSize, TrainerClient, TrainOrder
from trainer_store.settings import Settings

ORDER = TrainOrder(
    user_id=USER,
    model_family="gpt2",
    model_size="tiny",
    num_epochs=2,
    batch_size=8,
    learning_rate=5e-4,
    corpus_path="notes.txt",
)


@pytest.fixture
def api(
    settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder
) -> Iterator[TrainerClient]:
    with serve_api(replace(settings, api_key="s3cret"), dispatched) as url:
        client = TrainerClient(url, api_key="s3cret")
        yield client
        client.close()


def test_models_are_typed(api: TrainerClient) -> None:
    catalog = api.models()
    assert (catalog.default_family, catalog.default_size) == ("gpt2", "small")
    tiny = next(size for size in catalog.families[0].sizes if size.size == "tiny")
    assert tiny == ModelSize(size="tiny", n_layer=2, n_embd=128, n_head=2, params=1_461_760)


def test_train_status_list_and_cancel_round_trip(api: TrainerClient, dispatched: DispatchRecorder) -> None:
    accepted = api.train(ORDER)
    assert dispatched.sent == [(accepted.run_id, accepted.job_id)]
    run = api.run(accepted.run_id)
    assert (run.run_id, run.status, run.user_id, run.loss, run.error_kind) == (
        accepted.run_id,
        "queued",
        USER,
        None,
        None,
    )
    assert isinstance(run.created_at, float)
    assert [r.run_id for r in api.runs(USER)] == [accepted.run_id]
    assert api.runs(OTHER_USER) == []
    assert api.cancel(accepted.run_id) == "cancellation-requested"


def test_each_call_sends_a_fresh_request_id_and_errors_carry_the_servers(api: TrainerClient) -> None:
    with pytest.raises(ApiError) as first:
        api.run("missing")
    with pytest.raises(ApiError) as second:
        api.cancel("missing")
    assert (first.value.status, first.value.code) == (404, "NOT_FOUND")
    assert first.value.request_id != second.value.request_id
    assert len(first.value.request_id) == 32
    assert "missing" in first.value.message
    assert first.value.request_id in str(first.value)


def test_validation_errors_and_a_wrong_key_are_api_errors(api: TrainerClient, settings: Settings) -> None:
    with pytest.raises(ApiError) as invalid:
        api.train(replace(ORDER, num_epochs=0))
    assert (invalid.value.status, invalid.value.code) == (422, "VALIDATION_ERROR")
    # Each field's own message comes with it: the user sees what to change.
    assert (
        invalid.value.message
        == "invalid field(s): num_epochs (num_epochs: Must be greater than or equal to 1.)"
    )
    keyless = TrainerClient(api._base_url)
    with pytest.raises(ApiError) as unauthorized:
        keyless.models()
    assert unauthorized.value.code == "UNAUTHORIZED"


def test_an_unreachable_api_is_an_api_error_with_the_request_id_sent() -> None:
    with pytest.raises(ApiError) as error:
        TrainerClient(f"http://127.0.0.1:{free_port()}").models()
    assert (error.value.status, error.value.code) == (0, "UNREACHABLE")
    assert len(error.value.request_id) == 32


class _Broken(http.server.BaseHTTPRequestHandler):
    """Answers like a misconfigured proxy or an incompatible server would."""

    answers: ClassVar[dict[str, tuple[int, str, bytes]]] = {
        "/models": (200, "application/json", b'{"default_family": 1}'),
        "/runs": (200, "application/json", b"[1, 2]"),
        "/runs/html": (200, "text/html", b"<html>hello</html>"),
        "/runs/badgateway": (502, "text/html", b"<html>bad gateway</html>"),
        "/runs/nocreated": (200, "application/json", b'{"run_id": "x", "status": "queued", "user_id": 1}'),
        "/runs/badloss": (
            200,
            "application/json",
            b'{"run_id": "x", "status": "queued", "user_id": 1, "created_at": 1.0, "loss": "low"}',
        ),
        "/runs/y/artifact": (200, "application/json", b'{"files": "none"}'),
        "/runs/halfenvelope": (409, "application/json", b'{"code": 7}'),
        "/runs/x/artifact": (
            200,
            "application/json",
            b'{"files": [{"name": "loss_curve.png", "bytes": "big"}]}',
        ),
    }

    def do_GET(self) -> None:
        status, content_type, body = self.answers[self.path.split("?")[0]]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("X-Request-ID", "from-the-server")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def broken() -> Iterator[TrainerClient]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield TrainerClient(f"http://127.0.0.1:{server.server_port}/", session=requests.Session())
    server.shutdown()


@pytest.mark.parametrize(
    ("call", "status", "code", "message"),
    [
        (lambda c: c.models(), 200, "BAD_RESPONSE", "GET /models: field 'default_family' is not a string"),
        (lambda c: c.runs(1), 200, "BAD_RESPONSE", "GET /runs: is not a JSON object"),
        (lambda c: c.run("html"), 200, "BAD_RESPONSE", "GET /runs/html answered something that is not JSON"),
        (lambda c: c.run("badgateway"), 502, "HTTP_502", "Bad Gateway"),
        (lambda c: c.run("halfenvelope"), 409, "HTTP_409", "Conflict"),
        (lambda c: c.run("badloss"), 200, "BAD_RESPONSE", "GET /runs/{run_id}: field 'loss' is not a number"),
        (
            lambda c: c.artifact_files("y"),
            200,
            "BAD_RESPONSE",
            "GET /runs/{run_id}/artifact: field 'files' is not a list",
        ),
        (
            lambda c: c.run("nocreated"),
            200,
            "BAD_RESPONSE",
            "GET /runs/{run_id}: field 'created_at' is missing",
        ),
        (
            lambda c: c.artifact_files("x"),
            200,
            "BAD_RESPONSE",
            "GET /runs/{run_id}/artifact files[]: field 'bytes' is not an integer",
        ),
    ],
)
def test_answers_that_break_the_contract_are_api_errors(
    broken: TrainerClient, call: object, status: int, code: str, message: str
) -> None:
    assert callable(call)
    with pytest.raises(ApiError) as error:
        call(broken)
    assert (error.value.status, error.value.code, error.value.message) == (status, code, message)
