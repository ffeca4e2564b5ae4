"""A local stand-in for Discord's HTTP API, enough for nextcord's real HTTP client to talk to."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import nextcord
from aiohttp import web

BOT_USER: dict[str, object] = {
    "id": "1000",
    "username": "trainer",
    "discriminator": "0",
    "avatar": None,
    "bot": True,
}
APPLICATION_ID = 1000


@dataclass
class Recorded:
    method: str
    path: str
    body: dict[str, object]
    files: dict[str, bytes] = field(default_factory=dict)


# What Discord sends with a 429; nextcord reads these headers, and trusts a 429 only with a Via header.
RATE_LIMITED_HEADERS = {
    "Via": "1.1 google",
    "X-RateLimit-Limit": "5",
    "X-RateLimit-Remaining": "0",
    "X-RateLimit-Reset-After": "0.01",
    "X-RateLimit-Bucket": "dm-bucket",
    "X-RateLimit-Scope": "user",
}


def dm_channel_id(user_id: int) -> int:
    return 9_000_000 + user_id % 1_000_000


@dataclass
class Scripted:
    """An answer to give instead of the normal one, `times` times, to requests matching method and path."""

    method: str
    path_contains: str
    status: int
    body: dict[str, object]
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1


class FakeDiscord:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.messages: dict[int, Recorded] = {}
        self.cdn: dict[str, bytes] = {}
        self.scripted: list[Scripted] = []
        self._ids = itertools.count(5000)
        self.base_url = ""
        self.commands: dict[str, dict[str, object]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/cdn/{name}", self._cdn)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._api)
        return app

    async def _cdn(self, request: web.Request) -> web.Response:
        data = self.cdn.get(request.match_info["name"])
        return web.Response(body=data) if data is not None else web.Response(status=404)

    async def _api(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        body, files = await _read_body(request)
        recorded = Recorded(request.method, path, body, files)
        self.requests.append(recorded)
        for script in self.scripted:
            if script.times > 0 and script.method == request.method and script.path_contains in path:
                script.times -= 1
                return _json(script.body, script.status, script.headers)
        return self._answer(recorded)

    def _answer(self, recorded: Recorded) -> web.Response:
        method, parts = recorded.method, recorded.path.strip("/").split("/")
        if (method, recorded.path) == ("GET", "/users/@me"):
            return _json(BOT_USER)
        if (method, recorded.path) == ("POST", "/users/@me/channels"):
            user_id = str(recorded.body["recipient_id"])
            recipient: dict[str, object] = {**BOT_USER, "id": user_id, "bot": False}
            return _json({"id": str(dm_channel_id(int(user_id))), "type": 1, "recipients": [recipient]})
        if method == "POST" and parts[0] == "channels" and parts[2:] == ["messages"]:
            message_id = next(self._ids)
            self.messages[message_id] = recorded
            return _json(message_payload(message_id, int(parts[1]), recorded))
        if method == "PATCH" and parts[0] == "channels" and len(parts) == 4:
            message_id = int(parts[3])
            if message_id not in self.messages:
                return _json({"code": 10008, "message": "Unknown Message"}, 404)
            self.messages[message_id] = recorded
            return _json(message_payload(message_id, int(parts[1]), recorded))
        if parts[0] == "applications" and parts[2:] == ["commands"]:
            return self._commands(recorded)
        if method == "POST" and parts[0] == "interactions":
            return web.Response(status=204)
        if parts[0] == "webhooks":
            return _json(message_payload(next(self._ids), 1, recorded))
        return _json({"code": 0, "message": "not in this fake"}, 404)

    def _commands(self, recorded: Recorded) -> web.Response:
        """Application commands: listed, and registered one by one as a bot does on connect."""
        if recorded.method == "GET":
            return _json_list(list(self.commands.values()))
        name = str(recorded.body["name"])
        registered = {
            "type": 1,
            "description": "",
            "options": [],
            **recorded.body,
            "id": str(next(self._ids)),
            "application_id": str(APPLICATION_ID),
            "version": "1",
        }
        self.commands[name] = registered
        return _json(registered)

    def command_id(self, name: str) -> str:
        return str(self.commands[name]["id"])

    # What the tests look at.
    def of(self, method: str, path_contains: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and path_contains in r.path]

    def sent_embeds(self) -> list[dict[str, object]]:
        """The first embed of every message created, in order."""
        return [first_embed(r) for r in self.of("POST", "/messages")]

    def followups(self) -> list[str]:
        return [str(r.body.get("content")) for r in self.of("POST", "/webhooks/")]


def first_embed(recorded: Recorded) -> dict[str, object]:
    embeds = recorded.body.get("embeds")
    assert isinstance(embeds, list)
    assert embeds
    embed = embeds[0]
    assert isinstance(embed, dict)
    return {str(key): value for key, value in embed.items()}


def field_values(embed: dict[str, object]) -> dict[str, str]:
    fields = embed.get("fields", [])
    assert isinstance(fields, list)
    return {str(f["name"]): str(f["value"]) for f in fields if isinstance(f, dict)}


async def _read_body(request: web.Request) -> tuple[dict[str, object], dict[str, bytes]]:
    if request.content_type == "multipart/form-data":
        form = await request.post()
        files = {}
        for value in form.values():
            if isinstance(value, web.FileField):
                files[value.filename] = value.file.read()
        payload = form.get("payload_json")
        loaded: object = json.loads(str(payload)) if payload is not None else {}
        return _object(loaded), files
    raw = await request.read()
    return (_object(json.loads(raw)) if raw else {}), {}


def _object(value: object) -> dict[str, object]:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _json(body: dict[str, object], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # nextcord parses a body as JSON only when the content type is exactly application/json.
    # (aiohttp's content_type= would add "; charset=utf-8").
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        headers={**(headers or {}), "Content-Type": "application/json"},
    )


def _json_list(items: list[dict[str, object]]) -> web.Response:
    return web.Response(body=json.dumps(items).encode(), headers={"Content-Type": "application/json"})


def message_payload(message_id: int, channel_id: int, recorded: Recorded) -> dict[str, object]:
    attachments = [
        {"id": str(index + 1), "filename": name, "size": len(data), "url": "", "proxy_url": ""}
        for index, (name, data) in enumerate(recorded.files.items())
    ]
    return {
        "id": str(message_id),
        "channel_id": str(channel_id),
        "type": 0,
        "content": recorded.body.get("content") or "",
        "author": BOT_USER,
        "embeds": recorded.body.get("embeds") or [],
        "attachments": attachments,
        "mentions": [],
        "mention_roles": [],
        "pinned": False,
        "mention_everyone": False,
        "tts": False,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "edited_timestamp": None,
        "flags": 0,
    }


@asynccontextmanager
async def fake_discord() -> AsyncIterator[tuple[FakeDiscord, nextcord.Client]]:
    """The fake on a free port, and a nextcord client logged in to it (HTTP only, no gateway)."""
    fake = FakeDiscord()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.base_url = f"http://127.0.0.1:{port}"
    saved = nextcord.http.Route.BASE
    nextcord.http.Route.BASE = f"{fake.base_url}/api/v10"
    # The application id comes with the gateway's READY in production; this fake has no gateway.
    client = nextcord.Client(intents=nextcord.Intents.default(), application_id=APPLICATION_ID)
    try:
        await client.login("fake-token")
        yield fake, client
    finally:
        await client.close()
        nextcord.http.Route.BASE = saved
        await runner.cleanup()
