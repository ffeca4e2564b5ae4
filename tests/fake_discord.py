"""A local Discord for the bot's tests: the gateway (a websocket) and REST, refusing what Discord refuses.

The gateway speaks what nextcord's client speaks: HELLO, IDENTIFY answered with READY (application id,
session id, resume URL) and one GUILD_CREATE, heartbeats acknowledged, op 7 RECONNECT then RESUME with
the missed events replayed, and INTERACTION_CREATE. REST keeps messages, DM channels and application
commands, and answers as Discord does to an embed over its limits (400, code 50035), an interaction
answered after its deadline (404, code 10062), and a rate-limit bucket used up (429 with retry_after and
the X-RateLimit-* headers), counting each route's bucket and the global one from the real traffic.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import nextcord
from aiohttp import WSMsgType, web

TOKEN = "fake-token"
APPLICATION_ID = 1000
GUILD_ID = 7000
BOT_USER: dict[str, object] = {
    "id": str(APPLICATION_ID),
    "username": "trainer",
    "discriminator": "0",
    "avatar": None,
    "bot": True,
}
# Interaction answers and webhook follow-ups are not counted against the global limit.
OUTSIDE_GLOBAL = ("interactions", "webhooks")
FOLLOWUP_LIFETIME_S = 15 * 60
EMBED_LIMITS = {"title": 256, "description": 4096, "footer": 2048, "author": 256}
FIELD_NAME_MAX, FIELD_VALUE_MAX, FIELDS_MAX, EMBED_TOTAL_MAX, CONTENT_MAX = 256, 1024, 25, 6000, 2000
# What Discord sends with a 429; nextcord reads these headers, and trusts a 429 only with a Via header.
RATE_LIMITED_HEADERS = {
    "Via": "1.1 google",
    "X-RateLimit-Limit": "5",
    "X-RateLimit-Remaining": "0",
    "X-RateLimit-Reset-After": "0.01",
    "X-RateLimit-Bucket": "dm-bucket",
    "X-RateLimit-Scope": "user",
}


@dataclass(frozen=True)
class Limits:
    """Discord's figures by default; a loaded test machine may take a longer interaction deadline."""

    interaction_deadline_s: float = 3.0
    route_limit: int = 5
    route_window_s: float = 5.0
    global_limit: int = 50
    global_window_s: float = 1.0
    heartbeat_interval_ms: int = 41_250


@dataclass
class Recorded:
    method: str
    path: str
    body: dict[str, object]
    files: dict[str, bytes] = field(default_factory=dict)
    status: int = 0


@dataclass
class Scripted:
    """An answer to give instead of the normal one, `times` times, to requests matching method and path."""

    method: str
    path_contains: str
    status: int
    body: dict[str, object]
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1


@dataclass
class _Bucket:
    limit: int
    window_s: float
    used: int = 0
    resets_at: float = 0.0


@dataclass
class _Interaction:
    token: str
    created: float
    acknowledged: bool = False


@dataclass
class _Session:
    session_id: str
    seq: int = 0
    sent: list[dict[str, object]] = field(default_factory=list)
    socket: _Socket | None = None


class _Socket:
    """One gateway connection; with compress=zlib-stream every frame is part of one zlib stream."""

    def __init__(self, ws: web.WebSocketResponse, compressed: bool) -> None:
        self.ws = ws
        self._zlib = zlib.compressobj() if compressed else None

    async def send(self, frame: dict[str, object]) -> None:
        text = json.dumps(frame)
        if self._zlib is None:
            await self.ws.send_str(text)
        else:
            await self.ws.send_bytes(self._zlib.compress(text.encode()) + self._zlib.flush(zlib.Z_SYNC_FLUSH))


def dm_channel_id(user_id: int) -> int:
    return 9_000_000 + user_id % 1_000_000


def user_payload(user_id: int, name: str = "someone") -> dict[str, object]:
    return {"id": str(user_id), "username": name, "discriminator": "0", "avatar": None, "global_name": name}


