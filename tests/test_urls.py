"""URL normalisation: browser rules, and the vectorised fast path agreeing with the parser."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distributed_downloader.prep.urls import ALREADY_NORMAL, normalise_one, normalise_urls


@pytest.mark.parametrize(
    ("raw", "identifier", "server_name"),
    [
        ("http://127.0.0.2:8001/a b/ü.jpg?q=a b", "http://127.0.0.2:8001/a%20b/%C3%BC.jpg?q=a%20b",
         "127.0.0.2:8001"),
        ("HTTP://Images.Example.localhost:80/x.jpg", "http://images.example.localhost/x.jpg",
         "images.example.localhost"),
        ("https://h.localhost:443", "https://h.localhost/", "h.localhost"),
        ("  http://h.localhost/a/./b/../c.jpg\t", "http://h.localhost/a/c.jpg", "h.localhost"),
        ("http://münchen.localhost/ä.jpg", "http://xn--mnchen-3ya.localhost/%C3%A4.jpg",
         "xn--mnchen-3ya.localhost"),
        ("http://0x7f.1/a.jpg", "http://127.0.0.1/a.jpg", "127.0.0.1"),
        ("http://h.localhost\\a\\b.jpg", "http://h.localhost/a/b.jpg", "h.localhost"),
        # A fragment is never sent: one resource with or without it.
        ("http://h.localhost/a.jpg#page=2", "http://h.localhost/a.jpg", "h.localhost"),
        ("http://h.localhost/a%23b.jpg?x=1#", "http://h.localhost/a%23b.jpg?x=1", "h.localhost"),
    ],
)
def test_normalises_as_a_browser_does(raw: str, identifier: str, server_name: str) -> None:
    assert normalise_one(raw) == (identifier, server_name, None)
    result = normalise_urls(pa.array([raw]))
    assert result.identifier.to_pylist() == [identifier]
    assert result.server_name.to_pylist() == [server_name]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty_url"), ("   ", "empty_url"), (None, "empty_url"),
        ("javascript:alert(1)", "unsupported_scheme"), ("file:///etc/passwd", "unsupported_scheme"),
        ("ftp://127.0.0.2/a.jpg", "unsupported_scheme"), ("data:image/png;base64,AAAA",
                                                          "unsupported_scheme"),
        ("mailto:someone", "unsupported_scheme"),
        ("images/a.jpg", "invalid_url"), ("/images/a.jpg", "invalid_url"), ("http://", "invalid_url"),
        ("http://a b.localhost/", "invalid_url"),
    ],
)
def test_rejects_what_cannot_be_downloaded(raw: str | None, reason: str) -> None:
    assert normalise_one(raw)[2] == reason
    assert normalise_urls(pa.array([raw], pa.string())).reject_reason.to_pylist() == [reason]


SCHEMES = st.sampled_from(["http://", "https://", "HTTP://", "Https://", "ftp://", "", "//"])
HOSTS = st.sampled_from([
    "h.localhost", "img.museum-1.localhost", "H.Localhost", "127.0.0.2", "127.0.0.2:8080",
    "127.0.0.2:80", "h.localhost:443", "01.2.3.4", "0x7f.1", "2130706433", "a.123", "xn--zz.localhost",
    "xn--mnchen-3ya.localhost", "a--b.localhost", "-a.localhost", "a_b.localhost", "a..localhost",
    "localhost.", "user:pw@h.localhost", "[::1]", "[::1]:8080", "h.localhost:99999", "",
])
PATH_PIECES = st.sampled_from(
    list("abcXYZ019-._~!$&'()*+,;=:@/%?#[]|^{}`\\\" <>é\tü")
    + ["%2e", "%2E", "/..", "/.", "%zz", "%41", "%2", "?/./", ".jpg"]
)
PATH_TEXT = st.lists(PATH_PIECES, max_size=12).map("".join)


@settings(max_examples=600, deadline=None)
@given(scheme=SCHEMES, host=HOSTS, path=PATH_TEXT, slash=st.booleans())
def test_fast_path_agrees_with_the_parser(scheme: str, host: str, path: str, slash: bool) -> None:
    raw = f"{scheme}{host}{'/' if slash else ''}{path}"
    result = normalise_urls(pa.array([raw, "http://h.localhost/plain.jpg"]))
    identifier, server_name, reason = normalise_one(raw)
    assert result.identifier[0].as_py() == identifier
    assert result.server_name[0].as_py() == server_name
    assert result.reject_reason[0].as_py() == (str(reason) if reason else None)


@pytest.mark.parametrize("raw", [
    "https://images.museum1.localhost/media/12/1000.jpg?v=2",
    "http://127.0.0.2/a.jpg",
    "https://h.localhost/a%20b/%C3%A9.jpg?x=/./y",
    "https://a-b.c_d.localhost/x.y/z..jpg",
    "https://h.localhost/%2Fa/%7Eb/%E6%96%87.jpg",
])
def test_common_urls_take_the_fast_path(raw: str) -> None:
    assert ALREADY_NORMAL.match(raw)
    assert normalise_one(raw) == (raw, raw.split("/")[2], None)


@pytest.mark.parametrize("raw", [
    "https://h.localhost/a/./b.jpg", "https://h.localhost/a/../b.jpg",
    "https://h.localhost/a/%2e%2E/b.jpg", "https://h.localhost/.%2e", "https://xn--zz.localhost/a",
    "https://a--b.localhost/a", "https://H.localhost/a", "https://h.localhost:8080/a",
])
def test_what_the_parser_may_change_takes_the_slow_path(raw: str) -> None:
    assert not ALREADY_NORMAL.match(raw)
