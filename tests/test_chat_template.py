"""render_chat against the official Gemma chat templates, run by transformers' apply_chat_template.

The template strings are the ones in the hub repositories' tokenizer_config.json
(google/gemma-7b-it and google/gemma-2-9b-it share the first; google/gemma-3-*-it the second).
"""

from __future__ import annotations

import pytest

from gemmakit.chat_template import render_chat
from gemmakit.errors import InvalidRequestError

transformers = pytest.importorskip("transformers")

GEMMA_1_2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA_3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

CONVERSATIONS = {
    "one-turn": [{"role": "user", "content": "Hello!"}],
    "multi-turn-whitespace": [{"role": "user", "content": "  Write a poem.\n"},
                              {"role": "assistant", "content": "\nRoses are red \n"},
                              {"role": "user", "content": "Another,  please.\n\n"}],
    "model-role": [{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"},
                   {"role": "user", "content": "bye"}],
    "unicode": [{"role": "user", "content": "Grüße, 世界 🌍"}],
}
SYSTEM_CONVERSATIONS = {
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    "system-whitespace": [{"role": "system", "content": " Be kind. \n"}, {"role": "user", "content": "  hi  "},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "ok"}],
}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from gemmakit.checkpoints import open_checkpoint
    from tiny import random_model, tiny_config, write_gguf

    path = tmp_path_factory.mktemp("tok")
    open_checkpoint(write_gguf(path / "t.gguf", random_model(tiny_config(num_layers=1)))).tokenizer.save_pretrained(
        path / "hf")
    return AutoTokenizer.from_pretrained(path / "hf")


def official(tokenizer, template: str, messages, add_generation_prompt: bool = True) -> str:
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                        add_generation_prompt=add_generation_prompt)
    assert out.startswith("<bos>")
    return out.removeprefix("<bos>")


@pytest.mark.parametrize("template", [GEMMA_1_2_TEMPLATE, GEMMA_3_TEMPLATE], ids=["gemma1-2", "gemma3"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_official_templates(hf_tokenizer, template, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    assert render_chat(messages, add_generation_prompt) == official(hf_tokenizer, template, messages,
                                                                    add_generation_prompt)


@pytest.mark.parametrize("name", list(SYSTEM_CONVERSATIONS))
def test_system_message_folds_as_gemma3_does(hf_tokenizer, name):
    messages = SYSTEM_CONVERSATIONS[name]
    assert render_chat(messages) == official(hf_tokenizer, GEMMA_3_TEMPLATE, messages)


def test_gemma1_2_have_no_system_role(hf_tokenizer):
    """The official Gemma 1/2 template refuses a system message; gemmakit folds it (as Gemma 3 does),
    which is the same text as the user writing it at the top of the first turn."""
    messages = SYSTEM_CONVERSATIONS["system"]
    with pytest.raises(Exception, match="System role not supported"):
        official(hf_tokenizer, GEMMA_1_2_TEMPLATE, messages)
    by_hand = [{"role": "user", "content": "You are terse.\n\nWhy is the sky blue?"}]
    assert render_chat(messages) == official(hf_tokenizer, GEMMA_1_2_TEMPLATE, by_hand)


def test_multimodal_content_parts(hf_tokenizer):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Describe images."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is this? "}]}]
    assert render_chat(messages) == official(hf_tokenizer, GEMMA_3_TEMPLATE, messages)


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
], ids=["starts-with-model", "two-users", "system-then-model"])
def test_roles_must_alternate_like_the_official_templates(hf_tokenizer, messages):
    with pytest.raises(Exception, match="alternate"):
        official(hf_tokenizer, GEMMA_3_TEMPLATE, messages)
    with pytest.raises(InvalidRequestError, match="alternate"):
        render_chat(messages)


@pytest.mark.parametrize("messages, fragment", [
    ([], "at least one"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only come first"),
    ([{"role": "tool", "content": "a"}], "unknown role"),
    ([{"role": "user", "content": None}], "no text content"),
])
def test_bad_messages(messages, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        render_chat(messages)
