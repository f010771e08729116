import numpy as np
import pytest

from ckt_jax.data import templates, text_noise

# Synthetic benign text, long enough for rate estimates to settle. It has no one-letter words,
# so a dropped letter never removes a word and word lists stay aligned.
LONG_TEXT = ("The quick brown fox jumps over the lazy dog while the gentle breeze moves the tall "
             "grass near the quiet river bank. ") * 60

NOISE_FUNCTIONS = [text_noise.char_typos, text_noise.case_noise, text_noise.whitespace_noise]


def _letters(text):
    return sum(char.isalpha() for char in text)


@pytest.mark.parametrize("noise", NOISE_FUNCTIONS)
def test_noise_deterministic_for_seed(noise):
    first = noise(LONG_TEXT, 0.1, np.random.default_rng(7))
    second = noise(LONG_TEXT, 0.1, np.random.default_rng(7))
    other = noise(LONG_TEXT, 0.1, np.random.default_rng(8))
    assert first == second
    assert first != other
    assert first != LONG_TEXT


@pytest.mark.parametrize("noise", NOISE_FUNCTIONS)
def test_noise_rate_zero_is_identity(noise):
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert noise(LONG_TEXT, 0.0, rng) == LONG_TEXT
    assert rng.bit_generator.state == state


@pytest.mark.parametrize("noise", NOISE_FUNCTIONS)
def test_noise_rejects_invalid_rate(noise):
    with pytest.raises(ValueError, match="rate"):
        noise("abc", 1.5, np.random.default_rng(0))


def test_case_noise_share_matches_rate():
    rate = 0.2
    noisy = text_noise.case_noise(LONG_TEXT, rate, np.random.default_rng(1))
    flipped = sum(a != b for a, b in zip(LONG_TEXT, noisy))
    assert len(noisy) == len(LONG_TEXT)
    assert noisy.casefold() == LONG_TEXT.casefold()
    assert abs(flipped / _letters(LONG_TEXT) - rate) < 0.02


def test_char_typos_share_matches_rate():
    rate = 0.1
    trials = 20
    changed_words = 0
    words = LONG_TEXT.split()
    for seed in range(trials):
        noisy = text_noise.char_typos(LONG_TEXT, rate, np.random.default_rng(seed))
        changed_words += sum(a != b for a, b in zip(words, noisy.split()))
    # A word of n letters escapes all typos with probability (1 - rate) ** n.
    expected = sum(1 - (1 - rate) ** _letters(word) for word in words) * trials
    assert abs(changed_words / expected - 1) < 0.1


def test_char_typos_keep_non_letters():
    text = "1234 5678, 90!? " * 20
    assert text_noise.char_typos(text, 1.0, np.random.default_rng(0)) == text


def test_char_typos_length_change_bounded():
    noisy = text_noise.char_typos(LONG_TEXT, 0.05, np.random.default_rng(3))
    # Drops and inserts are equally likely, so the length stays close to the original.
    assert abs(len(noisy) - len(LONG_TEXT)) < 0.02 * len(LONG_TEXT)


def test_whitespace_noise_share_matches_rate():
    rate = 0.3
    noisy = text_noise.whitespace_noise(LONG_TEXT, rate, np.random.default_rng(2))
    assert noisy.replace(" ", "").replace("\n", "") == LONG_TEXT.replace(" ", "")
    spaces = LONG_TEXT.count(" ")
    kept_words = len(noisy.split())
    # One chosen space in three is removed, which joins two words.
    joined = len(LONG_TEXT.split()) - kept_words
    assert abs(joined / spaces - rate / 3) < 0.03


def test_wrap_with_template_rate():
    wrappers = [templates.Template("a", "A", "Alpha: {{ prompt }}"), "Beta: {{prompt}}"]
    rng = np.random.default_rng(5)
    results = [text_noise.wrap_with_template("bake bread", wrappers, 0.4, rng) for _ in range(2000)]
    wrapped = [r for r in results if r != "bake bread"]
    assert abs(len(wrapped) / len(results) - 0.4) < 0.04
    assert set(wrapped) == {"Alpha: bake bread", "Beta: bake bread"}
    assert text_noise.wrap_with_template("x", wrappers, 0.0, rng) == "x"
    assert text_noise.wrap_with_template("x", [], 0.0, rng) == "x"
    with pytest.raises(ValueError):
        text_noise.wrap_with_template("x", [], 0.5, rng)


@pytest.mark.parametrize("config", [
    text_noise.TextNoiseConfig(typo_rate=0.05, case_rate=0.05, whitespace_rate=0.05,
                               template_rate=1.0),
    {"typo_rate": 0.05, "case_rate": 0.05, "whitespace_rate": 0.05, "template_rate": 1.0},
])
def test_apply_text_noise_composes(config):
    wrappers = ["Frame: {{ prompt }} :end"]
    first = text_noise.apply_text_noise(LONG_TEXT, config, np.random.default_rng(9), wrappers)
    second = text_noise.apply_text_noise(LONG_TEXT, config, np.random.default_rng(9), wrappers)
    assert first == second
    assert first.startswith("Frame: ")
    assert first.endswith(" :end")
    assert first[len("Frame: "):-len(" :end")] != LONG_TEXT


def test_apply_text_noise_zero_is_identity():
    rng = np.random.default_rng(0)
    assert text_noise.apply_text_noise(LONG_TEXT, text_noise.TextNoiseConfig(), rng) == LONG_TEXT
    assert text_noise.apply_text_noise(LONG_TEXT, {}, rng) == LONG_TEXT
