"""The incremental detokenizer, the stop-string matcher and the admission queue, in isolation."""
from __future__ import annotations

import asyncio

import pytest

from gateway.admission import Admission
from gateway.protocol import QueueFull, Unavailable
from gateway.generation import Detokenizer, StopMatcher


def stream_text(tokenizer, text: str, chunk: int = 1) -> list[str]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = Detokenizer(tokenizer, [1, 2], skip_special_tokens=True)
    pieces = [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(detok.push([], final=True))
    return pieces


@pytest.mark.parametrize("text", ["Hello world, this is plain.", "日本語のテキスト 🎉🎉 emoji",
                                  "  leading spaces\n\nand newlines\t tabs", "naïve café ½ → ∞"])
def test_detokenizer_reassembles_text_without_broken_characters(tokenizer, text):
    for chunk in (1, 2, 3):
        pieces = stream_text(tokenizer, text, chunk)
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_holds_back_a_split_character(tokenizer):
    ids = tokenizer("🎉", add_special_tokens=False).input_ids
    assert len(ids) > 1, "the emoji must span tokens for this test"
    detok = Detokenizer(tokenizer, [], skip_special_tokens=True)
    assert [detok.push([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1:]) == "🎉"


def test_detokenizer_skips_special_tokens_unless_asked(tokenizer):
    ids = tokenizer("Hi", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert Detokenizer(tokenizer, [], True).push(ids, final=True) == "Hi"
    assert Detokenizer(tokenizer, [], False).push(ids, final=True) == "Hi" + tokenizer.eos_token


def test_detokenizer_decodes_as_transformers_does(tokenizer):
    """It calls the Rust tokenizer directly (transformers' wrapper cost more than the decode):
    the text must be transformers' decode, special tokens and broken characters included."""
    import random

    rng = random.Random(0)
    special = [tokenizer.eos_token_id, *tokenizer.all_special_ids]
    for skip in (True, False):
        detok = Detokenizer(tokenizer, [], skip)
        assert detok._decoder is tokenizer.backend_tokenizer, "the default takes the direct path"
        for _ in range(50):
            ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(tokenizer))
                   for _ in range(rng.randint(1, 12))]
            assert detok._decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip)


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    out = [matcher.feed(p) for p in pieces]
    out.append(matcher.feed("", final=True))
    return "".join(out)


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_stop_string_never_leaks_across_pieces(split):
    text = "abc STOP here def"
    pieces = [text[i:i + split] for i in range(0, len(text), split)]
    matcher = StopMatcher(["STOP"], include_stop=False)
    released = []
    for piece in pieces:
        released.append(matcher.feed(piece))
        assert "S" not in "".join(released), "a prefix of the stop string leaked"
    assert "".join(released) == "abc " and matcher.stopped


def test_stop_string_included_and_earliest_wins():
    m = StopMatcher(["two", "one"], include_stop=True)
    assert feed_all(m, ["zero o", "ne two"]) == "zero one"
    assert m.stopped


def test_held_prefix_released_when_it_turns_out_not_to_stop():
    m = StopMatcher(["STOP"], include_stop=False)
    assert m.feed("xx ST") == "xx "
    assert m.feed("ART") == "START"
    assert m.feed("S", final=True) == "S"
    assert not m.stopped


def test_admission_queue_is_fifo_bounded_and_cancellable():
    async def run():
        adm = Admission(capacity=2, max_queued=2)
        a = adm.enter(2)
        b = adm.enter(1)
        c = adm.enter(1)
        with pytest.raises(QueueFull) as exc:
            adm.enter(1)
        assert exc.value.headers["Retry-After"] == "1"
        waiter = asyncio.ensure_future(b.wait())
        await asyncio.sleep(0)
        c.release()                       # gave up while queued
        assert adm.num_waiting == 1 and not waiter.done()
        a.release()
        await waiter
        assert adm.num_in_use == 1
        b.release()
        b.release()                       # idempotent
        assert adm.num_in_use == 0 and adm.num_waiting == 0
        adm.close()
        with pytest.raises(Unavailable):
            adm.enter(1)

    asyncio.run(run())
