"""Run events as Discord embeds with their buttons: what a user reads, and acts on, in their DMs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import nextcord

from schemas.events import (
    EvalCompleted,
    EvalFailed,
    TrainCompleted,
    TrainFailed,
    TrainProgress,
    TrainStarted,
    progress_fraction,
)

LOSS_CURVE = "loss_curve.png"
BAR_WIDTH = 20

QUEUED_COLOUR = nextcord.Colour.dark_grey()
STARTED_COLOUR = nextcord.Colour.blue()
PROGRESS_COLOUR = nextcord.Colour.blurple()
COMPLETED_COLOUR = nextcord.Colour.green()
FAILED_COLOUR = nextcord.Colour.red()
CANCELED_COLOUR = nextcord.Colour.light_grey()

# Every button of ours starts with this, so one handler finds them after any restart.
CUSTOM_ID_PREFIX = "trainer:"
Action = Literal["cancel", "evaluate", "retry"]
ACTIONS: tuple[Action, ...] = ("cancel", "evaluate", "retry")
Style = Literal["primary", "secondary", "danger"]

# What Discord refuses above (400, code 50035): per part, and all embed text together.
TITLE_MAX = 256
DESCRIPTION_MAX = 4096
FIELDS_MAX = 25
FIELD_NAME_MAX = 256
FIELD_VALUE_MAX = 1024
FOOTER_MAX = 2048
AUTHOR_MAX = 256
EMBED_TOTAL_MAX = 6000
CONTENT_MAX = 2000


@dataclass(frozen=True)
class Attachment:
    filename: str
    data: bytes


@dataclass(frozen=True)
class Button:
    """A button of a run's message; its custom_id says what it does to which run."""

    label: str
    action: Action
    run_id: str
    style: Style = "secondary"
    disabled: bool = False

    @property
    def custom_id(self) -> str:
        return f"{CUSTOM_ID_PREFIX}{self.action}:{self.run_id}"


def parse_custom_id(custom_id: str) -> tuple[Action, str] | None:
    """(action, run_id) of one of our buttons; None for anything else."""
    if not custom_id.startswith(CUSTOM_ID_PREFIX):
        return None
    name, _, run_id = custom_id[len(CUSTOM_ID_PREFIX) :].partition(":")
    for action in ACTIONS:
        if action == name and run_id:
            return action, run_id
    return None


def cancel_button(run_id: str, disabled: bool = False) -> Button:
    return Button("Cancel", "cancel", run_id, "danger", disabled)


def evaluate_button(run_id: str) -> Button:
    return Button("Evaluate on test split", "evaluate", run_id, "primary")


def retry_button(run_id: str) -> Button:
    return Button("Train again", "retry", run_id, "secondary")


@dataclass(frozen=True)
class DirectMessage:
    """One DM: an embed, at most one file that the embed may show as its image, and its buttons."""

    embed: nextcord.Embed
    attachment: Attachment | None = None
    buttons: tuple[Button, ...] = ()


@dataclass(frozen=True)
class QueuedRun:
    """What the live message says of a run before a worker picks it up."""

    run_id: str
    family: str
    size: str
    epochs: int
    batch_size: int
    learning_rate: float
    corpus: str
    test_fraction: float = 0.0
    queue: str | None = None
    # Where it stands when the message is written ("2 runs ahead of yours"), from GET /runs/{id}.
    place: str | None = None


def queued(run: QueuedRun) -> DirectMessage:
    embed = nextcord.Embed(
        title="Training queued",
        description=f"Run `{run.run_id}`: {run.family} {run.size}, waiting for a worker",
        colour=QUEUED_COLOUR,
    )
    embed.add_field(name="Epochs", value=str(run.epochs))
    embed.add_field(name="Batch size", value=str(run.batch_size))
    embed.add_field(name="Learning rate", value=f"{run.learning_rate:g}")
    if run.test_fraction:
        embed.add_field(name="Test split", value=f"{run.test_fraction:.0%}")
    if run.queue is not None:
        embed.add_field(name="Queue", value=f"{run.queue}: {run.place}" if run.place else run.queue)
    embed.add_field(name="Corpus", value=run.corpus, inline=False)
    return DirectMessage(embed, buttons=(cancel_button(run.run_id),))


