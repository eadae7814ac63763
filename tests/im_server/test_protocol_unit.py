"""Pure logic without I/O: frame parsing, rate limiter, seq tracking, fan-out payloads."""

from __future__ import annotations

import orjson
import pytest

from im_server.fanout import decode_payload, encode_payload
from im_server.protocol import ErrorCode, ProtocolError, RateLimiter, SeqTracker, parse_frame


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{oops", ErrorCode.BAD_JSON),
        ("[]", ErrorCode.BAD_FRAME),
        ('{"no": "type"}', ErrorCode.BAD_FRAME),
        ('{"type": "teleport"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "send", "conv": 1, "body": "x"}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "conv": 0, "cid": "a", "body": "x"}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "conv": true, "cid": "a", "body": "x"}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "conv": 1, "cid": "a"}', ErrorCode.BAD_FRAME),
        ('{"type": "send", "conv": 1, "cid": "%s", "body": 1}' % ("c" * 65), ErrorCode.BAD_FRAME),
        ('{"type": "read", "conv": 1, "seq": -1}', ErrorCode.BAD_FRAME),
        ('{"type": "sync", "positions": {"x": 1}}', ErrorCode.BAD_FRAME),
        ('{"type": "sync", "positions": [1]}', ErrorCode.BAD_FRAME),
        ('{"type": "presence", "users": ["a"]}', ErrorCode.BAD_FRAME),
        ('{"type": "auth", "token": 5}', ErrorCode.BAD_FRAME),
        ('{"type": "auth", "token": "%s"}' % ("t" * 4097), ErrorCode.BAD_FRAME),
    ],
)
def test_bad_frames(raw: str, code: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_frame(raw)
    assert err.value.code == code
    frame = orjson.loads(err.value.frame())
    assert frame["type"] == "error" and frame["code"] == code and frame["message"]


def test_oversize_body_is_refused_with_its_cid() -> None:
    raw = orjson.dumps({"type": "send", "conv": 3, "cid": "c1", "body": "x" * 20000})
    with pytest.raises(ProtocolError) as err:
        parse_frame(raw)
    assert (err.value.code, err.value.ref) == (ErrorCode.BAD_FRAME, "c1")


def test_good_frames() -> None:
    send = parse_frame('{"type": "send", "conv": 3, "cid": "c1", "body": {"text": "hi"}}')
    assert (send.type, send.conv, send.cid, orjson.loads(send.body)) == (
        "send", 3, "c1", {"text": "hi"})
    sync = parse_frame('{"type": "sync", "positions": {"3": 7}, "ref": "r"}')
    assert (sync.positions, sync.ref) == ({3: 7}, "r")
    assert parse_frame('{"type": "read", "conv": 2, "seq": 5}').seq == 5
    assert parse_frame('{"type": "auth", "token": "a.b.c"}').token == "a.b.c"


def test_rate_limiter_refills_and_counts_strikes() -> None:
    limiter = RateLimiter(rate=10, burst=3, now=0.0)
    assert [limiter.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.strikes == 1 and not limiter.allow(0.0) and limiter.strikes == 2
    assert limiter.allow(0.1)  # one token back after 100 ms at 10/s
    assert limiter.strikes == 0
    assert [limiter.allow(10.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_seq_tracker_dedups_reorders_and_reports_gaps() -> None:
    t = SeqTracker()
    assert t.offer(1, 1, "a") == ["a"]
    assert t.offer(1, 1, "a") == []  # duplicate
    assert t.offer(1, 3, "c") == [] and t.gaps() == [1]
    assert t.offer(1, 2, "b") == ["b", "c"] and t.gaps() == []
    assert t.advance(1, 5) == [] and t.offer(1, 4, "d") == ["d"]  # own send 5 fills in
    assert t.position(1) == 5
    assert t.offer(2, 8, "x") == [] and t.start_at(2, 7) == ["x"]
    assert t.start_at(1, 100) == []  # only for conversations it never saw
    assert t.positions() == {1: 5, 2: 8}


def test_fanout_payload_round_trip() -> None:
    frame = orjson.dumps({"type": "msg", "body": "tab\there\nnewline"})
    records = [("1,2,3", "9", frame), ("!kick", "4,0", b"{}")]
    node, decoded = decode_payload(encode_payload("app1", records))
    assert node == "app1" and decoded == records
