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


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_a_replicas_response_head_goes_out_with_its_first_body_bytes():
    """serve.guard.HeadWithBody (the replica's transport): uvicorn's two writes, head then body, reach
    the socket as one, so a replica killed between them has sent nothing (HAProxy retries the request)
    rather than a head without its body (a started response that cannot be retried)."""
    from clusterlm.serve.guard import HeadWithBody

    raw = _Transport()
    t = HeadWithBody(raw)
    head, body = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", b"{}"
    t.write(head)
    assert raw.writes == []
    t.write(body)
    t.write(b"")  # uvicorn's EndOfMessage for a content-length body
    assert raw.writes == [head + body, b""]
    # a stream: the head with the first event, the events after it one write each
    t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    t.write(b"7\r\ndata: 1\r\n")
    t.write(b"7\r\ndata: 2\r\n")
    assert raw.writes[2:] == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\ndata: 1\r\n",
                              b"7\r\ndata: 2\r\n"]
    # an interim 100 Continue is not held (the client waits for it before sending the body)
    t.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert raw.writes[-1] == b"HTTP/1.1 100 Continue\r\n\r\n"
    # a head still held at close goes out first; everything else is the transport's
    t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert not t.is_closing()
    t.close()
    assert raw.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n" and raw.closed and t.is_closing()


def test_a_bracketed_ipv6_host_is_refused_with_the_address_to_give():
    """--host '[::1]' (URL notation) is no address to bind: the refusal says to drop the brackets."""
    import pytest

    from clusterlm.errors import ClusterlmError
    from clusterlm.serve.guard import bind

    with pytest.raises(ClusterlmError, match=r"--host '\[::1\]' is not an address .*without brackets: --host ::1$"):
        bind("[::1]", 0, 8)
    with pytest.raises(ClusterlmError) as e:
        bind("no-such-host.invalid", 0, 8)
    assert "brackets" not in str(e.value)
