"""Run events as Discord embeds: what a user reads in their direct messages."""

from __future__ import annotations

from dataclasses import dataclass

import nextcord

from schemas.events import TrainCompleted, TrainFailed, TrainProgress, TrainStarted

LOSS_CURVE = "loss_curve.png"
BAR_WIDTH = 20

STARTED_COLOUR = nextcord.Colour.blue()
PROGRESS_COLOUR = nextcord.Colour.blurple()
COMPLETED_COLOUR = nextcord.Colour.green()
FAILED_COLOUR = nextcord.Colour.red()
CANCELED_COLOUR = nextcord.Colour.light_grey()


@dataclass(frozen=True)
class Attachment:
    filename: str
    data: bytes


@dataclass(frozen=True)
class DirectMessage:
    """One DM: an embed, and at most one file that the embed may show as its image."""

    embed: nextcord.Embed
    attachment: Attachment | None = None


def started(event: TrainStarted) -> DirectMessage:
    embed = nextcord.Embed(
        title="Training started",
        description=f"Run `{event.run_id}`: {event.model_family} {event.model_size}",
        colour=STARTED_COLOUR,
    )
    embed.add_field(name="Epochs", value=str(event.total_epochs))
    embed.add_field(name="Queue", value=event.queue)
    if event.batch_size is not None:
        embed.add_field(name="Batch size", value=str(event.batch_size))
    if event.learning_rate is not None:
        embed.add_field(name="Learning rate", value=f"{event.learning_rate:g}")
    resources = _resources(event)
    if resources:
        embed.add_field(name="Resources", value=resources, inline=False)
    return DirectMessage(embed)


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
    return DirectMessage(embed)


def progress_fraction(event: TrainProgress, started_ts: float | None) -> float:
    """Time done over time done plus time left when the worker gives an ETA; else finished epochs."""
    if event.eta_s is not None and event.ts is not None and started_ts is not None:
        elapsed = max(0.0, event.ts - started_ts)
        total = elapsed + max(0.0, event.eta_s)
        return elapsed / total if total > 0 else 0.0
    return (event.epoch - 1) / event.total_epochs if event.total_epochs > 0 else 0.0


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


def completed(event: TrainCompleted, *, loss_curve: bytes | None, download_url: str | None) -> DirectMessage:
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
        # Field values hold at most 1,024 characters; a code block keeps the model's text as it is.
        embed.add_field(name="Sample", value=f"```\n{_clip(event.sample, 1000)}\n```", inline=False)
    if download_url:
        embed.add_field(name="Download", value=f"[model files]({download_url})", inline=False)
    attachment = None
    if loss_curve:
        attachment = Attachment(LOSS_CURVE, loss_curve)
        embed.set_image(url=f"attachment://{LOSS_CURVE}")
    return DirectMessage(embed, attachment)


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
    embed.add_field(name="Message", value=_clip(event.message, 1000), inline=False)
    return DirectMessage(embed)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
