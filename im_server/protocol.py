"""WebSocket frame parsing and encoding, error and close codes, rate limiting. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "CLIENT_TYPES",
    "CloseCode",
    "ErrorCode",
    "Frame",
    "ProtocolError",
    "RateLimiter",
    "SeqTracker",
    "encode",
    "message_frame",
    "parse_frame",
]

MAX_CLIENT_MSG_ID = 64
MAX_BODY_BYTES = 16384
MAX_TOKEN_CHARS = 4096


class CloseCode:
    """WebSocket close codes the server uses (see docs/protocol.md)."""

    NORMAL = 1000
    POLICY = 1008  # flooding beyond the rate limit
    TOO_BIG = 1009  # frame larger than the limit
    INTERNAL = 1011
    RECONNECT = 1012  # node draining: reconnect (to another node)
    TRY_LATER = 1013
    TOKEN_EXPIRED = 4001  # the access token the socket was opened with expired: refresh
    REVOKED = 4003  # logged out, device revoked, user disabled or deleted
    SLOW = 4008  # client does not read its frames fast enough


class ErrorCode:
    """``code`` values of ``{"type": "error"}`` frames."""

    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    RATE_LIMITED = "rate_limited"
    NOT_MEMBER = "not_member"
    UNAVAILABLE = "unavailable"
    DRAINING = "draining"
    INTERNAL = "internal"
    TOKEN_INVALID = "token_invalid"  # auth frame: forged, malformed or another device's
    TOKEN_EXPIRED = "token_expired"  # auth frame: the new token has expired already


class ProtocolError(Exception):
    """A client frame is unusable; ``code`` is an :class:`ErrorCode` value."""

    def __init__(self, code: str, message: str, ref: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def frame(self) -> bytes:
        out: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.ref is not None:
            out["ref"] = self.ref
        return encode(out)


@dataclass(slots=True)
class Frame:
    """A validated client frame: ``type`` plus the fields that type needs."""

    type: str
    conv: int = 0
    seq: int = 0
    cid: str = ""
    body: bytes = b""  # body re-encoded as JSON, stored verbatim
    positions: dict[int, int] | None = None
    users: list[int] | None = None
    token: str = ""
    ref: object = None


def encode(obj: object) -> bytes:
    return orjson.dumps(obj)


def _int(data: dict[str, Any], key: str, ref: object, *, minimum: int = 0) -> int:
    value = data.get(key)
    if type(value) is not int or value < minimum:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{key!r} must be an integer >= {minimum}", ref)
    return value


def _send(data: dict[str, Any], frame: Frame) -> None:
    frame.conv = _int(data, "conv", frame.ref, minimum=1)
    cid = data.get("cid")
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_CLIENT_MSG_ID:
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"'cid' must be a string of 1..{MAX_CLIENT_MSG_ID} chars", cid
        )
    frame.ref = frame.cid = cid
    if "body" not in data:
        raise ProtocolError(ErrorCode.BAD_FRAME, "'body' is required", cid)
    body = orjson.dumps(data["body"])
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"'body' exceeds {MAX_BODY_BYTES} bytes", cid)
    frame.body = body


def _position(data: dict[str, Any], frame: Frame) -> None:
    frame.conv = _int(data, "conv", frame.ref, minimum=1)
    frame.seq = _int(data, "seq", frame.ref)


def _conv(data: dict[str, Any], frame: Frame) -> None:
    frame.conv = _int(data, "conv", frame.ref, minimum=1)


def _sync(data: dict[str, Any], frame: Frame) -> None:
    positions = data.get("positions")
    if positions is None:
        return
    if not isinstance(positions, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "'positions' must map conv ids to seqs", frame.ref)
    out: dict[int, int] = {}
    for key, value in positions.items():
        try:
            conv = int(key)
        except ValueError:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"bad conv id {key!r}", frame.ref) from None
        if type(value) is not int or value < 0 or conv < 1:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"bad position for conv {key}", frame.ref)
        out[conv] = value
    frame.positions = out


def _auth(data: dict[str, Any], frame: Frame) -> None:
    token = data.get("token")
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
        raise ProtocolError(ErrorCode.BAD_FRAME, "'token' must be an access token", frame.ref)
    frame.token = token


def _presence(data: dict[str, Any], frame: Frame) -> None:
    users = data.get("users")
    if (
        not isinstance(users, list)
        or len(users) > 1000
        or not all(type(u) is int and u > 0 for u in users)
    ):
        raise ProtocolError(ErrorCode.BAD_FRAME, "'users' must be a list of user ids", frame.ref)
    frame.users = users


_VALIDATORS = {
    "send": _send,
    "received": _position,
    "read": _position,
    "typing": _conv,
    "sync": _sync,
    "presence": _presence,
    "auth": _auth,
    "ping": None,
}
CLIENT_TYPES = frozenset(_VALIDATORS)


def parse_frame(raw: str | bytes) -> Frame:
    """Decode and validate one client frame, or raise :class:`ProtocolError`."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame must be a JSON object")
    kind = data.get("type")
    ref = data.get("ref")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "'type' is required", ref)
    try:
        validator = _VALIDATORS[kind]
    except KeyError:
        message = f"unknown frame type {kind[:40]!r}"
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, message, ref) from None
    frame = Frame(kind, ref=ref)
    if validator is not None:
        validator(data, frame)
    return frame


