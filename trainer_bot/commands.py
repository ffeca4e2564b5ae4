"""Slash commands: /train_model, /train_status, /train_cancel, /train_runs, each answered privately."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import nextcord

from schemas.queues import LIGHT_QUEUE, TRAINING_QUEUE
from trainer_bot import embeds
from trainer_bot.live import LiveMessages
from trainer_client.client import (
    ApiError,
    ModelCatalog,
    QueueInfo,
    RunInfo,
    TrainerClient,
    TrainOrder,
    runs_ahead,
)

log = logging.getLogger(__name__)

# Discord lets a bot read attachments up to 25 MiB; a corpus above this is refused before downloading it.
MAX_CORPUS_BYTES = 10 * 1024 * 1024
TEXT_SUFFIXES = (".txt", ".text", ".md")
RUNS_SHOWN = 10


class RateLimiter:
    """At most one call per `interval_s` per user; the clock is injected so tests need no sleeps."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[int, float] = {}

    def wait_s(self, user_id: int) -> float:
        """0 when the call may go ahead (and it is counted); else the seconds left to wait."""
        now = self._clock()
        last = self._last.get(user_id)
        if last is not None and now - last < self._interval_s:
            return last + self._interval_s - now
        self._last[user_id] = now
        return 0.0


@dataclass(frozen=True)
class CorpusFile:
    """A Discord attachment offered as the corpus, read only once it passes the checks."""

    filename: str
    content_type: str | None
    size: int
    read: Callable[[], Awaitable[bytes]]

    def problem(self) -> str | None:
        is_text = (self.content_type or "").startswith("text/") or self.filename.lower().endswith(
            TEXT_SUFFIXES
        )
        if not is_text:
            return f"`{self.filename}` is not a text file; attach a .txt file."
        if self.size > MAX_CORPUS_BYTES:
            return f"`{self.filename}` is {self.size:,} bytes; the limit is {MAX_CORPUS_BYTES:,}."
        return None


@dataclass(frozen=True)
class TrainOptions:
    family: str
    size: str
    epochs: int
    batch_size: int
    learning_rate: float
    corpus_file: CorpusFile | None = None
    corpus_name: str | None = None
    test_fraction: float = 0.0
    queue: str | None = None  # None: the API's default for the accelerator
    accelerator: str = "auto"
    devices: int = 1


