"""The generated reference pages under docs/ match the code they are generated from."""

import pytest

from ckt_jax import docs

REGENERATE = "run `python -m ckt_jax.docs` and commit the result"


def test_configuration_page_is_current():
    expected = docs.render_config_reference()
    assert docs.CONFIG_PAGE.read_text() == expected, f"docs/configuration.md is stale; {REGENERATE}"


def test_losses_page_is_current():
    expected = docs.render_loss_reference()
    assert docs.LOSSES_PAGE.read_text() == expected, f"docs/losses.md is stale; {REGENERATE}"


def test_every_loss_term_documented():
    from ckt_jax import losses

    page = docs.LOSSES_PAGE.read_text()
    for name in losses.__all__:
        assert f"`{name}`" in page, name


def test_config_comments_parsed():
    source = (
        "def get_config():\n"
        "    c.a = 1  # Trailing comment.\n"
        "    # Block comment\n"
        "    # on two lines.\n"
        "    c.b = 'x'\n"
        "\n"
        "    c.c = 2\n")
    assert docs.config_comments(source) == {"a": "Trailing comment.",
                                            "b": "Block comment on two lines."}


def test_numeric_field_without_unit_rejected():
    with pytest.raises(KeyError, match="'data.new_limit' has no unit"):
        docs._unit("data.new_limit", 3)
