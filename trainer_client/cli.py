"""The `trainer` command: start the local stack, train, and follow runs from a terminal or a script."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from trainer_client import up
from trainer_client.client import ApiError, RunInfo, TrainerClient, TrainOrder, runs_ahead
from trainer_client.follow import follow_run

DEFAULT_API_URL = "http://127.0.0.1:8000"
# Exit statuses: a run that failed or was canceled, and a usage or API error (click's own for usage).
RUN_UNSUCCESSFUL = 1
USAGE_OR_API_ERROR = 2

# Text from the API and from processes is shown as it is, never read as rich markup.
stdout = Console(highlight=False, markup=False)
stderr = Console(stderr=True, highlight=False, markup=False)


class CannotStart(click.ClickException):
    """What `trainer up` needs and does not find: one line, and the status of a usage error."""

    exit_code = USAGE_OR_API_ERROR


class Commands(click.Group):
    """Every API error becomes one readable line with its code and request id, and exit status 2."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            hint = f" (is the API running at {ctx.params['api_url']}?)" if exc.status == 0 else ""
            stderr.print(f"error: {exc}{hint}", soft_wrap=True)
            ctx.exit(USAGE_OR_API_ERROR)


@click.group(cls=Commands)
@click.option(
    "--api-url",
    envvar="TRAINER_API_URL",
    default=DEFAULT_API_URL,
    show_default=True,
    help="The API's address.",
)
@click.option("--api-key", envvar="TRAINER_API_KEY", default=None, help="Sent as X-Api-Key.")
@click.version_option(package_name="trainer")
@click.pass_context
def cli(ctx: click.Context, api_url: str, api_key: str | None) -> None:
    """Train language models on the trainer service and follow them."""
    client = TrainerClient(api_url, api_key)
    ctx.call_on_close(client.close)
    ctx.obj = client


json_option = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")


@cli.command("up")
@click.argument("processes", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API and Flower bind to.")
@click.option("--port", envvar="PORT", default=8000, show_default=True, help="The API's port.")
@click.option("--flower-port", envvar="FLOWER_PORT", default=5555, show_default=True, help="Flower's port.")
@click.option(
    "--stream-port",
    envvar="STREAM_PORT",
    default=8001,
    show_default=True,
    help="The stream line's port: the API redirects followed streams and downloads there.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var"),
    show_default=True,
    help="The embedded Redis's data and Flower's state.",
)
def up_command(
    processes: tuple[str, ...], host: str, port: int, flower_port: int, stream_port: int, data_dir: Path
) -> None:
    """The whole local stack in this terminal: Redis (embedded unless REDIS_URL is set), the API, the
    workers, Flower, and the bot when DISCORD_TOKEN is set. PROCESSES names Procfile lines to start
    instead. Ctrl-C stops everything; when one process ends, the others are stopped and the status is 1."""
    options = up.Options(processes, host, port, flower_port, data_dir, stream_port)
    try:
        code = up.run(options, stdout)
    except up.UpError as exc:
        raise CannotStart(str(exc)) from exc
    raise SystemExit(code)


@cli.command()
@click.argument("corpus")
@click.option("--family", default="gpt2", show_default=True, help="Model family (see `trainer models`).")
@click.option("--size", default="small", show_default=True, help="Model size.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--seed", type=int, default=None, help="Random seed (the server's default: 1337).")
@click.option(
    "--test-fraction", type=click.FloatRange(0, 0.5), default=None, help="Share held out as a test split."
)
@click.option("--user", "user_id", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--queue", default=None, help='The queue that trains it (see `trainer queues`); default "training".'
)
@click.option(
    "--accelerator",
    type=click.Choice(["cpu", "gpu", "auto"]),
    default=None,
    help='What it trains on (the server\'s default: auto); "gpu" goes to the gpu queue unless --queue.',
)
@click.option("--devices", type=click.IntRange(min=1), default=None, help="Devices it trains on (1).")
@click.option("--follow", is_flag=True, help="Show a live progress bar until the run ends, then its results.")
@json_option
@click.pass_obj
def train(
    api: TrainerClient,
    corpus: str,
    family: str,
    size: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int | None,
    test_fraction: float | None,
    user_id: int,
    queue: str | None,
    accelerator: str | None,
    devices: int | None,
    follow: bool,
    as_json: bool,
) -> None:
    """Queue a training run on CORPUS: a local text file (uploaded first) when one exists at that path,
    else the name of a corpus on the server. With --follow, the exit status is the run's: 0 completed,
    1 failed or canceled; Ctrl-C asks whether to cancel the run (on a terminal) or only detaches (130)."""
    local = Path(corpus)
    corpus_id: str | None
    corpus_path: str | None
    if local.is_file():
        uploaded = api.upload_corpus(local.name, local.read_bytes())
        corpus_id, corpus_path = uploaded.corpus_id, None
        # On stderr: with --json, stdout is the API's answer alone.
        stderr.print(f"uploaded {local} as corpus {uploaded.corpus_id} ({uploaded.lines:,} lines)")
    else:
        corpus_id, corpus_path = api.corpus_named(corpus)
    order = TrainOrder(
        user_id=user_id,
        model_family=family,
        model_size=size,
        num_epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        corpus_id=corpus_id,
        corpus_path=corpus_path,
        seed=seed,
        test_fraction=test_fraction,
        queue=queue,
        accelerator=accelerator,
        devices=devices,
    )
    accepted = api.train(order)
    if as_json:
        _print_json({"run_id": accepted.run_id, "job_id": accepted.job_id})
    else:
        stdout.print(f"run {accepted.run_id} queued (job {accepted.job_id})")
    if follow:
        # With --json the bar and the outcome go to stderr: stdout stays the API's answer.
        console = stderr if as_json else stdout
        raise SystemExit(follow_run(api, accepted.run_id, console, _cancel_question(accepted.run_id)))
    if not as_json:
        stdout.print(f"follow it with: trainer logs {accepted.run_id} -f")


