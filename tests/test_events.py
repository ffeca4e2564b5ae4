"""The v1 event encoder and decoder: round trips, the compact wire form and every rejection."""

from __future__ import annotations

import json

import pytest

from schemas.events import (
    EvalCompleted,
    EvalFailed,
    NotAnEvent,
    TrainCompleted,
    TrainEvent,
    TrainFailed,
    TrainProgress,
    TrainStarted,
    decode_event,
    encode_event,
)

SNOWFLAKE = 123456789012345678

MINIMAL_EVENTS: list[TrainEvent] = [
    TrainStarted(
        request_id="r1",
        run_id="r1",
        user_id=SNOWFLAKE,
        model_family="gpt2",
        model_size="small",
        total_epochs=3,
        queue="train",
    ),
    TrainProgress(
        request_id="r1", run_id="r1", user_id=SNOWFLAKE, epoch=1, total_epochs=3, step=10, loss=2.5
    ),
    TrainCompleted(
        request_id="r1",
        run_id="r1",
        user_id=SNOWFLAKE,
        loss=1.25,
        perplexity=3.49,
        artifact_path="/var/artifacts/r1",
    ),
    TrainFailed(
        request_id="r1",
        run_id="r1",
        user_id=0,
        error_kind="user",
        message="corpus is empty",
        status="failed",
    ),
    EvalCompleted(request_id="r1", run_id="r1", user_id=SNOWFLAKE, split="test", loss=2.0, perplexity=7.39),
    EvalFailed(
        request_id="r1",
        run_id="r1",
        user_id=SNOWFLAKE,
        split="validation",
        error_kind="user",
        message="the run has no validation split to evaluate",
    ),
]

FULL_EVENTS: list[TrainEvent] = [
    TrainStarted(
        request_id="r2",
        run_id="r2",
        user_id=SNOWFLAKE,
        event_id="e1",
        seq=1,
        ts=1700000000.5,
        model_family="gpt2",
        model_size="tiny",
        total_epochs=2,
        queue="train",
        cpu_cores=8,
        memory_mb=16000,
        optimal_threads=4,
        optimal_workers=2,
        batch_size=16,
        learning_rate=0.001,
        worker="gpu@box-1",
        accelerator="gpu",
        devices=2,
        torch_threads=4,
    ),
    TrainProgress(
        request_id="r2",
        run_id="r2",
        user_id=SNOWFLAKE,
        event_id="e2",
        seq=2,
        ts=1700000001.25,
        epoch=1,
        total_epochs=2,
        step=7,
        loss=4.75,
        samples_per_sec=12.5,
        main_rss_mb=512,
        workers_rss_mb=256,
        worker_count=2,
        cgroup_usage_mb=700,
        cgroup_limit_mb=2048,
        cgroup_pct=34.2,
        tokens_per_sec=1600.0,
        eta_s=42.0,
        val_loss=4.9,
        lr=0.0005,
    ),
    TrainCompleted(
        request_id="r2",
        run_id="r2",
        user_id=SNOWFLAKE,
        event_id="e3",
        seq=3,
        ts=1700000002.0,
        loss=1.5,
        perplexity=4.48,
        artifact_path="/var/artifacts/r2",
        sample="the cat sat — on the mat",
        params=1234567,
        duration_s=12.75,
    ),
    TrainFailed(
        request_id="r2",
        run_id="r2",
        user_id=SNOWFLAKE,
        event_id="e4",
        seq=4,
        ts=1700000003.0,
        error_kind="system",
        message="worker lost",
        status="canceled",
    ),
]


def _valid_payload(event: TrainEvent) -> dict[str, object]:
    decoded: object = json.loads(encode_event(event))
    assert isinstance(decoded, dict)
    return {str(key): value for key, value in decoded.items()}


def _rejection(payload: object) -> str:
    result = decode_event(json.dumps(payload))
    assert isinstance(result, NotAnEvent), result
    return result.reason


@pytest.mark.parametrize("event", MINIMAL_EVENTS + FULL_EVENTS, ids=lambda e: f"{e.type}")
def test_round_trip(event: TrainEvent) -> None:
    assert decode_event(encode_event(event)) == event


@pytest.mark.parametrize("event", MINIMAL_EVENTS + FULL_EVENTS)
def test_round_trip_from_bytes(event: TrainEvent) -> None:
    assert decode_event(encode_event(event).encode()) == event


