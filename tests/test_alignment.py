"""Moving per-token values between tokenizations: constructed cases with known answers."""

import numpy as np
import pytest

from conftest import build_tokenizer
from selective_po.alignment import completion_offsets, map_completion_values, map_token_values

TEXTS = [
    "Add the ones: 7 + 8 = 15, write 5 and carry 1. So 47 + 38 = 85.",
    "  leading spaces,\ttabs and\nnewlines   matter.",
    "Unicode: café, naïve, 東京, emoji 🙂 end",
    "x",
]


def offsets(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def test_identical_tokenizations_map_to_themselves():
    spans = [(0, 3), (3, 4), (4, 9)]
    np.testing.assert_allclose(map_token_values(spans, [1.0, -2.0, 0.5], spans, "abc defgh"), [1.0, -2.0, 0.5])


def test_split_and_merge():
    # "hello": one source token of value 5 over 5 characters; target "he" + "llo".
    np.testing.assert_allclose(map_token_values([(0, 5)], [5.0], [(0, 2), (2, 5)], "hello"), [2.0, 3.0])
    # and back: the coarse target gets the sum
    np.testing.assert_allclose(map_token_values([(0, 2), (2, 5)], [2.0, 3.0], [(0, 5)], "hello"), [5.0])


def test_a_token_straddling_a_boundary_gets_its_share_of_each():
    # source "ab" | "cd" with values 1 and 3; target "a" | "bc" | "d"
    got = map_token_values([(0, 2), (2, 4)], [1.0, 3.0], [(0, 1), (1, 3), (3, 4)], "abcd")
    np.testing.assert_allclose(got, [0.5, 0.5 + 1.5, 1.5])


def test_whitespace_conventions_do_not_lose_value():
    # "hi  you": the source attaches spaces to the next token, the target leaves them out
    source = [(0, 2), (2, 7)]  # "hi", "  you"
    target = [(0, 2), (4, 7)]  # "hi", "you" (offsets trimmed)
    got = map_token_values(source, [1.0, 5.0], target, "hi  you")
    np.testing.assert_allclose(got, [1.0, 5.0])  # the spaces carry no value of their own
    # a token of only whitespace keeps its value on its whitespace
    got = map_token_values([(0, 2), (2, 4), (4, 7)], [1.0, 2.0, 3.0], [(0, 3), (3, 7)], "hi  you")
    np.testing.assert_allclose(got, [1.0 + 1.0, 1.0 + 3.0])


def test_tokens_sharing_a_character_share_its_value():
    # byte-level pieces of one character both report (1, 2)
    got = map_token_values([(0, 1), (1, 2)], [2.0, 4.0], [(0, 1), (1, 2), (1, 2)], "a🙂")
    np.testing.assert_allclose(got, [2.0, 2.0, 2.0])
    back = map_token_values([(0, 1), (1, 2), (1, 2)], [2.0, 1.0, 3.0], [(0, 1), (1, 2)], "a🙂")
    np.testing.assert_allclose(back, [2.0, 4.0])


def test_zero_width_token_at_the_end_is_conserved():
    got = map_token_values([(0, 3), (3, 3)], [1.0, 2.0], [(0, 1), (1, 3)], "abc")
    np.testing.assert_allclose(got.sum(), 3.0)
    np.testing.assert_allclose(got, [1.0, 2.0])  # the end token's value joins the last characters


def test_bad_inputs():
    with pytest.raises(ValueError, match="values for"):
        map_token_values([(0, 1)], [1.0, 2.0], [(0, 1)], "a")
    with pytest.raises(ValueError, match="text order"):
        map_token_values([(2, 3), (0, 2)], [1.0, 1.0], [(0, 3)], "abc")


def reference_map(src, values, tgt, text):
    """The rule written out character by character, in plain Python."""
    def owner(spans):
        starts = sorted({s for s, _ in spans})
        owners = []
        for c in range(len(text)):
            owners.append(max([i for i, s in enumerate(starts) if s <= c], default=0))
        return starts, owners

    s_starts, s_owner = owner(src)
    group_value = [sum(v for (s, _), v in zip(src, values) if s == g) for g in s_starts]
    if s_starts and s_starts[-1] == len(text) and len(s_starts) > 1:  # zero-width last group
        group_value[-2] += group_value[-1]
    per_char = []
    for c in range(len(text)):
        g = s_owner[c]
        chars = [d for d in range(len(text)) if s_owner[d] == g]
        content = [d for d in chars if not text[d].isspace()] or chars
        per_char.append(group_value[g] / len(content) if c in content else 0.0)
    t_starts, t_owner = owner(tgt)
    out = []
    for s, _ in tgt:
        g = t_starts.index(s)
        sharing = sum(1 for x, _ in tgt if x == s)
        out.append(sum(per_char[c] for c in range(len(text)) if t_owner[c] == g) / sharing)
    return np.array(out)


@pytest.mark.parametrize("text", TEXTS)
def test_two_real_tokenizers_match_the_character_reference(text):
    """Two genuinely different BPE tokenizers; each source token's value is its character count."""
    a = build_tokenizer(vocab_size=300)
    b = build_tokenizer(vocab_size=600, seed_texts=[t * 3 for t in TEXTS] + ["completely different corpus"] * 5)
    src, tgt = offsets(a, text), offsets(b, text)
    assert src != tgt or len(text) < 3  # the tokenizations really differ
    values = [float(end - start) for start, end in src]
    got = map_token_values(src, values, tgt, text)
    np.testing.assert_allclose(got, reference_map(src, values, tgt, text), atol=1e-9)
    np.testing.assert_allclose(got.sum(), sum(values), atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_conservation_on_random_values(seed):
    rng = np.random.default_rng(seed)
    a, b = build_tokenizer(vocab_size=280), build_tokenizer(vocab_size=450, seed_texts=TEXTS * 4)
    for text in TEXTS:
        src, tgt = offsets(a, text), offsets(b, text)
        values = rng.normal(size=len(src))
        got = map_token_values(src, values, tgt, text)
        assert got.shape == (len(tgt),)
        np.testing.assert_allclose(got.sum(), values.sum(), atol=1e-9)
        np.testing.assert_allclose(got, reference_map(src, values, tgt, text), atol=1e-9)
        # and mapping onto the same tokenization is the identity (tokens alone in their group)
        alone = [i for i, (s, _) in enumerate(src) if [x for x, _ in src].count(s) == 1]
        same = map_token_values(src, values, src, text)
        np.testing.assert_allclose(same[alone], values[alone], atol=1e-9)


def test_completion_offsets_cover_the_decoded_text():
    tokenizer = build_tokenizer()
    ids = tokenizer("So 47 + 38 = 85.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    text, spans = completion_offsets(tokenizer, ids)
    assert text == "So 47 + 38 = 85.<|im_end|>\n"
    assert "".join(text[s:e] for s, e in spans) == text
    assert [tokenizer.decode([i]) for i in ids] == [text[s:e] for s, e in spans]


def test_map_completion_values_between_two_templates():
    """Chat-template tokens differ around the same content; content maps by characters, the rest as wholes."""
    content = "ab cd"
    source = ("<s>ab cd</s>", [(0, 3), (3, 5), (5, 8), (8, 12)])  # "<s>", "ab", " cd", "</s>"
    target = ("ab cd<|end|>\n", [(0, 1), (1, 5), (5, 12), (12, 13)])  # "a", "b cd", "<|end|>", "\n"
    got = map_completion_values(source, [1.0, 2.0, 4.0, 8.0], target, content)
    # prefix "<s>" (1.0) has no target token before the content: it goes to the first content token.
    # content: "ab" (2.0) spreads over a, b; " cd" (4.0) over c, d -> "a" 1.0, "b cd" 1.0 + 4.0
    # suffix "</s>" (8.0) is shared by "<|end|>" and "\n"
    np.testing.assert_allclose(got, [1.0 + 1.0, 5.0, 4.0, 4.0])
    np.testing.assert_allclose(got.sum(), 15.0)


def test_map_completion_values_needs_the_content():
    with pytest.raises(ValueError, match="not found in the target"):
        map_completion_values(("xy", [(0, 2)]), [1.0], ("zz", [(0, 2)]), "xy")
