"""Streaming text is exact (DESIGN.md): the pieces concatenate to the decoded text, also
when a token ends inside a multi-byte character; stop texts are never emitted."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.convert_slow_tokenizer import bytes_to_unicode

from conftest import needs_gpt2_tokenizer
from wmgen.generation import Finished, StopText, Token, generate
from wmgen.memory import WorkingMemory
from wmgen.settings import RunSettings, Sampling
from wmgen.tokens import TextStream

CJK = "灯台守は毎晩階段を上った。"
EMOJI = "Emoji too: 🌊🚢🌅 and 👩‍👩‍👧 family."
MIXED = f"The keeper said {CJK} then {EMOJI} Ünïcödé ok"
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def streamed(tokenizer, ids) -> tuple[list[str], str]:
    stream = TextStream(tokenizer)
    return [stream.push(i) for i in ids], stream.close()


def reference_bytes(hf_tokenizer, token_id: int) -> bytes:
    """A token's bytes from transformers' view of the vocabulary and GPT-2's byte map."""
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(to_byte[c] for c in hf_tokenizer.convert_ids_to_tokens(token_id))


def ends_mid_character(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def hf_decode(hf_tokenizer, ids) -> str:
    # wmgen streams bytes as they are; transformers' space clean-up is a separate, lossy step
    return hf_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# --- TextStream ------------------------------------------------------------------------


@pytest.mark.parametrize("text", [CJK, EMOJI, MIXED], ids=["cjk", "emoji", "mixed"])
def test_stream_is_exact_for_multibyte_text(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    pieces, tail = streamed(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids) == hf_decode(hf_tokenizer, ids) == text
    assert "\ufffd" not in "".join(pieces), "a partial character was emitted as a replacement"
    # the text really does split characters across tokens, so the test means something
    prefixes = [b"".join(reference_bytes(hf_tokenizer, i) for i in ids[:n]) for n in range(1, len(ids) + 1)]
    assert any(map(ends_mid_character, prefixes)), "no token in this text ends inside a character"


def test_stream_emits_every_whole_character_as_soon_as_it_is_complete(tokenizer, hf_tokenizer):
    ids = tokenizer.encode(MIXED)
    pieces, _ = streamed(tokenizer, ids)
    data = b""
    for n, i in enumerate(ids, start=1):
        data += reference_bytes(hf_tokenizer, i)
        if not ends_mid_character(data):  # all whole characters so far: all streamed already
            assert "".join(pieces[:n]) == data.decode("utf-8")


@needs_gpt2_tokenizer
def test_real_gpt2_tokens_split_cjk_and_emoji_mid_character(tokenizer, hf_tokenizer):
    for text in (CJK, "🌊🚢🌅"):
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text), "wmgen and transformers tokenize differently"
        mid = [i for i in ids if ends_mid_character(reference_bytes(hf_tokenizer, i))]
        assert mid, f"expected GPT-2 to split a character of {text!r} across tokens"
        pieces, tail = streamed(tokenizer, ids)
        assert "".join(pieces) + tail == text
        assert "" in pieces, "a token ending mid-character should stream nothing yet"


@needs_gpt2_tokenizer
def test_stream_turns_lone_bytes_into_replacement_characters_like_decode(tokenizer, hf_tokenizer):
    byte_token = {b: hf_tokenizer.convert_tokens_to_ids(c) for b, c in bytes_to_unicode().items()}
    cases = [
        [0xE7, ord("a")],  # a lead byte cut short by ASCII
        [0x81, 0xAF],  # continuation bytes with no lead
        [0xF0, 0x9F, 0x8C],  # a truncated emoji at the very end
        [0xE7, 0x81, 0xAF, 0xE5],  # a whole character, then a dangling lead byte
        [0xED, 0xA0, 0x80],  # an encoded surrogate, which UTF-8 forbids
    ]
    for raw in cases:
        ids = [byte_token[b] for b in raw]
        pieces, tail = streamed(tokenizer, ids)
        assert "".join(pieces) + tail == tokenizer.decode(ids) == hf_decode(hf_tokenizer, ids), raw
        assert "\ufffd" in "".join(pieces) + tail


def multibyte_ids(tokenizer) -> list[int]:
    return sorted(set(tokenizer.encode(MIXED)))


@HYPOTHESIS
@given(data=st.data())
def test_stream_concatenation_equals_decode_for_any_ids(tokenizer, hf_tokenizer, data):
    vocab = tokenizer.vocab_size
    ids = data.draw(
        st.lists(
            st.one_of(
                st.integers(0, 255),  # single byte tokens: lone lead and continuation bytes
                st.integers(0, vocab - 1),
                st.sampled_from(multibyte_ids(tokenizer)),
            ),
            min_size=1,
            max_size=30,
        )
    )
    pieces, tail = streamed(tokenizer, ids)
    text = "".join(pieces) + tail
    assert text == tokenizer.decode(ids)
    assert text == hf_decode(hf_tokenizer, ids)
    assert text == b"".join(reference_bytes(hf_tokenizer, i) for i in ids).decode("utf-8", errors="replace")


# --- StopText --------------------------------------------------------------------------


def push_all(stop: StopText, pieces) -> tuple[str, bool]:
    out = ""
    for piece in pieces:
        emitted, stopped = stop.push(piece)
        out += emitted
        if stopped:
            return out, True
    return out + stop.rest(), False


def test_stop_text_is_never_emitted_and_text_before_it_is():
    pieces = ["Hello wor", "ld. EN", "D and more"]
    full = "".join(pieces)
    out, stopped = push_all(StopText(["END"]), pieces)
    assert stopped
    assert out == full[: full.find("END")]
    assert "END" not in out and "E" not in out[-1:]


def test_text_that_might_start_a_stop_waits_for_the_next_piece():
    stop = StopText(["END"])
    assert stop.push("a quick E") == ("a quick ", False)
    assert stop.push("N") == ("", False)


def test_a_held_back_prefix_that_is_not_a_stop_is_emitted():
    stop = StopText(["END"])
    assert stop.push("a E")[0] == "a "
    assert stop.push("N")[0] == ""
    assert stop.push("x") == ("ENx", False)


def test_a_held_back_prefix_at_the_end_comes_out_with_rest():
    stop = StopText(["END"])
    emitted, stopped = stop.push("the last word: EN")
    assert not stopped
    assert emitted + stop.rest() == "the last word: EN"


def test_the_earliest_of_several_stops_wins():
    out, stopped = push_all(StopText(["xyz", "b c"]), ["aaa b", " c xyz"])
    assert stopped and out == "aaa "


def test_empty_stop_texts_are_ignored():
    out, stopped = push_all(StopText(["", ""]), ["some ", "text"])
    assert (out, stopped) == ("some text", False)


def first_stop(pieces: list[str], stops: list[str]) -> str | None:
    """The text a streaming stop check can emit: the shortest run of pieces that
    contains a stop, cut where the earliest stop starts; None if no stop appears."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            return text[: min(hits)]
    return None


@HYPOTHESIS
@given(
    pieces=st.lists(st.text(alphabet="ab c", max_size=6), min_size=1, max_size=12),
    stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_text_cuts_the_stream_at_the_first_stop(pieces, stops):
    out, stopped = push_all(StopText(stops), pieces)
    expected = first_stop(pieces, stops)
    if expected is None:
        assert not stopped and out == "".join(pieces)
    else:
        assert stopped and out == expected
        assert not any(s in out for s in stops)


# --- the generate loop -------------------------------------------------------------------


def run(loaded, prompt: str, n: int, sampling: Sampling, stop: tuple[str, ...] = ()):
    model, tokenizer, _ = loaded
    memory = WorkingMemory(model, model.config.n_positions)
    settings = RunSettings(max_new_tokens=n, stop=stop, ignore_eos=True)
    events = list(generate(memory, tokenizer, tokenizer.encode(prompt), settings, sampling))
    tokens = [e for e in events if isinstance(e, Token)]
    finished = events[-1]
    assert isinstance(finished, Finished)
    return [t.id for t in tokens], "".join(t.text for t in tokens) + finished.text, finished


def test_generated_pieces_concatenate_to_the_decoded_tokens(loaded):
    tokenizer = loaded[1]
    ids, text, finished = run(loaded, "Once upon a time", 40, Sampling(temperature=1.5, seed=1))
    assert finished.reason == "length"
    assert text == tokenizer.decode(ids)


def test_generation_ends_at_a_stop_text_and_emits_the_text_before_it(loaded):
    tokenizer = loaded[1]
    greedy = Sampling(temperature=0)
    free_ids, free_text, _ = run(loaded, "The lighthouse keeper", 40, greedy)
    full = tokenizer.decode(free_ids)
    assert free_text == full
    # a stop text that straddles the boundary after the 8th token
    at = len(tokenizer.decode(free_ids[:8]))
    stop = full[at - 2 : at + 3]
    expected = full[: full.find(stop)]

    ids, text, finished = run(loaded, "The lighthouse keeper", 40, greedy, stop=(stop,))
    assert finished.reason == "stop"
    assert text == expected
    assert stop not in text
    assert ids == free_ids[: len(ids)]
    assert stop in tokenizer.decode(ids), "generation ended before the stop text was complete"
    assert stop not in tokenizer.decode(ids[:-1]), "generation went on past the token that completed the stop text"


def test_a_stop_prefix_held_at_the_end_of_a_run_is_emitted(loaded):
    tokenizer = loaded[1]
    greedy = Sampling(temperature=0)
    ids, _, _ = run(loaded, "The lighthouse keeper", 20, greedy)
    full = tokenizer.decode(ids)
    stop = full[-2:] + "\x00never"  # the run ends on what looks like the start of a stop
    ids2, text, finished = run(loaded, "The lighthouse keeper", 20, greedy, stop=(stop,))
    assert finished.reason == "length"
    assert ids2 == ids
    assert text == full
    assert finished.text.endswith(full[-2:]), "the held-back prefix should come out at the end"