@pytest.mark.parametrize("event", MINIMAL_EVENTS + FULL_EVENTS)
def test_encoding_is_compact(event: TrainEvent) -> None:
    encoded = encode_event(event)
    assert "\n" not in encoded
    assert encoded == json.dumps(json.loads(encoded), separators=(",", ":"), ensure_ascii=False)
    assert encoded != json.dumps(json.loads(encoded), ensure_ascii=False)
    assert encoded.startswith('{"type":"' + event.type + '",')


@pytest.mark.parametrize("event", MINIMAL_EVENTS[:3] + FULL_EVENTS[:2])
def test_encoding_has_no_spaces(event: TrainEvent) -> None:
    assert " " not in encode_event(event)


def test_encoding_has_no_space_after_separators() -> None:
    encoded = encode_event(MINIMAL_EVENTS[1])
    assert ", " not in encoded
    assert ": " not in encoded
    assert '"epoch":1,' in encoded


@pytest.mark.parametrize("event", MINIMAL_EVENTS)
def test_unset_optionals_are_omitted(event: TrainEvent) -> None:
    payload = _valid_payload(event)
    assert None not in payload.values()
    for optional in ("event_id", "seq", "ts"):
        assert optional not in payload


def test_set_optionals_are_written() -> None:
    payload = _valid_payload(FULL_EVENTS[1])
    assert payload["event_id"] == "e2"
    assert payload["seq"] == 2
    assert payload["ts"] == 1700000001.25
    assert payload["cgroup_limit_mb"] == 2048
    assert payload["lr"] == 0.0005


def test_exact_field_set_of_minimal_started() -> None:
    assert _valid_payload(MINIMAL_EVENTS[0]) == {
        "type": "trainer.train.started.v1",
        "request_id": "r1",
        "run_id": "r1",
        "user_id": SNOWFLAKE,
        "model_family": "gpt2",
        "model_size": "small",
        "total_epochs": 3,
        "queue": "train",
    }


def test_non_ascii_text_is_written_as_is() -> None:
    assert "—" in encode_event(FULL_EVENTS[2])


def test_snowflake_user_id_survives_exactly() -> None:
    encoded = encode_event(MINIMAL_EVENTS[0])
    assert '"user_id":123456789012345678' in encoded
    decoded = decode_event(encoded)
    assert isinstance(decoded, TrainStarted)
    assert decoded.user_id == SNOWFLAKE
    assert isinstance(decoded.user_id, int)


def test_integer_number_fields_decode_as_float() -> None:
    payload = _valid_payload(MINIMAL_EVENTS[1])
    payload["loss"] = 3
    decoded = decode_event(json.dumps(payload))
    assert isinstance(decoded, TrainProgress)
    assert decoded.loss == 3.0
    assert isinstance(decoded.loss, float)


@pytest.mark.parametrize("event", MINIMAL_EVENTS)
def test_unknown_extra_fields_are_ignored(event: TrainEvent) -> None:
    payload = _valid_payload(event)
    payload["from_the_future"] = {"nested": [1, 2, 3]}
    payload["another"] = "x"
    assert decode_event(json.dumps(payload)) == event


@pytest.mark.parametrize("event", MINIMAL_EVENTS)
def test_explicit_null_optionals_decode_as_unset(event: TrainEvent) -> None:
    payload = _valid_payload(event)
    payload.update(event_id=None, seq=None, ts=None)
    assert decode_event(json.dumps(payload)) == event


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("", "invalid JSON"),
        ("{not json", "invalid JSON"),
        ('{"type": "trainer.train.started.v1"', "invalid JSON"),
        (b"\xff\xfe\xfa", "invalid JSON"),
        (b'{"type":"\xc3\x28"}', "invalid JSON"),
        ("[1, 2, 3]", "not a JSON object"),
        ('"a string"', "not a JSON object"),
        ("42", "not a JSON object"),
        ("null", "not a JSON object"),
        ("{}", "missing type None"),
        ('{"request_id": "r"}', "missing type None"),
        ('{"type": "trainer.train.exploded.v1"}', "unknown or missing type 'trainer.train.exploded.v1'"),
        ('{"type": 7}', "unknown or missing type 7"),
        ('{"type": ["trainer.train.started.v1"]}', "unknown or missing type"),
        ("[" * 100_000, "invalid JSON"),
        ('{"type":"trainer.train.progress.v1","loss":NaN}', "NaN is not JSON"),
        ('{"type":"trainer.train.progress.v1","loss":-Infinity}', "-Infinity is not JSON"),
    ],
)
def test_malformed_payloads(raw: str | bytes, needle: str) -> None:
    result = decode_event(raw)
    assert isinstance(result, NotAnEvent)
    assert result.reason.startswith("not a v1 event: ")
    assert needle in result.reason


