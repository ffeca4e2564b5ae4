"""trainer_tasks.jobs.run_job and trainer_store.jobs.JobStore against the real Redis."""

from __future__ import annotations

import logging

import pytest
import redis

from schemas.status import JobStatus
from scripts.devstack import free_port
from trainer_store.jobs import (
    FINISHED_JOB_TTL_S,
    JobRecord,
    JobStore,
    evaluation_key,
    tokenizer_key,
)
from trainer_store.storage import Storage
from trainer_tasks.errors import UserError
from trainer_tasks.jobs import JobEnd, run_job

KEY = tokenizer_key("tok-1")
REQUEST: dict[str, object] = {"corpus_path": "/c/notes.txt", "vocab_size": 300}


@pytest.fixture
def jobs(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client)


class Work:
    """Stands in for a job's work: notes each request and the record as it stood, then does as told."""

    def __init__(
        self, jobs: JobStore, result: dict[str, object] | None = None, error: Exception | None = None
    ):
        self._jobs = jobs
        self._result = result or {}
        self._error = error
        self.requests: list[dict[str, object]] = []
        self.seen: list[JobRecord | None] = []

    def __call__(self, request: dict[str, object]) -> dict[str, object]:
        self.requests.append(request)
        self.seen.append(self._jobs.get(KEY))
        if self._error is not None:
            raise self._error
        return self._result


def record_of(jobs: JobStore) -> JobRecord:
    record = jobs.get(KEY)
    assert record is not None
    return record


def test_keys_are_namespaced() -> None:
    assert tokenizer_key("tok-1") == "trainer:tokenizers:tok-1"
    assert evaluation_key("run-1") == "trainer:runs:run-1:eval"


def test_create_then_get(jobs: JobStore, redis_client: redis.Redis) -> None:
    jobs.create(KEY, REQUEST, now=5.0)
    assert record_of(jobs) == JobRecord(status="queued", request=REQUEST, created_at=5.0, message="queued")
    # A queued job lives until it ends.
    assert redis_client.ttl(KEY) == -1


def test_create_replaces_an_earlier_job_under_the_same_key(jobs: JobStore) -> None:
    jobs.create(KEY, REQUEST, now=5.0)
    jobs.fail(KEY, "broken", now=6.0)
    jobs.create(KEY, {"vocab_size": 500}, now=7.0)
    assert record_of(jobs) == JobRecord(
        status="queued", request={"vocab_size": 500}, created_at=7.0, message="queued"
    )


def test_get_of_an_unknown_job_is_none(jobs: JobStore) -> None:
    assert jobs.get(KEY) is None


def test_a_record_with_an_unknown_status_is_an_error(jobs: JobStore, redis_client: redis.Redis) -> None:
    jobs.create(KEY, REQUEST, now=5.0)
    redis_client.hset(KEY, "status", "exploded")
    with pytest.raises(ValueError, match="unknown job status 'exploded'"):
        jobs.get(KEY)


@pytest.mark.parametrize("finished", ["completed", "failed"])
def test_a_finished_job_is_kept_for_its_ttl(finished: str, jobs: JobStore, redis_client: redis.Redis) -> None:
    jobs.create(KEY, REQUEST, now=5.0)
    jobs.start(KEY)
    assert redis_client.ttl(KEY) == -1
    if finished == "completed":
        jobs.complete(KEY, {"vocab_size": 300}, now=9.0)
    else:
        jobs.fail(KEY, "no corpus", now=9.0)
    assert FINISHED_JOB_TTL_S - 60 < redis_client.ttl(KEY) <= FINISHED_JOB_TTL_S
    record = record_of(jobs)
    assert (record.status, record.finished_at) == (finished, 9.0)


def test_run_job_of_an_unknown_job_answers_missing(jobs: JobStore, redis_client: redis.Redis) -> None:
    work = Work(jobs)
    assert run_job(jobs, KEY, work) == "missing"
    assert work.requests == []
    assert not redis_client.exists(KEY)


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_run_job_of_a_finished_job_answers_its_status_without_working(
    status: JobStatus, jobs: JobStore
) -> None:
    jobs.create(KEY, REQUEST, now=5.0)
    if status == "completed":
        jobs.complete(KEY, {"loss": 1.0}, now=6.0)
    else:
        jobs.fail(KEY, "earlier failure", now=6.0)
    before = record_of(jobs)
    work = Work(jobs)
    assert run_job(jobs, KEY, work) == status
    assert work.requests == []
    assert record_of(jobs) == before


@pytest.mark.parametrize("status", ["queued", "running"])
def test_run_job_completes_with_the_works_result(
    status: str, jobs: JobStore, redis_client: redis.Redis
) -> None:
    jobs.create(KEY, REQUEST, now=5.0)
    if status == "running":
        jobs.start(KEY)  # a redelivery of a job whose worker died
    work = Work(jobs, result={"vocab_size": 300, "tokens_per_char": 0.25})
    assert run_job(jobs, KEY, work) == "completed"
    assert work.requests == [REQUEST]
    # The record said running while the work ran.
    [seen] = work.seen
    assert seen is not None
    assert (seen.status, seen.message) == ("running", "running")
    record = record_of(jobs)
    assert (record.status, record.message) == ("completed", "completed")
    assert record.result == {"vocab_size": 300, "tokens_per_char": 0.25}
    assert record.finished_at is not None
    assert record.finished_at >= 5.0
    assert record.request == REQUEST
    assert 0 < redis_client.ttl(KEY) <= FINISHED_JOB_TTL_S


def test_run_job_fails_a_user_error_with_its_message(jobs: JobStore) -> None:
    jobs.create(KEY, REQUEST, now=5.0)
    assert run_job(jobs, KEY, Work(jobs, error=UserError("the corpus is empty"))) == "failed"
    record = record_of(jobs)
    assert (record.status, record.message, record.result) == ("failed", "the corpus is empty", None)
    assert record.finished_at is not None


def test_run_job_fails_any_other_error_naming_its_type_but_not_its_text(
    jobs: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    jobs.create(KEY, REQUEST, now=5.0)
    with caplog.at_level(logging.ERROR, logger="trainer_tasks.jobs"):
        assert run_job(jobs, KEY, Work(jobs, error=KeyError("password=hunter2"))) == "failed"
    record = record_of(jobs)
    assert record.status == "failed"
    assert record.message == "the worker hit an internal error (KeyError); see the worker log"
    assert "hunter2" not in record.message
    # The details go to the worker log.
    [logged] = caplog.records
    assert logged.getMessage() == f"job {KEY} failed"
    assert logged.exc_info is not None


def test_run_job_fails_a_store_that_does_not_answer_naming_the_store(
    jobs: JobStore, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    storage = Storage("s3://corpora-bucket/prefix", timeout_s=1)
    jobs.create(KEY, REQUEST, now=5.0)

    def read_corpus(request: dict[str, object]) -> dict[str, object]:
        return {"bytes": len(storage.read_bytes("uploads/c1.txt"))}

    ends: list[JobEnd] = []
    assert run_job(jobs, KEY, read_corpus, ends.append) == "failed"
    record = record_of(jobs)
    assert record.message.startswith(
        f"the job could not use the object store s3://corpora-bucket/prefix at {endpoint}: "
    )
    # Whoever waits on the job hears why, as for any other failure.
    assert [(end.error_kind, end.message) for end in ends] == [("system", record.message)]
