"""relay.ws.frames against wsproto's own encoder (server side, unmasked)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol

from relay.ws import encode_binary_frame, encode_close_frame, encode_text_frame

BOUNDARY_LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 70000]


def wsproto_server() -> FrameProtocol:
    return FrameProtocol(client=False, extensions=[])


@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
def test_text_frame_matches_wsproto_at_length_boundaries(length: int) -> None:
    payload = ("é" * length).encode()[:length]
    payload = payload.decode("utf-8", errors="ignore").encode()
    assert encode_text_frame(payload) == bytes(wsproto_server().send_data(payload.decode()))


@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
def test_binary_frame_matches_wsproto_at_length_boundaries(length: int) -> None:
    payload = bytes(range(256)) * (length // 256 + 1)
    payload = payload[:length]
    assert encode_binary_frame(payload) == bytes(wsproto_server().send_data(payload))


@given(st.text(max_size=300))
def test_text_frame_matches_wsproto(text: str) -> None:
    assert encode_text_frame(text.encode()) == bytes(wsproto_server().send_data(text))


@given(
    st.sampled_from([1000, 1001, 1008, 1011, 1012, 3000, 4001, 4008, 4999]),
    st.text(max_size=80),
)
def test_close_frame_matches_wsproto(code: int, reason: str) -> None:
    assert encode_close_frame(code, reason) == bytes(wsproto_server().close(code, reason))


def test_close_reason_is_cut_on_a_character_boundary() -> None:
    frame = encode_close_frame(4008, "é" * 100)
    assert frame[1] == 2 + 122  # 61 two-byte characters fit in 123 bytes
    assert frame[4:].decode("utf-8") == "é" * 61
    assert frame == bytes(wsproto_server().close(4008, "é" * 100))


@pytest.mark.parametrize("code", [999, 1005, 1006, 1015, 5000])
def test_unsendable_close_codes_are_refused(code: int) -> None:
    with pytest.raises(ValueError):
        encode_close_frame(code)