def message_frame(
    conv: int, seq: int, sender: int, device: int, cid: str, ts_ms: int, body: bytes
) -> bytes:
    """Encode a ``msg`` frame once; ``body`` is already JSON and is spliced in verbatim."""
    return orjson.dumps(
        {
            "type": "msg",
            "conv": conv,
            "seq": seq,
            "from": sender,
            "device": device,
            "cid": cid,
            "ts": ts_ms,
            "body": orjson.Fragment(body),
        }
    )


class RateLimiter:
    """Token bucket: ``rate`` frames per second on average, bursts up to ``burst``.

    ``allow(now)`` spends one token; ``strikes`` counts refusals so the caller can
    close a client that keeps flooding after being told.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "strikes")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now
        self.strikes = 0

    def allow(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            self.strikes = 0
            return True
        self.tokens = tokens
        self.strikes += 1
        return False


class SeqTracker:
    """Per-conversation receive position for a client: dedup, in-order release, gap detection.

    ``offer(conv, seq, item)`` returns the items that are now contiguous (in seq
    order); an item at or below the position is a duplicate and is dropped.
    ``item=None`` marks a seq as present without releasing anything.
    ``gaps()`` lists conversations holding messages above a missing seq: the
    client should sync them from ``position(conv)``.
    """

    __slots__ = ("_pos", "_held")

    def __init__(self, positions: dict[int, int] | None = None) -> None:
        self._pos: dict[int, int] = dict(positions or {})
        self._held: dict[int, dict[int, object]] = {}

    def position(self, conv: int) -> int:
        return self._pos.get(conv, 0)

    def positions(self) -> dict[int, int]:
        return dict(self._pos)

    def advance(self, conv: int, seq: int) -> list[object]:
        """Record a seq this client already has (its own acked send); returns released items."""
        return self.offer(conv, seq, None)

    def start_at(self, conv: int, seq: int) -> list[object]:
        """Adopt the server's starting position for a conversation this client never saw."""
        if conv in self._pos or seq <= 0:
            return []
        self._pos[conv] = seq
        held = self._held.pop(conv, {})
        out: list[object] = []
        for s in sorted(held):
            if s > seq:
                out.extend(self.offer(conv, s, held[s]))
        return out

    def offer(self, conv: int, seq: int, item: object) -> list[object]:
        pos = self._pos.get(conv, 0)
        if seq <= pos:
            return []
        held = self._held.setdefault(conv, {})
        if seq in held:
            return []
        held[seq] = item
        out: list[object] = []
        start = pos
        while pos + 1 in held:
            pos += 1
            got = held.pop(pos)
            if got is not None:
                out.append(got)
        if pos != start:
            self._pos[conv] = pos
        if not held:
            del self._held[conv]
        return out

    def gaps(self) -> list[int]:
        return [conv for conv, held in self._held.items() if held]
