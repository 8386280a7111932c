"""The demo's reading of sl's curses output: where the train is, and whether it resumed."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctrmig import demo
from ctrmig.demo import (
    Screen,
    cursor_positions,
    new_output,
    resume_column,
    resumed,
    train_column,
)

ROOT = Path(__file__).resolve().parents[2]
START = "\x1b[?1049h\x1b[22;0;0t\x1b[1;24r\x1b(B\x1b[m\x1b[4l\x1b[?7h\x1b[?25l\x1b[H\x1b[2J"
TRAIN = ("  _D _|  |_", " |(_)---  |", "/     |  |")  # three rows of a locomotive


def frame(x: int) -> str:
    """One frame the way curses draws it: each row addressed, old tail erased."""
    return "".join(f"\x1b[{9 + i};{x}H{row}\x1b[K" for i, row in enumerate(TRAIN))


def run(first: int, last: int) -> str:
    return "".join(frame(x) for x in range(first, last - 1, -1))


def test_train_column_is_the_front_of_the_train() -> None:
    assert train_column(START + run(80, 50)) == 50


def test_blank_or_empty_log_has_no_column() -> None:
    assert train_column("") is None
    assert train_column(START) is None


def test_resume_one_step_on() -> None:
    before, after = START + run(80, 50), run(49, 40)
    assert resume_column(before, after) == 49
    assert resumed(train_column(before), resume_column(before, after))


def test_a_fresh_start_is_not_a_resume() -> None:
    before, after = START + run(80, 50), START + run(80, 70)
    assert resume_column(before, after) == 80
    assert not resumed(train_column(before), resume_column(before, after))


def test_no_output_after_restore_is_not_a_resume() -> None:
    before = START + run(80, 50)
    assert resume_column(before, "") is None
    assert not resumed(train_column(before), None)


def test_rows_shifted_by_delete_character() -> None:
    # curses moves a row left by deleting its first character, not by rewriting it.
    before = START + frame(50)
    after = "".join(f"\x1b[{9 + i};1H\x1b[1P" for i in range(len(TRAIN)))
    assert resume_column(before, after) == 49


def test_relative_moves_cr_backspace_and_partial_addressing() -> None:
    s = Screen()
    s.feed(START + "\x1b[10;40Hab\x1b[12d\bX\r\x1b[5GY")
    assert s.grid[9][39:41] == ["a", "b"]
    assert s.grid[11][40] == "X"  # row 12, column 41 (after "ab", one back)
    assert s.leftmost() == 5
    s.feed("\x1b[12;1H\x1b[2K")
    assert s.leftmost() == 40


def test_alternate_screen_switch_clears() -> None:
    s = Screen()
    s.feed(START + frame(30) + "\x1b[?1049l")
    assert s.leftmost() is None


def test_text_past_the_right_edge_is_clipped() -> None:
    s = Screen()
    s.feed("\x1b[1;79Habcdef")
    assert "".join(s.grid[0][78:]) == "ab"


def test_cursor_positions() -> None:
    assert cursor_positions("\x1b[15;76H_\x1b[16d|\x1b[9;80H_") == [(15, 76), (9, 80)]


def test_new_output_strips_a_carried_over_log() -> None:
    assert new_output("abc", "abcdef") == "def"
    assert new_output("abc", "xyz") == "xyz"
    assert new_output("", "xyz") == "xyz"


@pytest.mark.parametrize(
    ("at_checkpoint", "at_restore", "ok"),
    [(50, 50, True), (50, 49, True), (50, 48, False), (50, 51, False), (None, 50, False),
     (50, None, False)],
)
def test_resumed_allows_one_step(at_checkpoint: int | None, at_restore: int | None,
                                 ok: bool) -> None:
    assert resumed(at_checkpoint, at_restore) is ok


def test_checked_in_containerfile_matches_the_builder() -> None:
    path = ROOT / "containerfiles/screen_locomotive/Containerfile"
    assert path.read_text() == demo.CONTAINERFILE