class Commands:
    """What each command does, apart from Discord: the caller's id and plain values in, reply text out."""

    def __init__(self, api: TrainerClient, limiter: RateLimiter, live: LiveMessages) -> None:
        self._api = api
        self._limiter = limiter
        self._live = live

    async def train(self, user_id: int, options: TrainOptions, request_key: str | None = None) -> str:
        """Queue a run and open its live message; `request_key` (the interaction id) makes a retried
        request to the API answer the run it created the first time."""
        wait = self._limiter.wait_s(user_id)
        if wait > 0:
            return f"Easy there: one training request every few seconds. Try again in {wait:.0f} s."
        if (options.corpus_file is None) == (options.corpus_name is None):
            return (
                "Give the corpus either as a text-file attachment or as the name of a corpus on the server."
            )
        corpus_id, corpus_path = None, None
        if options.corpus_file is not None:
            problem = options.corpus_file.problem()
            if problem:
                return problem
            data = await options.corpus_file.read()
            uploaded = await asyncio.to_thread(
                self._api.upload_corpus, options.corpus_file.filename, data, request_key
            )
            corpus_id = uploaded.corpus_id
        else:
            assert options.corpus_name is not None  # exactly one of the two is set (checked above)
            corpus_id, corpus_path = await asyncio.to_thread(self._api.corpus_named, options.corpus_name)
        order = TrainOrder(
            user_id=user_id,
            model_family=options.family,
            model_size=options.size,
            num_epochs=options.epochs,
            batch_size=options.batch_size,
            learning_rate=options.learning_rate,
            corpus_id=corpus_id,
            corpus_path=corpus_path,
            test_fraction=options.test_fraction,
            queue=options.queue,
            accelerator=options.accelerator,
            devices=options.devices,
        )
        accepted = await asyncio.to_thread(self._api.train, order, request_key)
        corpus = options.corpus_file.filename if options.corpus_file else str(options.corpus_name)
        await self.open_live(user_id, accepted.run_id, order, corpus)
        return (
            f"Training queued: run `{accepted.run_id}` (job `{accepted.job_id}`). "
            "Its live message in your direct messages follows it, with a button to cancel it."
        )

    async def open_live(self, user_id: int, run_id: str, order: TrainOrder, corpus: str) -> None:
        test_fraction = order.test_fraction or 0.0
        run = await asyncio.to_thread(self._api.run, run_id)
        queued = embeds.QueuedRun(
            run_id=run_id,
            family=order.model_family,
            size=order.model_size,
            epochs=order.num_epochs,
            batch_size=order.batch_size,
            learning_rate=order.learning_rate,
            corpus=corpus,
            test_fraction=test_fraction,
            queue=run.queue,
            place=None if run.queue_position is None else runs_ahead(run.queue_position),
        )
        await self._live.open(user_id, run_id, embeds.queued(queued), test_split=test_fraction > 0)

    async def status(self, user_id: int, run_id: str) -> str:
        run = await self._own_run(user_id, run_id)
        if run is None:
            return _not_yours(run_id)
        return describe(run)

    async def cancel(self, user_id: int, run_id: str) -> str:
        run = await self._own_run(user_id, run_id)
        if run is None:
            return _not_yours(run_id)
        # A run that has already ended answers 409, whose message says so.
        await asyncio.to_thread(self._api.cancel, run_id)
        return f"Cancellation requested for run `{run_id}`; it stops within a few seconds."

    async def runs(self, user_id: int) -> str:
        found = await asyncio.to_thread(self._api.runs, user_id, RUNS_SHOWN)
        if not found:
            return "You have no training runs yet. Start one with /train_model."
        return "Your latest runs:\n" + "\n".join(describe(run) for run in found)

    async def _own_run(self, user_id: int, run_id: str) -> RunInfo | None:
        """The run when it is the caller's; someone else's run reads as unknown, so ids reveal nothing."""
        try:
            run = await asyncio.to_thread(self._api.run, run_id)
        except ApiError as exc:
            if exc.code != "NOT_FOUND":
                raise
            return None
        return run if run.user_id == user_id else None


def _not_yours(run_id: str) -> str:
    return f"You have no run `{run_id}`. /train_runs lists yours."


def describe(run: RunInfo) -> str:
    # <t:...:R> is Discord's relative time ("3 minutes ago") in the reader's own locale.
    line = f"`{run.run_id}`: **{run.status}**, started <t:{int(run.created_at)}:R>"
    if run.status == "queued" and run.queue_position is not None:
        line += f", {runs_ahead(run.queue_position)} on queue `{run.queue}`"
    if run.loss is not None and run.perplexity is not None:
        line += f", loss {run.loss:.4f}, perplexity {run.perplexity:.2f}"
    if run.status in ("failed", "canceled") and run.message:
        line += f": {run.message}"
    return line


def api_error_text(error: ApiError) -> str:
    """A short message with the request_id that finds the details in the server log, never a traceback."""
    if error.code == "UNREACHABLE":
        summary = "The training service is not answering right now; try again in a minute."
    else:
        summary = f"The training service answered {error.code}: {error.message}"
    return f"{summary} (request_id `{error.request_id or 'none'}`)"


async def answer(
    interaction: nextcord.Interaction[nextcord.Client], work: Callable[[], Awaitable[str]]
) -> None:
    """Defer at once (Discord waits 3 s at most), then reply privately with the outcome."""
    await interaction.response.defer(ephemeral=True)
    try:
        text = await work()
    except ApiError as exc:
        text = api_error_text(exc)
    except Exception:
        log.exception("command %s failed", interaction.application_command)
        text = failure_text()
    await interaction.followup.send(text, ephemeral=True)


def failure_text() -> str:
    return f"Something went wrong on our side at {datetime.now(UTC):%H:%M:%S} UTC; please try again."


def caller_id(interaction: nextcord.Interaction[nextcord.Client]) -> int:
    user = interaction.user
    assert user is not None  # Discord always says who used a slash command
    return user.id


