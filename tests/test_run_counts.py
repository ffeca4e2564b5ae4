"""RunStore's bookkeeping against the real Redis: counts by status, active-run indexes, caps, the unsent
watch, time trained per attempt, deletes and retiring corpora and tokenizers."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from trainer_store.corpora import CorpusRecord, CorpusStore, corpus_key
from trainer_store.jobs import JobStore, evaluation_key, tokenizer_key
from trainer_store.records import is_record_id, text
from trainer_store.runs import (
    FINISHED_RUN_TTL_S,
    NEVER_SENT_MESSAGE,
    RUN_STATS_KEY,
    UNSENT_RUNS_KEY,
    InputGone,
    QueueFull,
    Retirement,
    RunRefused,
    RunStore,
    TooManyActiveRuns,
    corpus_runs_key,
    lease_key,
    run_events_key,
    run_key,
    run_log_key,
    tokenizer_runs_key,
    user_active_key,
    user_runs_key,
)

USER = 123456789012345678
NOW = 1700000000.5


@pytest.fixture
def store(redis_client: redis.Redis) -> RunStore:
    return RunStore(redis_client)


def create(
    store: RunStore,
    run_id: str,
    user_id: int = USER,
    *,
    corpus_id: str | None = None,
    tokenizer_id: str | None = None,
    user_cap: int = 0,
    queue_cap: int = 0,
    unsent_grace_s: float = 0.0,
) -> None:
    store.create(
        run_id=run_id,
        job_id=f"job-{run_id}",
        user_id=user_id,
        request={"corpus_path": "/c/notes.txt"},
        now=NOW,
        corpus_id=corpus_id,
        tokenizer_id=tokenizer_id,
        max_active_for_user=user_cap,
        max_queued=queue_cap,
        unsent_grace_s=unsent_grace_s,
    )


def counts(store: RunStore) -> dict[str, int]:
    """Only the statuses with runs in them."""
    return {status: number for status, number in store.counts().items() if number}


def members(client: redis.Redis, key: str) -> set[str]:
    return {text(member) for member in client.smembers(key)}


def add_corpus(client: redis.Redis, corpus_id: str) -> None:
    CorpusStore(client).add(
        CorpusRecord(corpus_id=corpus_id, name="c.txt", bytes=1, lines=1, created_at=NOW, path="/c/c.txt")
    )


def add_tokenizer(client: redis.Redis, tokenizer_id: str, completed: bool = True) -> None:
    jobs = JobStore(client)
    jobs.create(tokenizer_key(tokenizer_id), {"vocab_size": 256}, NOW)
    if completed:
        jobs.complete(tokenizer_key(tokenizer_id), {"artifact_path": "x"}, NOW)


# ------------------------------------------------------------------------------------ counts and indexes


def test_every_transition_keeps_the_counts_and_the_users_active_runs(
    store: RunStore, redis_client: redis.Redis
) -> None:
    for run_id in ("a", "b", "c"):
        create(store, run_id)
    assert counts(store) == {"queued": 3}
    assert store.active_for_user(USER) == 3
    assert redis_client.hgetall(RUN_STATS_KEY) == {b"queued": b"3"}

    assert store.claim("a", "w", 60, NOW + 1)
    assert store.claim("b", "w", 60, NOW + 1)
    assert counts(store) == {"queued": 1, "running": 2}
    assert store.hand_back("b", "requeued after a worker shutdown", now=NOW + 2)
    store.release("b", "w")
    assert counts(store) == {"queued": 2, "running": 1}
    assert store.finish("a", "completed", "completed", NOW + 3)
    assert store.transition("c", ("queued",), "canceled", {"message": "canceled"}, now=NOW + 4)
    assert counts(store) == {"queued": 1, "completed": 1, "canceled": 1}
    assert members(redis_client, user_active_key(USER)) == {"b"}
    assert store.active_for_user(USER) == 1

    assert store.claim("b", "w", 60, NOW + 5)
    assert store.finish("b", "failed", "broke", NOW + 6, error_kind="system")
    assert counts(store) == {"completed": 1, "canceled": 1, "failed": 1}
    # The set empties, and Redis drops an empty set: nothing is left behind per user.
    assert redis_client.exists(user_active_key(USER)) == 0


def test_refused_transitions_change_no_count(store: RunStore) -> None:
    create(store, "a")
    assert not store.finish("a", "completed", "not running yet", NOW)
    assert not store.hand_back("a", "not running")
    assert not store.transition("ghost", ("queued",), "failed")
    assert not store.claim("ghost", "w", 60, NOW)
    assert store.claim("a", "w", 60, NOW)
    assert not store.claim("a", "other", 60, NOW), "the lease is held"
    assert store.finish("a", "completed", "completed", NOW)
    assert not store.finish("a", "failed", "too late", NOW)
    assert not store.claim("a", "w", 60, NOW), "a finished run is not claimed again"
    assert counts(store) == {"completed": 1}


def test_a_takeover_of_a_running_run_counts_it_once(store: RunStore, redis_client: redis.Redis) -> None:
    create(store, "a")
    assert store.claim("a", "dead-worker", 60, NOW)
    redis_client.delete(lease_key("a"))  # the dead worker's lease has expired
    assert store.claim("a", "w", 60, NOW + 100)
    assert counts(store) == {"running": 1}
    assert store.active_for_user(USER) == 1


def test_records_from_before_the_counts_are_left_out_of_them(
    store: RunStore, redis_client: redis.Redis
) -> None:
    """A record written without `active_sets` (before this bookkeeping) never drives a count negative."""
    redis_client.hset(
        run_key("old"),
        mapping={"run_id": "old", "job_id": "j", "status": "queued", "user_id": USER, "created_at": NOW},
    )
    assert store.claim("old", "w", 60, NOW)
    assert store.finish("old", "completed", "completed", NOW)
    assert counts(store) == {}
    assert redis_client.ttl(run_key("old")) > FINISHED_RUN_TTL_S - 10


def test_the_runs_using_a_corpus_or_tokenizer_are_indexed_while_active(
    store: RunStore, redis_client: redis.Redis
) -> None:
    add_corpus(redis_client, "corp")
    add_tokenizer(redis_client, "tok")
    create(store, "a", corpus_id="corp", tokenizer_id="tok")
    create(store, "b", corpus_id="corp")
    assert members(redis_client, corpus_runs_key("corp")) == {"a", "b"}
    assert members(redis_client, tokenizer_runs_key("tok")) == {"a"}
    assert store.claim("a", "w", 60, NOW)
    assert store.finish("a", "completed", "completed", NOW)
    assert members(redis_client, corpus_runs_key("corp")) == {"b"}
    assert redis_client.exists(tokenizer_runs_key("tok")) == 0


# -------------------------------------------------------------------------------------------------- caps


def test_the_user_cap_refuses_a_run_beyond_it_and_writes_nothing(
    store: RunStore, redis_client: redis.Redis
) -> None:
    for run_id in ("a", "b"):
        create(store, run_id, user_cap=2)
    with pytest.raises(TooManyActiveRuns) as refused:
        create(store, "c", user_cap=2)
    assert (refused.value.active, refused.value.cap) == (2, 2)
    assert redis_client.exists(run_key("c")) == 0
    assert counts(store) == {"queued": 2}
    create(store, "c", user_id=USER + 1, user_cap=2)  # another user is not affected
    # A finished run frees its place.
    assert store.claim("a", "w", 60, NOW)
    assert store.finish("a", "completed", "completed", NOW)
    create(store, "d", user_cap=2)
    assert store.active_for_user(USER) == 2


def test_the_queue_cap_counts_queued_runs_of_everyone(store: RunStore, redis_client: redis.Redis) -> None:
    create(store, "a", user_id=1, queue_cap=2)
    create(store, "b", user_id=2, queue_cap=2)
    with pytest.raises(QueueFull) as refused:
        create(store, "c", user_id=3, queue_cap=2)
    assert (refused.value.queued, refused.value.cap) == (2, 2)
    assert redis_client.exists(run_key("c")) == 0
    assert store.claim("a", "w", 60, NOW)  # running runs do not count toward the queue cap
    create(store, "c", user_id=3, queue_cap=2)
    assert counts(store) == {"queued": 2, "running": 1}


def test_concurrent_creations_never_overshoot_the_cap(redis_url: str, redis_client: redis.Redis) -> None:
    created: list[str] = []
    refused: list[str] = []
    start = threading.Barrier(10)

    def submit(number: int) -> None:
        client = redis.Redis.from_url(redis_url)
        start.wait()
        try:
            create(RunStore(client), f"run-{number}", user_cap=3)
            created.append(f"run-{number}")
        except TooManyActiveRuns:
            refused.append(f"run-{number}")
        finally:
            client.close()

    threads = [threading.Thread(target=submit, args=(number,)) for number in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(created) == 3
    assert len(refused) == 7
    assert members(redis_client, user_active_key(USER)) == set(created)
    assert redis_client.zcard(user_runs_key(USER)) == 3


def test_a_run_id_is_written_once(store: RunStore) -> None:
    create(store, "a")
    with pytest.raises(RunRefused, match="exists already"):
        create(store, "a")
    assert counts(store) == {"queued": 1}


# ------------------------------------------------------------------------------------------ gone inputs


def test_a_run_on_a_missing_input_is_refused(store: RunStore, redis_client: redis.Redis) -> None:
    add_tokenizer(redis_client, "tok")
    with pytest.raises(InputGone) as gone:
        create(store, "a", corpus_id="nope", tokenizer_id="tok")
    assert gone.value.field == "corpus_id"
    add_corpus(redis_client, "corp")
    with pytest.raises(InputGone) as gone:
        create(store, "a", corpus_id="corp", tokenizer_id="nope")
    assert gone.value.field == "tokenizer_id"
    assert redis_client.exists(run_key("a")) == 0
    assert redis_client.exists(corpus_runs_key("corp")) == 0, "a refused run is in no index"
    assert counts(store) == {}


def test_a_tokenizer_that_has_not_completed_is_refused(store: RunStore, redis_client: redis.Redis) -> None:
    add_tokenizer(redis_client, "tok", completed=False)
    with pytest.raises(InputGone):
        create(store, "a", tokenizer_id="tok")


def test_retiring_refuses_inputs_in_use_then_blocks_new_runs(
    store: RunStore, redis_client: redis.Redis
) -> None:
    add_corpus(redis_client, "corp")
    add_tokenizer(redis_client, "tok")
    create(store, "a", corpus_id="corp", tokenizer_id="tok")
    assert store.retire_corpus("corp") == Retirement("in-use", active_runs=1)
    assert store.retire_tokenizer("tok") == Retirement("in-use", active_runs=1)
    # Nothing was retired: new runs may still use them.
    create(store, "b", corpus_id="corp", tokenizer_id="tok")
    for run_id in ("a", "b"):
        assert store.transition(run_id, ("queued",), "canceled", {"message": "canceled"})

    assert store.retire_corpus("corp") == Retirement("retired")
    assert store.retire_tokenizer("tok") == Retirement("retired")
    assert redis_client.hget(corpus_key("corp"), "retired") == b"1"
    with pytest.raises(InputGone, match="corpus_id"):
        create(store, "c", corpus_id="corp")
    with pytest.raises(InputGone, match="tokenizer_id"):
        create(store, "c", tokenizer_id="tok")
    assert store.retire_corpus("corp") == Retirement("retired"), "a delete that failed half-way retries"


def test_retiring_a_tokenizer_still_training_or_unknown(store: RunStore, redis_client: redis.Redis) -> None:
    add_tokenizer(redis_client, "tok", completed=False)
    assert store.retire_tokenizer("tok") == Retirement("busy", status="queued")
    assert store.retire_tokenizer("ghost") == Retirement("missing")
    assert store.retire_corpus("ghost") == Retirement("missing")
    assert store.retire_corpus("x:runs") == Retirement("missing")
    assert store.retire_tokenizer("x:runs") == Retirement("missing")


# ------------------------------------------------------------------------------------------ unsent runs


def test_a_run_never_confirmed_sent_fails_after_the_grace(store: RunStore, redis_client: redis.Redis) -> None:
    create(store, "lost", unsent_grace_s=0.2)
    create(store, "sent", unsent_grace_s=0.2)
    create(store, "claimed", unsent_grace_s=0.2)
    assert store.mark_sent("sent")
    assert not store.mark_sent("sent"), "confirmed once"
    assert store.claim("claimed", "w", 60, NOW)  # a worker got its task: it was sent
    assert redis_client.zrange(UNSENT_RUNS_KEY, 0, -1) == [run_key("lost").encode()]
    assert store.fail_unsent() == 0, "not yet"
    time.sleep(0.3)

    assert store.fail_unsent() == 1
    lost = store.get("lost")
    assert lost is not None
    assert (lost.status, lost.error_kind, lost.message) == ("failed", "system", NEVER_SENT_MESSAGE)
    assert lost.finished_at is not None
    assert abs(lost.finished_at - time.time()) < 5
    assert redis_client.ttl(run_key("lost")) > FINISHED_RUN_TTL_S - 10
    assert counts(store) == {"queued": 1, "running": 1, "failed": 1}
    assert members(redis_client, user_active_key(USER)) == {"sent", "claimed"}
    assert redis_client.zcard(UNSENT_RUNS_KEY) == 0


def test_creating_a_run_first_fails_the_late_unsent_ones(store: RunStore) -> None:
    """The cap check never counts a run whose task will never come."""
    create(store, "lost", unsent_grace_s=0.1)
    time.sleep(0.2)
    create(store, "next", user_cap=1)
    lost = store.get("lost")
    assert lost is not None
    assert lost.status == "failed"


def test_an_unsent_run_that_ended_otherwise_is_left_alone(store: RunStore) -> None:
    create(store, "a", unsent_grace_s=0.1)
    assert store.transition("a", ("queued",), "failed", {"message": "could not queue the run"})
    time.sleep(0.2)
    assert store.fail_unsent() == 0, "leaving queued took it off the watch"
    record = store.get("a")
    assert record is not None
    assert record.message == "could not queue the run"


def test_a_run_off_the_watch_but_still_listed_is_not_failed(
    store: RunStore, redis_client: redis.Redis
) -> None:
    create(store, "a")
    redis_client.zadd(UNSENT_RUNS_KEY, {run_key("a"): 0})
    assert store.claim("a", "w", 60, NOW)
    redis_client.zadd(UNSENT_RUNS_KEY, {run_key("a"): 0})  # as a late write would leave it
    assert store.fail_unsent() == 1
    record = store.get("a")
    assert record is not None
    assert record.status == "running"


# -------------------------------------------------------------------------------------- time trained


def test_time_trained_is_summed_over_attempts(store: RunStore, redis_client: redis.Redis) -> None:
    create(store, "a")
    assert store.claim("a", "w1", 60, NOW)
    record = store.get("a")
    assert record is not None
    assert (record.attempt_started_at, record.train_s) == (NOW, 0.0)
    assert store.hand_back("a", "shutdown", now=NOW + 30)
    store.release("a", "w1")
    assert store.claim("a", "w2", 60, NOW + 40)
    # w2 dies; its last heartbeat was 20 s into its attempt, and w3 takes over.
    assert store.renew("a", "w2", 60, NOW + 60)
    redis_client.delete(lease_key("a"))
    assert store.claim("a", "w3", 60, NOW + 200)
    assert store.finish("a", "completed", "completed", NOW + 210)
    record = store.get("a")
    assert record is not None
    assert record.train_s == pytest.approx(30 + 20 + 10)
    assert record.attempt_started_at is None


# ------------------------------------------------------------------------------------------------ delete


def test_delete_removes_a_finished_runs_keys_only(store: RunStore, redis_client: redis.Redis) -> None:
    create(store, "a")
    create(store, "b")
    assert store.claim("a", "w", 60, NOW)
    assert store.finish("a", "completed", "completed", NOW)
    redis_client.hset(evaluation_key("a"), "status", "completed")
    redis_client.xadd(run_log_key("a"), {"line": "epoch 1"})
    redis_client.xadd(run_events_key("a"), {"event": "{}"})
    record = store.get("a")
    queued = store.get("b")
    assert record is not None
    assert queued is not None

    assert store.delete(queued) == "queued"
    assert store.delete(record) == "deleted"
    assert store.delete(record) == "missing"
    for key in (run_key("a"), evaluation_key("a"), run_log_key("a"), run_events_key("a")):
        assert redis_client.exists(key) == 0, key
    assert redis_client.zrange(user_runs_key(USER), 0, -1) == [b"b"]
    assert counts(store) == {"queued": 1, "completed": 1}, "a total of runs that reached completed"


def test_ids_that_cannot_name_a_record(store: RunStore, redis_client: redis.Redis) -> None:
    create(store, "a")
    assert store.claim("a", "w", 60, NOW)  # the lease is a string key: `a:lease` must not reach it
    assert store.get("a:lease") is None
    assert store.request_cancel("a:lease") is None
    assert CorpusStore(redis_client).get("x:runs") is None
    assert is_record_id("0123abcdef" * 3)
    assert is_record_id("run-1.b_2")
    for bad in ("", "a:b", "a/b", "a b", "x" * 129, "é"):
        assert not is_record_id(bad), bad
