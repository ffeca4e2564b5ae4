"""The bot with the API's corpora and artifact files: uploads, names, the loss curve through the API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from tests.bot_support import USER, serve_api
from tests.conftest import DispatchRecorder
from tests.test_bot_commands import harness
from trainer_client.client import ApiError, TrainerClient
from trainer_store.settings import Settings

CORPUS = b"the cat sat on the mat.\n" * 40


@pytest.fixture
def api_url(settings: Settings, redis_client: redis.Redis, dispatched: DispatchRecorder) -> Iterator[str]:
    with serve_api(settings, dispatched) as url:
        yield url


def test_a_corpus_is_uploaded_and_listed(api_url: str) -> None:
    api = TrainerClient(api_url)
    uploaded = api.upload_corpus("stories.txt", CORPUS)
    assert (uploaded.bytes, uploaded.lines) == (len(CORPUS), 40)
    assert uploaded.corpus_id in [corpus.corpus_id for corpus in api.corpora()]


def test_a_run_without_artifacts_has_no_loss_curve(api_url: str) -> None:
    with pytest.raises(ApiError) as error:
        TrainerClient(api_url).artifact("no-such-run", "loss_curve.png")
    assert error.value.status == 404
    with pytest.raises(ApiError):
        TrainerClient(api_url).artifact_files("no-such-run")


def test_train_model_uploads_an_attachment_or_finds_a_corpus_by_name(
    api_url: str, redis_url: str, dispatched: DispatchRecorder
) -> None:
    async def scenario() -> None:
        async with harness(api_url, redis_url) as h:
            h.fake.cdn["stories.txt"] = CORPUS
            attachment = {
                "id": "9",
                "filename": "stories.txt",
                "size": len(CORPUS),
                "url": f"{h.fake.base_url}/cdn/stories.txt",
                "proxy_url": "",
                "content_type": "text/plain; charset=utf-8",
            }
            reply = await h.use("train_model", corpus_file=attachment, size="tiny", epochs=2)
            assert reply.startswith("Training queued: run `")
            run_id = reply.split("`")[1]
            assert h.api.run(run_id).user_id == USER
            for name in ("stories.txt", "notes.txt"):  # an uploaded corpus; a file in the corpus root
                assert (await h.use("train_model", corpus_name=name)).startswith("Training queued")
            assert len(dispatched.sent) == 3

    asyncio.run(scenario())
