"""The queue's pure core: admission and bookkeeping."""

from __future__ import annotations

import pytest

from services.gateway.queue import Admission, QueueBook

A, F = Admission.ADMITTED, Admission.FULL


@pytest.mark.parametrize(("steps", "expected_depth"), [
    # (op, function, limit) -> expected admission for "enter"
    ([("enter", "f", 1, A)], 1),
    ([("enter", "f", 1, A), ("enter", "f", 1, F)], 1),
    ([("enter", "f", 2, A), ("enter", "f", 2, A), ("enter", "f", 2, F)], 2),
    ([("enter", "f", 1, A), ("leave", "f", 0, None), ("enter", "f", 1, A)], 1),
    ([("enter", "f", 1, A), ("enter", "g", 1, A), ("enter", "g", 1, F)], 1),
    ([("enter", "f", 3, A), ("leave", "f", 0, None)], 0),
])
def test_admission_table(steps: list[tuple[str, str, int, Admission | None]], expected_depth: int) -> None:
    book = QueueBook()
    for op, function_id, limit, want in steps:
        if op == "enter":
            assert book.enter(function_id, limit) is want
        else:
            book.leave(function_id)
    assert book.depth("f") == expected_depth


def test_leave_without_enter_is_a_bug() -> None:
    with pytest.raises(RuntimeError, match="leave"):
        QueueBook().leave("f")


def test_zero_depths_are_reported_once_then_pruned() -> None:
    book = QueueBook()
    book.enter("f", 5)
    book.enter("g", 5)
    book.leave("g")
    assert book.depths() == {"f": 1, "g": 0}
    book.prune()
    assert book.depths() == {"f": 1}
