"""`GET /metrics` for Prometheus: HTTP traffic, runs by status, queue lengths and the processes' counters."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

import redis
from flask import Flask, Response, g, request
from flask_smorest import Blueprint
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

import celeryconfig
from schemas.queues import PRIORITY_STEPS, broker_lists
from schemas.status import ACTIVE_STATUSES, TERMINAL_STATUSES
from trainer_api.services import services
from trainer_store.metrics import COUNTERS, METRICS_KEY
from trainer_store.runs import RUN_STATS_KEY
from trainer_store.workers import WorkerRegistry

blp = Blueprint("metrics", __name__, description="Prometheus metrics")

METRICS_PATH = "/metrics"
# Set by the gunicorn configuration (gunicornconfig.py) before prometheus_client is imported: every
# worker process then writes its samples to files there, and any worker's scrape adds them all up.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED_ROUTE = "<unmatched>"
TEXT_RESPONSE = {
    "200": {
        "description": "The Prometheus text exposition format.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}
# Registered with no registry: a scrape collects them into its own (or from the worker files).
REQUESTS = Counter(
    "trainer_http_requests",
    "HTTP requests answered, by method, route (the URL rule) and status",
    ["method", "route", "status"],
    registry=None,
)
LATENCY = Histogram(
    "trainer_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route",
    ["method", "route"],
    registry=None,
)
_DESCRIPTIONS: Mapping[str, str] = {
    "events_published": "Events the workers published on trainer:events",
    "bot_dms_sent": "Direct messages the bot sent",
    "bot_dms_refused": "Direct messages a user's settings refused (not retried)",
    "bot_dms_parked": "Events the bot parked after repeated failures",
}


def queues() -> tuple[str, ...]:
    """Every Celery queue the configuration routes a task to; each is a Redis list on the broker."""
    routed = {route["queue"] for route in celeryconfig.task_routes.values()}
    return tuple(sorted(routed | {celeryconfig.task_default_queue}))


class RedisSeries:
    """Series read from Redis at each scrape; an unreachable Redis reads as `trainer_redis_up 0`."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("trainer_redis_up", "Whether Redis answered this scrape")
        try:
            # The configured queues, and any other a live worker consumes (a gpu queue, an operator's own).
            names = tuple(sorted({*queues(), *WorkerRegistry(self._redis).live_queues(time.time())}))
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(RUN_STATS_KEY)
            pipe.hgetall(METRICS_KEY)
            for queue in names:
                for name in broker_lists(queue):
                    pipe.llen(name)
            stats, counters, *lengths = pipe.execute()
        except redis.RedisError:
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        # Queued and running are exact counts; finished records expire, so the final statuses are totals.
        runs = GaugeMetricFamily("trainer_runs", "Runs now queued or running", labels=["status"])
        finished = CounterMetricFamily(
            "trainer_runs_finished", "Runs that ended, by status", labels=["status"]
        )
        run_counts = _numbers(stats)
        for status in ACTIVE_STATUSES:
            runs.add_metric([status], run_counts.get(status, 0))
        for ended in sorted(TERMINAL_STATUSES):
            finished.add_metric([ended], run_counts.get(ended, 0))
        waiting = GaugeMetricFamily("trainer_queue_length", "Tasks waiting in each queue", labels=["queue"])
        steps = len(PRIORITY_STEPS)
        for index, queue in enumerate(names):
            waiting.add_metric([queue], float(sum(lengths[index * steps : (index + 1) * steps])))
        totals = _numbers(counters)
        kept = [
            CounterMetricFamily(f"trainer_{name}", _DESCRIPTIONS[name], value=totals.get(name, 0))
            for name in COUNTERS
        ]
        return [up, runs, finished, waiting, *kept]


def _numbers(raw: dict[bytes, bytes]) -> dict[str, float]:
    """A Redis hash of counts, as numbers by field name."""
    return {name.decode(): float(value) for name, value in raw.items()}


@blp.route(METRICS_PATH)
@blp.doc(responses=TEXT_RESPONSE)
def metrics() -> Response:
    """The service's metrics: the API key, or the bearer token SECURITY__METRICS_TOKEN when set."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        registry.register(REQUESTS)
        registry.register(LATENCY)
    registry.register(RedisSeries(services().redis))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def start_timer() -> None:
    g.metrics_started = time.perf_counter()


def observe(response: Response) -> Response:
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    LATENCY.labels(request.method, route).observe(time.perf_counter() - g.metrics_started)
    REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    return response


def install(app: Flask) -> None:
    """Time every request, registered before anything that may answer early (the API-key check)."""
    app.before_request(start_timer)
    app.after_request(observe)
