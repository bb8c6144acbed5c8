"""Incremental detokenization: multi-byte UTF-8 split over tokens, stop strings across tokens."""

from __future__ import annotations

import pytest

from pdserve.common.detokenizer import IncrementalDetokenizer
from pdserve.common.tokenizer import Tokenizer

TEXTS = ["Hello 👋 world 🌍🚀!", "日本語のテキストと中文混合", "naïve café — ünïcödé ✓", "  spaces\n\ttabs  end"]


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir):
    return Tokenizer(smollm2_tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_equals_full_decode(tok, text):
    prompt = tok.encode("Say:")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt, stop=[])
    seen = []
    for t in ids:
        detok.add_tokens([t])
        seen.append(detok.visible_text(False))
        assert "\ufffd" not in detok.text
    assert detok.text == tok.decode(ids) == text
    assert all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))  # streamed text only grows


def test_stop_string_spanning_tokens_is_cut_and_held_back(tok):
    ids = tok.encode("The answer is forty-two, my friend.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["two, my"])
    matched = None
    for t in ids:
        visible = detok.visible_text(False)
        assert "two, my" not in visible
        matched = detok.add_tokens([t])
        if matched:
            break
    assert matched == "two, my"
    assert detok.text == "The answer is forty-"


def test_chat_template_renders_chatml(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