@cli.command()
@click.argument("run_id", metavar="RUN")
@json_option
@click.pass_obj
def status(api: TrainerClient, run_id: str, as_json: bool) -> None:
    """A run's status and results; the exit status is 1 for a run that failed or was canceled."""
    run = api.run(run_id)
    if as_json:
        _print_json(run.raw)
    else:
        stdout.print(_describe(run))
    raise SystemExit(_outcome(run))


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the run has finished.")
@click.option(
    "--tail", type=click.IntRange(min=1), default=200, show_default=True, help="Lines to show first."
)
@click.pass_obj
def logs(api: TrainerClient, run_id: str, follow: bool, tail: int) -> None:
    """What the worker logged for a run."""
    if not follow:
        click.echo(api.log_tail(run_id, tail), nl=False)
        return
    for line in api.follow_log(run_id, tail):
        click.echo(line)
    raise SystemExit(_outcome(api.run(run_id)))


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.pass_obj
def cancel(api: TrainerClient, run_id: str) -> None:
    """Ask a queued or running run to stop; it ends `canceled`."""
    api.cancel(run_id)
    stdout.print(f"cancellation of run {run_id} requested")


@cli.command()
@click.option(
    "--user", "user_id", type=click.IntRange(min=0), default=0, show_default=True, help="0: API callers."
)
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@json_option
@click.pass_obj
def runs(api: TrainerClient, user_id: int, limit: int, as_json: bool) -> None:
    """A user's runs, newest first."""
    found = api.runs(user_id, limit)
    if as_json:
        _print_json({"runs": [run.raw for run in found]})
        return
    table = Table("run", "status", "created", "loss", "message")
    for run in found:
        loss = "" if run.loss is None else f"{run.loss:.4f}"
        table.add_row(run.run_id, run.status, _when(run.created_at), loss, run.message)
    table.columns[0].no_wrap = True
    stdout.print(table)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("dest", required=False, type=click.Path(path_type=Path))
@click.pass_obj
def download(api: TrainerClient, run_id: str, dest: Path | None) -> None:
    """The run's model as one zip (unpacked, `from_pretrained` loads it) to DEST: a file, or a folder to
    hold model-RUN.zip (the current folder by default)."""
    target = dest or Path.cwd()
    if target.is_dir():
        target = target / f"model-{run_id}.zip"
    if not target.parent.is_dir():
        raise click.BadParameter(f"no folder {target.parent}", param_hint="DEST")
    # Written beside the target and renamed when whole: an interrupted download leaves no partial zip.
    partial = target.with_name(f".{target.name}.part")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    try:
        with (
            api.model_zip(run_id) as body,
            partial.open("wb") as out,
            Progress(*columns, console=stderr) as bar,
        ):
            task = bar.add_task(target.name, total=body.size)
            for chunk in body.chunks:
                out.write(chunk)
                bar.advance(task, len(chunk))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    stdout.print(f"saved {target} ({target.stat().st_size:,} bytes)")


@cli.command()
@json_option
@click.pass_obj
def queues(api: TrainerClient, as_json: bool) -> None:
    """The queues that have a live worker, with their workers and waiting tasks."""
    found = api.queues()
    if as_json:
        _print_json({"queues": [queue.raw for queue in found]})
        return
    table = Table("queue", "waiting", "workers")
    for queue in found:
        workers = ", ".join(
            f"{worker.hostname} ({worker.accelerator} x{worker.devices}, {worker.concurrency} at once)"
            for worker in queue.workers
        )
        table.add_row(queue.name, str(queue.length), workers)
    stdout.print(table)


@cli.command()
@json_option
@click.pass_obj
def models(api: TrainerClient, as_json: bool) -> None:
    """The model families and sizes the service trains."""
    catalog = api.models()
    if as_json:
        _print_json(catalog.raw)
        return
    table = Table("family", "size", "layers", "width", "heads", "parameters")
    for family in catalog.families:
        for size in family.sizes:
            default = family.family == catalog.default_family and size.size == catalog.default_size
            name = f"{size.size} (default)" if default else size.size
            table.add_row(
                family.family, name, str(size.n_layer), str(size.n_embd), str(size.n_head), f"{size.params:,}"
            )
    stdout.print(table)


def _cancel_question(run_id: str) -> Callable[[], bool] | None:
    """Asks on the terminal whether Ctrl-C should cancel the run; None when no one is there to answer."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None
    return lambda: click.confirm(f"\ncancel run {run_id}?", default=False)


def _outcome(run: RunInfo) -> int:
    return RUN_UNSUCCESSFUL if run.status in ("failed", "canceled") else 0


def _describe(run: RunInfo) -> Table:
    table = Table.grid(padding=(0, 2))
    rows = [
        ("run", run.run_id),
        ("status", run.status),
        ("user", str(run.user_id)),
        ("created", _when(run.created_at)),
        ("message", run.message),
        ("queue", run.queue or ""),
        ("place", "" if run.queue_position is None else runs_ahead(run.queue_position)),
        ("worker", run.worker or ""),
        ("loss", "" if run.loss is None else f"{run.loss:.4f}"),
        ("perplexity", "" if run.perplexity is None else f"{run.perplexity:.3f}"),
        ("error", run.error_kind or ""),
        ("artifacts", run.artifact_path or ""),
    ]
    for name, value in rows:
        if value:
            table.add_row(name, value)
    return table


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_json(payload: Mapping[object, object]) -> None:
    click.echo(json.dumps(payload, indent=2))


def main() -> None:
    """The console script."""
    cli(prog_name="trainer")
