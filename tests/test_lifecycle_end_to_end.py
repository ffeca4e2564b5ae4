"""Through the real gunicorn, worker and Redis: concurrent retries with one Idempotency-Key make one run,
concurrent requests never pass the per-user cap, a finished run is deleted with its files, and what
gunicorn itself refuses."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import redis
import requests

from tests.conftest import Stack
from trainer_api.idempotency import HEADER, REPLAYED_HEADER
from trainer_store.runs import RunStore, run_key, user_runs_key

TERMINAL = {"completed", "failed", "canceled"}


def fresh_user() -> int:
    """A Discord user of this test alone: runs and caps are per user, and the stack is shared."""
    return random.randrange(10**17, 10**18)


def tiny_run(stack: Stack, user_id: int) -> dict[str, object]:
    return {
        "model_size": "tiny",
        "max_seq_len": 32,
        "batch_size": 16,
        "num_epochs": 1,
        "corpus_path": "stories.txt",
        "user_id": user_id,
    }


def all_at_once(count: int, send: Callable[[], requests.Response]) -> list[requests.Response]:
    """`count` threads that each call `send()` at the same moment; their responses in thread order."""
    start = threading.Barrier(count)
    answers: list[requests.Response | None] = [None] * count

    def one(index: int) -> None:
        start.wait()
        answers[index] = send()

    threads = [threading.Thread(target=one, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    done = [answer for answer in answers if answer is not None]
    assert len(done) == count, "every request got an answer"
    return done


def wait_until_ended(stack: Stack, run_id: str, timeout_s: float = 180) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = requests.get(f"{stack.api_url}/runs/{run_id}", timeout=10).json()
        assert isinstance(body, dict)
        if body["status"] in TERMINAL:
            return body
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not end in {timeout_s} s")


def test_twenty_simultaneous_retries_make_one_run_which_is_then_deleted_with_its_files(stack: Stack) -> None:
    user_id = fresh_user()
    body = tiny_run(stack, user_id)
    key = f"interaction-{user_id}"
    answers = all_at_once(
        20,
        lambda: requests.post(f"{stack.api_url}/runs/train", json=body, headers={HEADER: key}, timeout=30),
    )
    assert {answer.status_code for answer in answers} == {202}, [answer.text for answer in answers]
    assert len({(answer.json()["run_id"], answer.json()["job_id"]) for answer in answers}) == 1
    assert sum(REPLAYED_HEADER not in answer.headers for answer in answers) == 1, "one request created it"
    client = redis.Redis.from_url(stack.redis_url)
    run_id = answers[0].json()["run_id"]
    assert client.zrange(user_runs_key(user_id), 0, -1) == [run_id.encode()]

    ended = wait_until_ended(stack, run_id)
    assert ended["status"] == "completed", ended
    assert ended["attempt"] == 1, "one task, one execution"
    record = RunStore(client).get(run_id)
    assert record is not None
    assert record.train_s > 0, "the attempt's training time was recorded"
    model_dir = stack.artifacts_root / "models" / run_id
    run_dir = stack.corpus_root.parent / "runs" / run_id
    assert (model_dir / "manifest.json").is_file()
    assert (run_dir / "checkpoints").is_dir()

    deleted = requests.delete(f"{stack.api_url}/runs/{run_id}", timeout=30)
    assert deleted.status_code == 204, deleted.text
    assert not model_dir.exists()
    assert not run_dir.exists()
    assert client.exists(run_key(run_id)) == 0
    assert requests.get(f"{stack.api_url}/runs/{run_id}", timeout=10).status_code == 404
    # A late retry with the same key answers the first response again: it creates nothing.
    late = requests.post(f"{stack.api_url}/runs/train", json=body, headers={HEADER: key}, timeout=10)
    assert (late.status_code, late.json()["run_id"], late.headers[REPLAYED_HEADER]) == (202, run_id, "true")
    assert client.zcard(user_runs_key(user_id)) == 0
    client.close()


def test_ten_simultaneous_requests_of_one_user_make_exactly_the_cap(stack: Stack) -> None:
    user_id = fresh_user()
    body = tiny_run(stack, user_id)
    answers = all_at_once(10, lambda: requests.post(f"{stack.api_url}/runs/train", json=body, timeout=30))
    accepted = [answer for answer in answers if answer.status_code == 202]
    refused = [answer for answer in answers if answer.status_code == 429]
    assert (len(accepted), len(refused)) == (3, 7), [answer.text for answer in answers]
    for answer in refused:
        assert answer.json()["code"] == "TOO_MANY_REQUESTS"
        assert "at most 3" in answer.json()["message"]
        assert answer.headers["Retry-After"] == "60"
    run_ids = [answer.json()["run_id"] for answer in accepted]
    for run_id in run_ids:
        assert requests.post(f"{stack.api_url}/runs/{run_id}/cancel", timeout=10).status_code == 202
    for run_id in run_ids:
        assert wait_until_ended(stack, run_id)["status"] == "canceled"
    # Their places are free again.
    again = requests.post(f"{stack.api_url}/runs/train", json=body, timeout=30)
    assert again.status_code == 202, again.text
    run_id = again.json()["run_id"]
    assert requests.post(f"{stack.api_url}/runs/{run_id}/cancel", timeout=10).status_code == 202
    assert wait_until_ended(stack, run_id)["status"] == "canceled"


def test_a_long_run_id_reaches_the_app_and_is_404_in_the_envelope(stack: Stack) -> None:
    long_id = "a" * 8000  # gunicorn's default request line limit (4094) would refuse it first
    response = requests.get(f"{stack.api_url}/runs/{long_id}", timeout=10)
    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"
    assert response.json()["request_id"] == response.headers["X-Request-ID"]


def test_what_gunicorn_refuses_itself_is_answered_plainly(stack: Stack) -> None:
    """Beyond its limits (a request line of 8190 bytes, a header of 8190) gunicorn answers before the
    app runs, without the envelope: 414 and 431. Acceptable: no real client sends these."""
    for status, response in (
        (414, requests.get(f"{stack.api_url}/runs/{'a' * 9000}", timeout=10)),
        (431, requests.get(f"{stack.api_url}/runs", headers={"X-Api-Key": "k" * 10_000}, timeout=10)),
    ):
        assert response.status_code == status
        assert "application/json" not in response.headers.get("Content-Type", "")
        assert "X-Request-ID" not in response.headers