def queued_again(run_id: str, from_run_id: str) -> DirectMessage:
    embed = nextcord.Embed(
        title="Training queued",
        description=f"Run `{run_id}`: the same request as run `{from_run_id}`, waiting for a worker",
        colour=QUEUED_COLOUR,
    )
    return DirectMessage(embed, buttons=(cancel_button(run_id),))


def started(event: TrainStarted) -> DirectMessage:
    embed = nextcord.Embed(
        title="Training started",
        description=f"Run `{event.run_id}`: {event.model_family} {event.model_size}",
        colour=STARTED_COLOUR,
    )
    embed.add_field(name="Epochs", value=str(event.total_epochs))
    embed.add_field(name="Queue", value=event.queue)
    if event.worker is not None:
        embed.add_field(name="Worker", value=event.worker)
    if event.batch_size is not None:
        embed.add_field(name="Batch size", value=str(event.batch_size))
    if event.learning_rate is not None:
        embed.add_field(name="Learning rate", value=f"{event.learning_rate:g}")
    resources = _resources(event)
    if resources:
        embed.add_field(name="Resources", value=resources, inline=False)
    return DirectMessage(embed, buttons=(cancel_button(event.run_id),))


def _resources(event: TrainStarted) -> str:
    parts = []
    if event.cpu_cores is not None:
        parts.append(f"{event.cpu_cores} CPU cores")
    if event.memory_mb is not None:
        parts.append(f"{event.memory_mb:,} MB memory")
    if event.optimal_threads is not None:
        parts.append(f"{event.optimal_threads} threads")
    return ", ".join(parts)


def progress(event: TrainProgress, started_ts: float | None = None) -> DirectMessage:
    fraction = progress_fraction(event, started_ts)
    embed = nextcord.Embed(
        title="Training in progress",
        description=f"Run `{event.run_id}`\n`{progress_bar(fraction)}`",
        colour=PROGRESS_COLOUR,
    )
    embed.add_field(name="Epoch", value=f"{event.epoch}/{event.total_epochs}")
    embed.add_field(name="Step", value=f"{event.step:,}")
    embed.add_field(name="Loss", value=f"{event.loss:.4f}")
    if event.val_loss is not None:
        embed.add_field(name="Validation loss", value=f"{event.val_loss:.4f}")
    if event.tokens_per_sec is not None:
        embed.add_field(name="Tokens/s", value=f"{event.tokens_per_sec:,.0f}")
    if event.eta_s is not None:
        embed.add_field(name="ETA", value=duration(event.eta_s))
    return DirectMessage(embed, buttons=(cancel_button(event.run_id),))


def ended(event: TrainCompleted | TrainFailed, last: DirectMessage | None) -> DirectMessage:
    """The live message once the run is over: its last state, marked ended, Cancel disabled."""
    if isinstance(event, TrainCompleted):
        title, colour = "Training completed", COMPLETED_COLOUR
    elif event.status == "canceled":
        title, colour = "Training canceled", CANCELED_COLOUR
    else:
        title, colour = "Training failed", FAILED_COLOUR
    if last is None:
        embed = nextcord.Embed(description=f"Run `{event.run_id}`")
    else:
        embed = nextcord.Embed.from_dict(last.embed.to_dict())
    embed.title = title
    embed.colour = colour
    embed.set_footer(text="The run has ended: the message below has the outcome.")
    return DirectMessage(embed, buttons=(cancel_button(event.run_id, disabled=True),))


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled) + f" {fraction:4.0%}"


def duration(seconds: float) -> str:
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


@dataclass(frozen=True)
class Download:
    """A signed link to the model's zip, and until when (Unix seconds) it works."""

    url: str
    expires_at: int


