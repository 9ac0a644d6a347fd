"""The stop-sequence matcher against a direct search of the whole text, for every way of cutting it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.stops import StopSequenceMatcher


def expected(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Truth from the whole text: the stop that completes first (earliest end, then earliest start)."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not found:
        return text, None
    _, start, stop = min(found)
    return text[:start], stop


def run(deltas: list[str], stops: list[str]) -> tuple[str, str | None, list[str]]:
    matcher = StopSequenceMatcher(stops)
    released = [matcher.feed(delta) for delta in deltas]
    released.append(matcher.flush())
    return "".join(released), matcher.match.stop_sequence if matcher.match else None, released


def test_stop_split_across_deltas_is_held_back_then_dropped():
    matcher = StopSequenceMatcher(["\nUser:"])
    assert matcher.feed("Paris is nice.") == "Paris is nice."
    assert matcher.feed("\nUs") == ""  # might be the stop: held
    assert matcher.feed("er") == ""
    assert matcher.feed(":") == ""
    assert matcher.match is not None and matcher.match.stop_sequence == "\nUser:"
    assert matcher.match.start == len("Paris is nice.")
    assert matcher.feed("more") == "" and matcher.flush() == ""


def test_held_text_is_released_once_it_cannot_match():
    matcher = StopSequenceMatcher(["STOP"])
    assert matcher.feed("a ST") == "a "
    assert matcher.feed("ART") == "START"
    assert matcher.match is None


def test_stop_at_the_very_start():
    assert run(["\n\n", "Hello"], ["\n\n"])[:2] == ("", "\n\n")
    assert run(["###"], ["#"])[:2] == ("", "#")


def test_never_matched_releases_everything():
    text, stop, _ = run(["The capital ", "of France ", "is Paris."], ["Berlin", "Rome."])
    assert (text, stop) == ("The capital of France is Paris.", None)


def test_several_stops_first_to_complete_wins():
    # "is" completes before "Paris" could; the earlier-starting of two completing together wins.
    assert run(["The capital is Paris"], ["Paris", "is"])[:2] == ("The capital ", "is")
    assert run(["ab", "cd"], ["bcd", "abcd"])[:2] == ("", "abcd")
    assert run(["x", "yz"], ["z", "yz"])[:2] == ("x", "yz")


def test_prefix_overlap_is_held_only_as_long_as_needed():
    matcher = StopSequenceMatcher(["aab"])
    assert matcher.feed("aaa") == "a"  # "aa" may still start "aab"
    assert matcher.feed("a") == "a"
    assert matcher.feed("b") == ""
    assert matcher.match.start == 2


def test_unicode_and_empty_deltas():
    assert run(["こん", "", "にち", "は。", "世界"], ["は。"])[:2] == ("こんにち", "は。")


def test_empty_stop_is_refused():
    with pytest.raises(ValueError):
        StopSequenceMatcher(["ok", ""])


alphabet = st.sampled_from("ab\n .")
small_text = st.text(alphabet, max_size=30)


@settings(max_examples=400, deadline=None)
@given(text=small_text, stops=st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=4),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_any_cutting_gives_the_whole_text_answer(text: str, stops: list[str], cuts: list[int]):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    released_text, stop, released = run(deltas, stops)
    assert (released_text, stop) == expected(text, stops)
    # Released text never contains a stop sequence, and holding back never exceeds the longest stop.
    longest = max((len(s) for s in stops), default=0)
    fed = 0
    so_far = ""
    for delta, out in zip(deltas, released, strict=False):
        fed += len(delta)
        so_far += out
        assert not any(s in so_far for s in stops)
        if stop is None:
            assert fed - len(so_far) <= max(longest - 1, 0)