def register_commands(
    bot: nextcord.Client, commands: Commands, catalog: ModelCatalog, queues: list[QueueInfo]
) -> None:
    """The slash commands, with model families and sizes offered as choices from GET /models, and the
    training queues that had a live worker at start-up from GET /queues.

    Made with the client's slash_command decorator: nextcord adds those again on every connect (READY
    clears the commands added any other way), then registers them with Discord.
    """
    families = [family.family for family in catalog.families]
    sizes = sorted({size.size for family in catalog.families for size in family.sizes})
    training_queues = sorted({queue.name for queue in queues} - {LIGHT_QUEUE}) or [TRAINING_QUEUE]

    async def train_model(
        interaction: nextcord.Interaction[nextcord.Client],
        family: str = nextcord.SlashOption(
            description="Model family", choices=families, required=False, default=catalog.default_family
        ),
        size: str = nextcord.SlashOption(
            description="Model size", choices=sizes, required=False, default=catalog.default_size
        ),
        epochs: int = nextcord.SlashOption(
            description="Passes over the corpus", min_value=1, max_value=100, required=False, default=1
        ),
        batch_size: int = nextcord.SlashOption(
            description="Sequences per step", min_value=1, max_value=512, required=False, default=16
        ),
        learning_rate: float = nextcord.SlashOption(
            description="Optimizer step size", min_value=1e-6, max_value=1.0, required=False, default=1e-3
        ),
        corpus_file: nextcord.Attachment | None = nextcord.SlashOption(
            description="The corpus as a text file", required=False, default=None
        ),
        corpus_name: str | None = nextcord.SlashOption(
            description="The name of a corpus already on the server", required=False, default=None
        ),
        test_fraction: float = nextcord.SlashOption(
            description="Share kept apart for 'Evaluate on test split' (0 for none)",
            min_value=0.0,
            max_value=0.45,
            required=False,
            default=0.0,
        ),
        queue: str | None = nextcord.SlashOption(
            description="The queue that trains it (default: training, or gpu for a GPU)",
            choices=training_queues,
            required=False,
            default=None,
        ),
        accelerator: str = nextcord.SlashOption(
            description="What it trains on", choices=["auto", "cpu", "gpu"], required=False, default="auto"
        ),
        devices: int = nextcord.SlashOption(
            description="Devices it trains on", min_value=1, max_value=64, required=False, default=1
        ),
    ) -> None:
        options = TrainOptions(
            family=family,
            size=size,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            corpus_file=_corpus_file(corpus_file),
            corpus_name=corpus_name,
            test_fraction=test_fraction,
            queue=queue,
            accelerator=accelerator,
            devices=devices,
        )
        key = str(interaction.id)
        await answer(interaction, lambda: commands.train(caller_id(interaction), options, key))

    async def train_status(
        interaction: nextcord.Interaction[nextcord.Client],
        run_id: str = nextcord.SlashOption(description="The run's id, from /train_model or /train_runs"),
    ) -> None:
        await answer(interaction, lambda: commands.status(caller_id(interaction), run_id))

    async def train_cancel(
        interaction: nextcord.Interaction[nextcord.Client],
        run_id: str = nextcord.SlashOption(description="The run's id, from /train_model or /train_runs"),
    ) -> None:
        await answer(interaction, lambda: commands.cancel(caller_id(interaction), run_id))

    async def train_runs(interaction: nextcord.Interaction[nextcord.Client]) -> None:
        await answer(interaction, lambda: commands.runs(caller_id(interaction)))

    bot.slash_command(name="train_model", description="Train a language model on a corpus")(train_model)
    bot.slash_command(name="train_status", description="The status of one of your runs")(train_status)
    bot.slash_command(name="train_cancel", description="Cancel one of your runs")(train_cancel)
    bot.slash_command(name="train_runs", description="Your latest training runs")(train_runs)


def _corpus_file(attachment: nextcord.Attachment | None) -> CorpusFile | None:
    if attachment is None:
        return None
    return CorpusFile(
        filename=attachment.filename,
        content_type=attachment.content_type,
        size=attachment.size,
        read=attachment.read,
    )