class FakeDiscord:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.requests: list[Recorded] = []
        self.messages: dict[int, Recorded] = {}
        self.cdn: dict[str, bytes] = {}
        self.scripted: list[Scripted] = []
        self.commands: dict[str, dict[str, object]] = {}
        self.base_url = ""
        self.identifies: list[dict[str, object]] = []
        self.resumes: list[dict[str, object]] = []
        self.heartbeats = 0
        self.rate_limited: list[tuple[str, bool]] = []
        self.session: _Session | None = None
        self._ids = itertools.count(5000)
        self._buckets: dict[str, _Bucket] = {}
        self._global = _Bucket(self.limits.global_limit, self.limits.global_window_s)
        self._interactions: dict[str, _Interaction] = {}
        self._connected = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/gateway-resume", self._gateway)
        app.router.add_route("*", "/cdn/{name}", self._cdn)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._api)
        return app

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api/v10"

    # ------------------------------------------------------------------------------- the gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        socket = _Socket(ws, request.query.get("compress") == "zlib-stream")
        await socket.send(_frame(10, {"heartbeat_interval": self.limits.heartbeat_interval_ms}))
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                break
            payload = json.loads(message.data)
            op, data = payload["op"], payload.get("d")
            if op == 1:
                self.heartbeats += 1
                await socket.send(_frame(11, None))
            elif op == 2:
                await self._identify(socket, data)
            elif op == 6:
                await self._resume(socket, data)
        if self.session is not None and self.session.socket is socket:
            self.session.socket = None
            self._connected.clear()
        return ws

    async def _identify(self, socket: _Socket, data: dict[str, object]) -> None:
        self.identifies.append(data)
        if data.get("token") != TOKEN:
            await socket.ws.close(code=4004, message=b"Authentication failed.")
            return
        self.session = _Session(uuid.uuid4().hex)
        self.session.socket = socket
        resume_url = self.base_url.replace("http://", "ws://") + "/gateway-resume"
        await self.dispatch(
            "READY",
            {
                "v": 10,
                "user": BOT_USER,
                "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
                "session_id": self.session.session_id,
                "resume_gateway_url": resume_url,
                "application": {"id": str(APPLICATION_ID), "flags": 0},
            },
        )
        await self.dispatch(
            "GUILD_CREATE",
            {
                "id": str(GUILD_ID),
                "name": "trainers",
                "unavailable": False,
                "member_count": 2,
                "roles": [],
                "channels": [],
                "members": [],
                "emojis": [],
                "features": [],
            },
        )
        self._connected.set()

    async def _resume(self, socket: _Socket, data: dict[str, object]) -> None:
        self.resumes.append(data)
        session = self.session
        if session is None or data.get("session_id") != session.session_id or data.get("token") != TOKEN:
            await socket.send(_frame(9, False))
            return
        session.socket = socket
        seq = data.get("seq")
        for frame in session.sent:
            frame_seq = frame["s"]
            if isinstance(frame_seq, int) and isinstance(seq, int) and frame_seq > seq:
                await socket.send(frame)
        await self.dispatch("RESUMED", {})
        self._connected.set()

    async def dispatch(self, event: str, data: dict[str, object]) -> None:
        """An event on the session, replayed to a client that resumes after missing it."""
        session = self.session
        assert session is not None, "no session: the bot has not identified"
        session.seq += 1
        frame = {"op": 0, "t": event, "s": session.seq, "d": data}
        session.sent.append(frame)
        if session.socket is not None:
            await session.socket.send(frame)

    async def connected(self, timeout_s: float = 60.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def reconnect(self) -> None:
        """Op 7: the client closes, connects to the resume URL and resumes its session."""
        assert self.session is not None
        socket = self.session.socket
        assert socket is not None
        self._connected.clear()
        await socket.send(_frame(7, None))

    async def interact(self, data: dict[str, object], user_id: int, **extra: object) -> str:
        """INTERACTION_CREATE through the gateway; answers the interaction's id."""
        interaction_id = str(next(self._ids))
        token = f"token-{uuid.uuid4().hex}"
        self._interactions[interaction_id] = _Interaction(token, time.monotonic())
        payload: dict[str, object] = {
            "id": interaction_id,
            "application_id": str(APPLICATION_ID),
            "token": token,
            "version": 1,
            "locale": "en-US",
            "app_permissions": "0",
            "entitlements": [],
            "data": data,
            **extra,
        }
        if "guild_id" not in extra:
            payload["user"] = user_payload(user_id)
            payload.setdefault("channel_id", str(dm_channel_id(user_id)))
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction_id

    async def use_command(self, name: str, user_id: int, **options: object) -> str:
        """`/name option:value ...` typed in the guild; an attachment is a dict, resolved alongside."""
        payload_options: list[dict[str, object]] = []
        attachments: dict[str, object] = {}
        for key, value in options.items():
            if isinstance(value, dict):
                attachments[str(value["id"])] = value
                payload_options.append({"name": key, "type": 11, "value": str(value["id"])})
            else:
                kind = {str: 3, int: 4, float: 10}[type(value)]
                payload_options.append({"name": key, "type": kind, "value": value})
        data: dict[str, object] = {
            "id": self.command_id(name),
            "name": name,
            "type": 1,
            "options": payload_options,
            "resolved": {"attachments": attachments} if attachments else {},
        }
        member = {
            "user": user_payload(user_id),
            "roles": [],
            "joined_at": "2026-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": "0",
        }
        return await self.interact(
            data, user_id, type=2, guild_id=str(GUILD_ID), channel_id="42", member=member
        )

    async def press(self, message_id: int, custom_id: str, user_id: int) -> str:
        """A press of a button on a DM the bot sent (as another user, a press on a message they see)."""
        recorded = self.messages[message_id]
        channel_id = int(recorded.path.strip("/").split("/")[1])
        message = message_payload(message_id, channel_id, recorded)
        data = {"custom_id": custom_id, "component_type": 2}
        return await self.interact(data, user_id, type=3, message=message, channel_id=str(channel_id))

    # ----------------------------------------------------------------------------------------- REST

    async def _cdn(self, request: web.Request) -> web.Response:
        data = self.cdn.get(request.match_info["name"])
        return web.Response(body=data) if data is not None else web.Response(status=404)

    async def _api(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        body, files = await _read_body(request)
        recorded = Recorded(request.method, path, body, files)
        self.requests.append(recorded)
        response = self._respond(request, recorded)
        recorded.status = response.status
        return response

    def _respond(self, request: web.Request, recorded: Recorded) -> web.Response:
        parts = recorded.path.strip("/").split("/")
        if parts[0] not in OUTSIDE_GLOBAL and request.headers.get("Authorization") != f"Bot {TOKEN}":
            return _json({"code": 0, "message": "401: Unauthorized"}, 401)
        limited = self._rate_limit(recorded.method, parts)
        if isinstance(limited, web.Response):
            return limited
        for script in self.scripted:
            if (
                script.times > 0
                and script.method == recorded.method
                and script.path_contains in recorded.path
            ):
                script.times -= 1
                return _json(script.body, script.status, {**limited, **script.headers})
        invalid = _invalid_message(recorded.body)
        if invalid is not None:
            return _json({"code": 50035, "message": "Invalid Form Body", "errors": invalid}, 400, limited)
        response = self._answer(recorded, parts)
        response.headers.update(limited)
        return response

    def _rate_limit(self, method: str, parts: list[str]) -> dict[str, str] | web.Response:
        """The bucket's headers; a 429 once the route's or the global bucket is used up."""
        now = time.monotonic()
        if parts[0] not in OUTSIDE_GLOBAL and not _take(self._global, now):
            return self._too_many(self._global, now, "global")
        route = bucket_name(method, parts)
        bucket = self._buckets.setdefault(route, _Bucket(self.limits.route_limit, self.limits.route_window_s))
        if not _take(bucket, now):
            return self._too_many(bucket, now, route)
        reset_after = bucket.resets_at - now
        return {
            "X-RateLimit-Limit": str(bucket.limit),
            "X-RateLimit-Remaining": str(bucket.limit - bucket.used),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": route,
        }

    def _too_many(self, bucket: _Bucket, now: float, name: str) -> web.Response:
        retry_after = max(0.001, bucket.resets_at - now)
        is_global = name == "global"
        self.rate_limited.append((name, is_global))
        headers = {
            "Via": "1.1 google",
            "Retry-After": str(math.ceil(retry_after)),
            "X-RateLimit-Limit": str(bucket.limit),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Bucket": name,
            "X-RateLimit-Scope": "global" if is_global else "user",
        }
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": is_global}
        return _json(body, 429, headers)

    def _answer(self, recorded: Recorded, parts: list[str]) -> web.Response:
        method, path = recorded.method, recorded.path
        if (method, path) == ("GET", "/users/@me"):
            return _json(BOT_USER)
        if method == "GET" and parts[0] == "gateway":
            return _json({"url": self.base_url.replace("http://", "ws://") + "/gateway"})
        if (method, path) == ("POST", "/users/@me/channels"):
            user_id = int(str(recorded.body["recipient_id"]))
            recipient = user_payload(user_id)
            return _json({"id": str(dm_channel_id(user_id)), "type": 1, "recipients": [recipient]})
        if method == "POST" and parts[0] == "channels" and parts[2:] == ["messages"]:
            message_id = next(self._ids)
            self.messages[message_id] = recorded
            return _json(message_payload(message_id, int(parts[1]), recorded))
        if method == "PATCH" and parts[0] == "channels" and len(parts) == 4:
            return self._edit(recorded, int(parts[1]), int(parts[3]))
        if parts[0] == "applications" and parts[2] == "commands":
            return self._commands(recorded, parts[3:])
        if parts[0] == "interactions":
            return self._callback(parts[1], parts[2])
        if parts[0] == "webhooks":
            return self._followup(recorded, parts[2])
        return _json({"code": 0, "message": "404: Not Found"}, 404)

    def _edit(self, recorded: Recorded, channel_id: int, message_id: int) -> web.Response:
        previous = self.messages.get(message_id)
        if previous is None:
            return _json({"code": 10008, "message": "Unknown Message"}, 404)
        # An edit changes what it names and keeps the rest, as Discord does.
        merged = Recorded("POST", previous.path, {**previous.body, **recorded.body}, previous.files)
        self.messages[message_id] = merged
        return _json(message_payload(message_id, channel_id, merged))

    def _callback(self, interaction_id: str, token: str) -> web.Response:
        found = self._interactions.get(interaction_id)
        late = found is not None and time.monotonic() - found.created > self.limits.interaction_deadline_s
        if found is None or found.token != token or late:
            return _json({"code": 10062, "message": "Unknown interaction"}, 404)
        if found.acknowledged:
            return _json({"code": 40060, "message": "Interaction has already been acknowledged."}, 400)
        found.acknowledged = True
        return web.Response(status=204)

    def _followup(self, recorded: Recorded, token: str) -> web.Response:
        found = next((i for i in self._interactions.values() if i.token == token), None)
        if found is None or not found.acknowledged or time.monotonic() - found.created > FOLLOWUP_LIFETIME_S:
            return _json({"code": 10015, "message": "Unknown Webhook"}, 404)
        return _json(message_payload(next(self._ids), 1, recorded))

    def _commands(self, recorded: Recorded, rest: list[str]) -> web.Response:
        """Global application commands: listed, and created, edited or deleted one by one."""
        if recorded.method == "GET":
            return _json_list(list(self.commands.values()))
        if recorded.method == "DELETE":
            self.commands = {k: v for k, v in self.commands.items() if v["id"] != rest[0]}
            return web.Response(status=204)
        name = str(recorded.body["name"])
        registered = {
            "type": 1,
            "description": "",
            "options": [],
            "dm_permission": True,
            "nsfw": False,
            "default_member_permissions": None,
            **recorded.body,
            "id": self.commands[name]["id"] if name in self.commands else str(next(self._ids)),
            "application_id": str(APPLICATION_ID),
            "version": str(next(self._ids)),
        }
        self.commands[name] = registered
        return _json(registered)

    def command_id(self, name: str) -> str:
        return str(self.commands[name]["id"])

    # ------------------------------------------------------------------------ what the tests look at

    def of(self, method: str, path_contains: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and path_contains in r.path]

    def sent_embeds(self) -> list[dict[str, object]]:
        """The first embed of every message created, in order."""
        return [first_embed(r) for r in self.of("POST", "/messages") if r.status == 200]

    def followups(self) -> list[str]:
        return [str(r.body.get("content")) for r in self.of("POST", "/webhooks/") if r.status == 200]

    def callbacks(self, interaction_id: str) -> list[Recorded]:
        return self.of("POST", f"/interactions/{interaction_id}/")

    def followup_of(self, interaction_id: str) -> str | None:
        """The content of the follow-up that answered an interaction, once there is one."""
        found = self._interactions[interaction_id]
        for recorded in self.of("POST", f"/webhooks/{APPLICATION_ID}/{found.token}"):
            if recorded.status == 200:
                return str(recorded.body.get("content"))
        return None

    async def answer_to(self, interaction_id: str, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while (text := self.followup_of(interaction_id)) is None:
            assert time.monotonic() < deadline, f"interaction {interaction_id} got no answer"
            await asyncio.sleep(0.01)
        return text


def bucket_name(method: str, parts: list[str]) -> str:
    """Discord's per-route bucket: the method and route, with the major parameter's value kept."""
    major = {"channels": 1, "guilds": 1, "webhooks": 2, "interactions": 2}.get(parts[0], 0)
    kept = [part if index <= major or not part.isdigit() else "{id}" for index, part in enumerate(parts)]
    return f"{method} /{'/'.join(kept)}"


def _take(bucket: _Bucket, now: float) -> bool:
    if now >= bucket.resets_at:
        bucket.used, bucket.resets_at = 0, now + bucket.window_s
    if bucket.used >= bucket.limit:
        return False
    bucket.used += 1
    return True


def _invalid_message(body: dict[str, object]) -> dict[str, str] | None:
    """What Discord's form validation refuses in a message body: the failing paths and why."""
    target = body.get("data") if isinstance(body.get("data"), dict) else body
    assert isinstance(target, dict)
    problems: dict[str, str] = {}
    content = target.get("content")
    if isinstance(content, str) and len(content) > CONTENT_MAX:
        problems["content"] = f"Must be {CONTENT_MAX} or fewer in length."
    embeds = target.get("embeds")
    for index, embed in enumerate(embeds if isinstance(embeds, list) else []):
        problems.update(_embed_problems(f"embeds.{index}", embed))
    return problems or None


def _embed_problems(where: str, embed: dict[str, object]) -> dict[str, str]:
    problems: dict[str, str] = {}
    total = 0
    texts = {key: embed.get(key) for key in ("title", "description")}
    texts["footer"] = _inner(embed, "footer", "text")
    texts["author"] = _inner(embed, "author", "name")
    for key, text in texts.items():
        if isinstance(text, str):
            total += len(text)
            if len(text) > EMBED_LIMITS[key]:
                problems[f"{where}.{key}"] = f"Must be {EMBED_LIMITS[key]} or fewer in length."
    fields = embed.get("fields")
    fields = fields if isinstance(fields, list) else []
    if len(fields) > FIELDS_MAX:
        problems[f"{where}.fields"] = f"Must be {FIELDS_MAX} or fewer in length."
    for index, item in enumerate(fields):
        for key, limit in (("name", FIELD_NAME_MAX), ("value", FIELD_VALUE_MAX)):
            text = str(item.get(key, ""))
            total += len(text)
            if len(text) > limit:
                problems[f"{where}.fields.{index}.{key}"] = f"Must be {limit} or fewer in length."
    if total > EMBED_TOTAL_MAX:
        problems[where] = f"Embed size exceeds maximum size of {EMBED_TOTAL_MAX}"
    return problems


def _inner(embed: dict[str, object], part: str, key: str) -> object:
    inner = embed.get(part)
    return inner.get(key) if isinstance(inner, dict) else None


def _frame(op: int, data: object) -> dict[str, object]:
    return {"op": op, "d": data, "s": None, "t": None}


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


def buttons_of(recorded: Recorded) -> list[tuple[str, str, bool]]:
    """(label, custom_id, disabled) of every button of a message body."""
    found: list[tuple[str, str, bool]] = []
    rows = recorded.body.get("components")
    for row in rows if isinstance(rows, list) else []:
        for item in row.get("components", []) if isinstance(row, dict) else []:
            found.append((str(item.get("label")), str(item.get("custom_id")), bool(item.get("disabled"))))
    return found


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
        "components": recorded.body.get("components") or [],
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
async def serve(limits: Limits | None = None) -> AsyncIterator[FakeDiscord]:
    """The fake on a free loopback port."""
    fake = FakeDiscord(limits)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield fake
    finally:
        await runner.cleanup()


@asynccontextmanager
async def fake_discord(limits: Limits | None = None) -> AsyncIterator[tuple[FakeDiscord, nextcord.Client]]:
    """The fake, and a nextcord client logged in to its REST API (for DMs alone no gateway is needed)."""
    async with serve(limits) as fake:
        saved = nextcord.http.Route.BASE
        nextcord.http.Route.BASE = fake.api_base
        client = nextcord.Client(intents=nextcord.Intents.default(), application_id=APPLICATION_ID)
        try:
            await client.login(TOKEN)
            yield fake, client
        finally:
            await client.close()
            nextcord.http.Route.BASE = saved
