"""The one comparison of greedy ids with the recorded reference, shared by the real-model tests."""

from __future__ import annotations

from gemmakit.engine.generate import generate_steps


def assert_greedy_matches_golden(model, golden: dict, near_tie: float) -> None:
    """Greedy ids equal the reference's up to the first position whose top-2 margin is below
    ``near_tie`` (there a tiny numerical difference may pick the other token, and after it the
    texts legitimately part)."""
    for case in golden["cases"]:
        want = case["greedy_ids"]
        got = [o.tokens[0] for o in generate_steps(model, [case["prompt_ids"]], len(want))]
        for i, (a, b) in enumerate(zip(got, want)):
            if a != b:
                margin = case["top2_margin"][i]
                assert margin < near_tie, f"{case['prompt']!r}: differs at {i} where the margin is {margin}"
                break
