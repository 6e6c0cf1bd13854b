"""Every row of the bad-input table raises its error with its message; the docs page is current."""

from pathlib import Path

import pytest

from tests.bad_inputs import ROWS, markdown

PAGE = Path(__file__).parents[1] / "docs" / "bad_inputs.md"


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_bad_input_is_refused_with_its_message(row):
    with pytest.raises(row.error, match=row.match):
        row.call()


def test_the_page_of_bad_inputs_is_current():
    assert PAGE.read_text() == markdown(), "regenerate it: python -m tests.bad_inputs > docs/bad_inputs.md"