def completed(
    event: TrainCompleted,
    *,
    loss_curve: bytes | None,
    download: Download | None,
    test_split: bool = False,
) -> DirectMessage:
    embed = nextcord.Embed(
        title="Training completed", description=f"Run `{event.run_id}`", colour=COMPLETED_COLOUR
    )
    embed.add_field(name="Validation loss", value=f"{event.loss:.4f}")
    embed.add_field(name="Perplexity", value=f"{event.perplexity:.2f}")
    if event.params is not None:
        embed.add_field(name="Parameters", value=f"{event.params:,}")
    if event.duration_s is not None:
        embed.add_field(name="Duration", value=duration(event.duration_s))
    if event.sample:
        # A code block keeps the model's text as it is; clip() holds it to a field's limit.
        embed.add_field(name="Sample", value=f"```\n{event.sample}\n```", inline=False)
    if download is not None:
        # <t:...:f> shows the date and time in the reader's own time zone.
        embed.add_field(
            name="Download",
            value=f"[model.zip]({download.url}), works until <t:{download.expires_at}:f>",
            inline=False,
        )
    attachment = None
    if loss_curve:
        attachment = Attachment(LOSS_CURVE, loss_curve)
        embed.set_image(url=f"attachment://{LOSS_CURVE}")
    buttons = (evaluate_button(event.run_id),) if test_split else ()
    return DirectMessage(embed, attachment, (*buttons, retry_button(event.run_id)))


def failed(event: TrainFailed) -> DirectMessage:
    if event.status == "canceled":
        embed = nextcord.Embed(
            title="Training canceled",
            description=f"Run `{event.run_id}` was canceled.",
            colour=CANCELED_COLOUR,
        )
    else:
        who = "in the request" if event.error_kind == "user" else "on our side"
        embed = nextcord.Embed(
            title="Training failed",
            description=f"Run `{event.run_id}` failed: a problem {who}.",
            colour=FAILED_COLOUR,
        )
    embed.add_field(name="Message", value=event.message, inline=False)
    return DirectMessage(embed, buttons=(retry_button(event.run_id),))


def evaluated(event: EvalCompleted | EvalFailed) -> DirectMessage:
    if isinstance(event, EvalCompleted):
        embed = nextcord.Embed(
            title=f"Evaluation on the {event.split} split",
            description=f"Run `{event.run_id}`",
            colour=COMPLETED_COLOUR,
        )
        embed.add_field(name="Loss", value=f"{event.loss:.4f}")
        embed.add_field(name="Perplexity", value=f"{event.perplexity:.2f}")
    else:
        who = "in the request" if event.error_kind == "user" else "on our side"
        embed = nextcord.Embed(
            title=f"Evaluation on the {event.split} split failed",
            description=f"Run `{event.run_id}`: a problem {who}.",
            colour=FAILED_COLOUR,
        )
        embed.add_field(name="Message", value=event.message, inline=False)
    return DirectMessage(embed)


def clip(message: DirectMessage) -> DirectMessage:
    """The message held to Discord's embed limits: long texts end in an ellipsis, extra fields go."""
    data: dict[str, object] = dict(message.embed.to_dict())
    _clip_key(data, "title", TITLE_MAX)
    _clip_key(data, "description", DESCRIPTION_MAX)
    for part, limit in (("footer", FOOTER_MAX), ("author", AUTHOR_MAX)):
        inner = data.get(part)
        if isinstance(inner, dict):
            _clip_key(inner, "text" if part == "footer" else "name", limit)
    fields = data.get("fields")
    if isinstance(fields, list):
        del fields[FIELDS_MAX:]
        for item in fields:
            _clip_key(item, "name", FIELD_NAME_MAX)
            _clip_key(item, "value", FIELD_VALUE_MAX)
    return replace(message, embed=_fit_total(nextcord.Embed.from_dict(data)))


def clip_text(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    if text.endswith("```") and limit > 8:
        # Keep a code block closed, or the rest of the message would render as code.
        return text[: limit - 5] + "…\n```"
    return text[: limit - 1] + "…"


def _clip_key(data: object, key: str, limit: int) -> None:
    if isinstance(data, dict) and isinstance(data.get(key), str):
        data[key] = clip_text(data[key], limit)


def _fit_total(embed: nextcord.Embed) -> nextcord.Embed:
    """Fit all the text in 6,000 characters (len() of an embed counts what Discord counts): the last
    fields go first (the first say the most), then the description is shortened."""
    while embed.fields and len(embed) > EMBED_TOTAL_MAX:
        embed.remove_field(-1)
    over = len(embed) - EMBED_TOTAL_MAX
    if over > 0 and embed.description:
        embed.description = clip_text(embed.description, max(1, len(embed.description) - over))
    return embed
