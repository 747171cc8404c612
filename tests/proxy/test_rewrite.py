"""The pure find/replace of the last user message's text."""

from __future__ import annotations

import copy

from proxy.rewrite import find_last_user_text, replace_user_text


def test_plain_string_is_found_and_replaced_without_touching_the_input() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "be nice"},
                                       {"role": "user", "content": "hi", "name": "ann"}], "n": 2}
    before = copy.deepcopy(body)
    turn = find_last_user_text(body["messages"])
    assert turn is not None and turn.texts == ("hi",) and turn.part_indexes is None
    new = replace_user_text(body, turn, ["hello there"])
    assert body == before
    assert new["messages"][1] == {"role": "user", "content": "hello there", "name": "ann"}
    assert new["messages"][0] is body["messages"][0]
    assert {k: v for k, v in new.items() if k != "messages"} == {"model": "m", "n": 2}


def test_each_text_part_is_replaced_and_other_parts_keep_their_place() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    content = [{"type": "text", "text": "look"}, image, {"type": "text", "text": "what is it?"}]
    body = {"messages": [{"role": "user", "content": content}]}
    turn = find_last_user_text(body["messages"])
    assert turn is not None and turn.texts == ("look", "what is it?") and turn.part_indexes == (0, 2)
    new = replace_user_text(body, turn, ["LOOK", "WHAT?"])
    assert new["messages"][0]["content"] == [{"type": "text", "text": "LOOK"}, image,
                                             {"type": "text", "text": "WHAT?"}]
    assert content[0]["text"] == "look"


def test_turns_that_do_not_end_with_user_text_are_left_alone() -> None:
    assert find_last_user_text([]) is None
    assert find_last_user_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) is None
    assert find_last_user_text([{"role": "tool", "tool_call_id": "1", "content": "42"}]) is None
    assert find_last_user_text([{"role": "user", "content": "   "}]) is None
    assert find_last_user_text([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]) is None
