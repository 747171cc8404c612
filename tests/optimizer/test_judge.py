"""The judge: verdicts read from odd outputs, both orders combined, and the ΔWR arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimizer.judge import average_delta_wr, build_judge_messages, combine_orders, parse_verdict, tally
from training.evaluate import summarize
from training.records import read_records

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "training"


@pytest.mark.parametrize(("text", "verdict"), [
    ("A is more detailed.\n[[A]]", "A"),
    ("[[ b ]]", "B"),
    ("**Final verdict: [[C]]**", "tie"),
    ("Both are fine. [[Tie]]", "tie"),
    ("At first I thought [[A]].\n\nOn reflection the second is better.\n[[B]]", "B"),
    ("[[A]]\nI hope this helps!", "A"),  # the verdict line need not be the last line
    ("My verdict: [B]", "B"),
    ("Final verdict: Answer B", "B"),
    ("The better answer is (A) because it is correct.", "A"),
    ("Neither stands out; it's a tie.", "tie"),
    ("[[A]] if answer A is better, [[B]] if answer B is better", None),  # the instructions echoed back
    ("I cannot compare these answers.", None),
    ("", None),
])
def test_parse_verdict_reads_odd_judge_outputs(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize(("original_first", "optimized_first", "outcome"), [
    ("B", "A", "win"),  # the optimized answer wins in both orders
    ("A", "B", "loss"),
    ("A", "A", "tie"),  # the verdict flips with the order: position bias, a tie
    ("B", "B", "tie"),
    ("B", "tie", "win"),
    ("tie", "B", "loss"),
    ("tie", "tie", "tie"),
    (None, "A", "invalid"),
    ("B", None, "invalid"),
])
def test_both_orders_combine_into_one_outcome(original_first: str | None, optimized_first: str | None,
                                              outcome: str) -> None:
    assert combine_orders(original_first, optimized_first) == outcome  # type: ignore[arg-type]


def test_judge_sees_the_original_request_and_both_answers_in_the_given_order() -> None:
    user = build_judge_messages("Q?", "first answer", "second answer")[1]["content"]
    assert "[REQUEST]\nQ?\n[/REQUEST]" in user
    assert user.index("[ANSWER A]\nfirst answer") < user.index("[ANSWER B]\nsecond answer")


def test_delta_wr_arithmetic_on_a_fixed_verdict_file() -> None:
    records = read_records(FIXTURES / "verdicts.jsonl")
    summary = summarize(records)
    alpha, beta = summary.tallies
    assert (alpha.name, alpha.win, alpha.tie, alpha.loss, alpha.invalid) == ("alpha", 4, 3, 2, 1)
    assert alpha.judged == 9
    assert alpha.percent(alpha.win) == pytest.approx(400 / 9)
    assert alpha.delta_wr == pytest.approx(200 / 9)  # (4 - 2) / 9 judged
    assert (beta.win, beta.tie, beta.loss, beta.invalid) == (1, 1, 2, 0)
    assert beta.delta_wr == pytest.approx(-25.0)
    assert summary.average_delta_wr == pytest.approx((200 / 9 - 25.0) / 2)
    assert summary.offline["beta"]["copy_rate"] == pytest.approx(0.25)
    assert summary.offline["alpha"]["copy_rate"] == 0.0
    as_dict = summary.as_dict()
    assert as_dict["sets"]["alpha"]["delta_wr"] == pytest.approx(22.2222, abs=1e-3)


def test_an_empty_set_has_no_delta_and_is_left_out_of_the_average() -> None:
    empty = tally("empty", [])
    assert empty.delta_wr == 0.0 and empty.percent(0) == 0.0
    assert average_delta_wr([empty, tally("x", ["win", "loss", "win"])]) == pytest.approx(100 / 3)
