"""Uploaded corpora: their records in Redis; the text itself lives under the corpus root."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from trainer_store.records import decoded, is_record_id, text

# Kept until deleted through the API.
CORPUS_INDEX = "trainer:corpora"
UPLOADS_FOLDER = "uploads"


def corpus_key(corpus_id: str) -> str:
    return f"trainer:corpora:{corpus_id}"


@dataclass(frozen=True)
class CorpusRecord:
    corpus_id: str
    name: str
    bytes: int
    lines: int
    created_at: float
    path: str


class CorpusStore:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def add(self, record: CorpusRecord) -> None:
        pipe = self._redis.pipeline()
        pipe.hset(
            corpus_key(record.corpus_id),
            mapping={
                "corpus_id": record.corpus_id,
                "name": record.name,
                "bytes": record.bytes,
                "lines": record.lines,
                "created_at": record.created_at,
                "path": record.path,
            },
        )
        pipe.zadd(CORPUS_INDEX, {record.corpus_id: record.created_at})
        pipe.execute()

    def get(self, corpus_id: str) -> CorpusRecord | None:
        if not is_record_id(corpus_id):
            return None
        raw = decoded(self._redis.hgetall(corpus_key(corpus_id)))
        if not raw:
            return None
        return CorpusRecord(
            corpus_id=raw["corpus_id"],
            name=raw["name"],
            bytes=int(raw["bytes"]),
            lines=int(raw["lines"]),
            created_at=float(raw["created_at"]),
            path=raw["path"],
        )

    def list(self) -> list[CorpusRecord]:
        """Newest first."""
        ids = self._redis.zrevrange(CORPUS_INDEX, 0, -1)
        found = (self.get(text(corpus_id)) for corpus_id in ids)
        return [record for record in found if record is not None]

    def delete(self, corpus_id: str) -> bool:
        pipe = self._redis.pipeline()
        pipe.delete(corpus_key(corpus_id))
        pipe.zrem(CORPUS_INDEX, corpus_id)
        deleted, _ = pipe.execute()
        return bool(deleted)
