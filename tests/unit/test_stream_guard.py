"""clusterlm.serve.relay's event framing: the stream guard forwards whole SSE events only, and knows a
finished stream by its `data: [DONE]` event. The guard end to end (HAProxy, replicas, SIGKILL) is
tests/e2e/test_serve_replicas.py::test_stream_guard_ends_a_killed_replicas_streams_with_an_error_event."""

from __future__ import annotations

import json

from clusterlm.serve.relay import _DONE, lost_event, split_events


def test_split_events_keeps_a_partial_event_back():
    assert split_events(b'data: {"a": 1}\n\ndata: {"b"') == (b'data: {"a": 1}\n\n', b'data: {"b"')
    assert split_events(b'data: {"b"') == (b"", b'data: {"b"')
    assert split_events(b"data: 1\n\ndata: 2\n\n") == (b"data: 1\n\ndata: 2\n\n", b"")
    # the SSE spec's other line ends
    assert split_events(b"data: 1\r\n\r\ndata: 2\r\n") == (b"data: 1\r\n\r\n", b"data: 2\r\n")
    assert split_events(b"data: 1\r\rdata") == (b"data: 1\r\r", b"data")
    # a byte-by-byte arrival gives the same events
    stream, out, buf = b'data: {"x": "a\\nb"}\n\ndata: [DONE]\n\n', b"", b""
    for i in range(len(stream)):
        whole, buf = split_events(buf + stream[i:i + 1])
        out += whole
    assert out == stream and buf == b""


def test_done_is_found_only_as_its_own_event():
    assert _DONE.search(b"data: [DONE]\n\n")
    assert _DONE.search(b'data: {"a": 1}\n\ndata: [DONE]\n\n')
    assert _DONE.search(b"data:[DONE]\r\n\r\n")
    assert not _DONE.search(b'data: {"text": "data: [DONE]"}\n\n')  # generated text that quotes it


def test_lost_event_is_an_openai_error_then_done():
    ev = lost_event("gone", "replica_lost")
    first, second, rest = ev.split(b"\n\n")
    assert json.loads(first.removeprefix(b"data: ")) == {
        "error": {"message": "gone", "type": "server_error", "param": None, "code": "replica_lost"}}
    assert second == b"data: [DONE]" and rest == b""
