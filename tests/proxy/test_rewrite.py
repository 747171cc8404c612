"""The pure find/replace of a user turn's text: one turn, one prompt (chat's shape, and any content value)."""

from __future__ import annotations

import copy

from proxy.rewrite import PART_SEPARATOR, TurnPrompt, put_back, turn_prompt
from proxy.shapes import CHAT

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def test_plain_string_is_found_and_replaced_without_touching_the_input() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "be nice"},
                                       {"role": "user", "content": "hi", "name": "ann"}], "n": 2}
    before = copy.deepcopy(body)
    turn = CHAT.newest_turn(body)
    assert turn is not None and turn.prompt == TurnPrompt("hi", None)
    new = CHAT.put_back(body, [(turn, "hello there")])
    assert body == before
    assert new["messages"][1] == {"role": "user", "content": "hello there", "name": "ann"}
    assert new["messages"][0] is body["messages"][0]
    assert {k: v for k, v in new.items() if k != "messages"} == {"model": "m", "n": 2}


def test_text_parts_are_one_prompt_put_back_in_the_first_text_part() -> None:
    content = [IMAGE, {"type": "text", "text": "Describe the chart"}, {"type": "input_audio", "input_audio": {}},
               {"type": "text", "text": "   "}, {"type": "text", "text": "Be brief."}, IMAGE]
    before = copy.deepcopy(content)
    body = {"messages": [{"role": "user", "content": content}]}
    turn = CHAT.newest_turn(body)
    assert turn is not None
    assert turn.prompt.text == "Describe the chart" + PART_SEPARATOR + "Be brief."
    assert turn.prompt.part_indexes == (1, 3, 4)
    new = CHAT.put_back(body, [(turn, "REWRITE")])
    assert new["messages"][0]["content"] == [IMAGE, {"type": "text", "text": "REWRITE"},
                                             {"type": "input_audio", "input_audio": {}}, IMAGE]
    assert content == before


def test_put_back_keeps_a_text_parts_other_fields_and_works_for_any_part_type() -> None:
    content = [{"type": "input_text", "text": "a", "cache_control": {"type": "ephemeral"}},
               {"type": "input_image", "image_url": "x"}, {"type": "input_text", "text": "b"}]
    prompt = turn_prompt(content, text_types={"input_text"})
    assert prompt == TurnPrompt("a\nb", (0, 2))
    assert put_back(content, prompt, "AB") == [
        {"type": "input_text", "text": "AB", "cache_control": {"type": "ephemeral"}},
        {"type": "input_image", "image_url": "x"}]
    assert turn_prompt(content) is None  # chat's text type is "text": nothing to rewrite here


def test_many_parts_are_one_pass() -> None:
    content = [{"type": "text", "text": f"p{i}"} for i in range(20_000)]
    prompt = turn_prompt(content)
    assert prompt is not None and prompt.text.count(PART_SEPARATOR) == 19_999
    assert put_back(content, prompt, "one") == [{"type": "text", "text": "one"}]


def test_turns_that_do_not_end_with_user_text_are_left_alone() -> None:
    for messages in ([], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     [{"role": "tool", "tool_call_id": "1", "content": "42"}], [{"role": "user", "content": "   "}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                     [{"role": "user", "content": [{"type": "text", "text": " "}]}],
                     [{"role": "user", "content": None}]):
        assert CHAT.newest_turn({"messages": messages}) is None, messages