@pytest.mark.parametrize("event", MINIMAL_EVENTS)
def test_every_required_field_is_required(event: TrainEvent) -> None:
    full = _valid_payload(event)
    for name in full:
        if name == "type":
            continue
        payload = dict(full)
        del payload[name]
        reason = _rejection(payload)
        assert reason == f"not a v1 event: {event.type} lacks field {name!r}"


@pytest.mark.parametrize(
    ("index", "field", "value", "expected"),
    [
        (0, "user_id", "123", "field 'user_id' must be an integer"),
        (0, "user_id", True, "field 'user_id' must be an integer"),
        (0, "user_id", 1.5, "field 'user_id' must be an integer"),
        (0, "user_id", 1.0, "field 'user_id' must be an integer"),
        (0, "user_id", None, "field 'user_id' must be an integer"),
        (0, "total_epochs", "3", "field 'total_epochs' must be an integer"),
        (0, "cpu_cores", "8", "field 'cpu_cores' must be an integer"),
        (0, "cpu_cores", False, "field 'cpu_cores' must be an integer"),
        (0, "learning_rate", "0.1", "field 'learning_rate' must be a number"),
        (0, "request_id", 5, "field 'request_id' must be a string"),
        (0, "run_id", None, "field 'run_id' must be a string"),
        (0, "queue", ["train"], "field 'queue' must be a string"),
        (0, "seq", "1", "field 'seq' must be an integer"),
        (0, "ts", "now", "field 'ts' must be a number"),
        (0, "ts", True, "field 'ts' must be a number"),
        (0, "event_id", 5, "field 'event_id' must be a string"),
        (1, "epoch", 1.5, "field 'epoch' must be an integer"),
        (1, "step", True, "field 'step' must be an integer"),
        (1, "loss", "2.5", "field 'loss' must be a number"),
        (1, "loss", True, "field 'loss' must be a number"),
        (1, "loss", None, "field 'loss' must be a number"),
        (1, "samples_per_sec", "fast", "field 'samples_per_sec' must be a number"),
        (1, "cgroup_limit_mb", 2048.5, "field 'cgroup_limit_mb' must be an integer"),
        (2, "perplexity", "3.4", "field 'perplexity' must be a number"),
        (2, "artifact_path", 1, "field 'artifact_path' must be a string"),
        (2, "sample", 1, "field 'sample' must be a string"),
        (2, "sample", {"text": "x"}, "field 'sample' must be a string"),
        (2, "params", "1000", "field 'params' must be an integer"),
        (3, "error_kind", "fatal", "field 'error_kind' must be 'user' or 'system'"),
        (3, "error_kind", "USER", "field 'error_kind' must be 'user' or 'system'"),
        (3, "error_kind", 1, "field 'error_kind' must be a string"),
        (3, "status", "completed", "field 'status' must be 'failed' or 'canceled'"),
        (3, "status", "cancelled", "field 'status' must be 'failed' or 'canceled'"),
        (3, "message", None, "field 'message' must be a string"),
        (4, "split", "train", "field 'split' must be 'validation' or 'test'"),
        (4, "loss", "2", "field 'loss' must be a number"),
        (5, "split", None, "field 'split' must be a string"),
        (5, "error_kind", "fatal", "field 'error_kind' must be 'user' or 'system'"),
    ],
)
def test_wrong_types(index: int, field: str, value: object, expected: str) -> None:
    event = MINIMAL_EVENTS[index]
    payload = _valid_payload(event)
    payload[field] = value
    assert _rejection(payload) == f"not a v1 event: {event.type} {expected}"


@pytest.mark.parametrize("status", ["failed", "canceled"])
@pytest.mark.parametrize("error_kind", ["user", "system"])
def test_failed_accepts_each_kind_and_status(error_kind: str, status: str) -> None:
    payload = _valid_payload(MINIMAL_EVENTS[3])
    payload.update(error_kind=error_kind, status=status)
    decoded = decode_event(json.dumps(payload))
    assert isinstance(decoded, TrainFailed)
    assert decoded.error_kind == error_kind
    assert decoded.status == status


@pytest.mark.parametrize(
    "raw",
    ["", "[", "{", "\x00", '{"type":null}', '{"type":"trainer.train.failed.v1","user_id":{}}', b"\x80"],
)
def test_decoder_never_raises(raw: str | bytes) -> None:
    assert isinstance(decode_event(raw), NotAnEvent)
