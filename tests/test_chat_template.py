"""Chat prompts against the official Gemma chat templates, run by transformers' apply_chat_template.

Two renderers are checked. The built-in one (for checkpoints without a template) must write what the
official templates write; the checkpoint-template one must render any template exactly as
transformers does, with each family's official template (tests/data/chat_templates, sources in its
README) as the test case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gemmakit.chat import looks_instruction_tuned, pretrained_warning, render_chat
from gemmakit.errors import InvalidRequestError

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
OFFICIAL = {name: (TEMPLATES / f"google-{name}-it.jinja").read_text(encoding="utf-8")
            for name in ("gemma-2", "gemma-3", "gemma-3n", "gemma-4")}
GEMMA_1_2_TEMPLATE = OFFICIAL["gemma-2"]  # Gemma 1 (gemma-7b-it), CodeGemma and Gemma 2 ship the same text
GEMMA_3_TEMPLATE = OFFICIAL["gemma-3"]

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
def tiny_tokenizer(tmp_path_factory):
    """gemmakit's tokenizer of the tiny vocabulary (no chat template of its own)."""
    from gemmakit.checkpoints import open_checkpoint
    from tiny import random_model, tiny_config, write_gguf

    path = tmp_path_factory.mktemp("tok") / "t.gguf"
    return open_checkpoint(write_gguf(path, random_model(tiny_config(num_layers=1)))).tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_tokenizer, tmp_path_factory):
    """The same vocabulary as a transformers tokenizer: the oracle's special tokens are ours."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("hf")
    tiny_tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def official(tokenizer, template: str, messages, add_generation_prompt: bool = True, **kwargs) -> str:
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                        add_generation_prompt=add_generation_prompt, **kwargs)
    assert out.startswith("<bos>")
    return out.removeprefix("<bos>")


def with_template(tokenizer, template: str | None):
    """``tokenizer`` carrying ``template`` as its checkpoint's chat template (a shallow copy)."""
    import copy

    out = copy.copy(tokenizer)
    out.chat_template = template
    return out


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


# --- the checkpoint's own template -----------------------------------------------------------------

PARTS_CONVERSATION = [{"role": "system", "content": [{"type": "text", "text": "Describe images."}]},
                      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is this? "}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A cat. "}]},
                      {"role": "user", "content": [{"type": "text", "text": "Sure?"}, {"type": "image"}]}]
WITH_SYSTEM = ["gemma-3", "gemma-3n", "gemma-4"]  # Gemma 1/2 refuse a system role


@pytest.mark.parametrize("family", list(OFFICIAL))
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_checkpoint_template_matches_transformers(tiny_tokenizer, hf_tokenizer, family, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    tokenizer = with_template(tiny_tokenizer, OFFICIAL[family])
    assert render_chat(messages, add_generation_prompt, tokenizer=tokenizer) == official(
        hf_tokenizer, OFFICIAL[family], messages, add_generation_prompt)


@pytest.mark.parametrize("family", WITH_SYSTEM)
@pytest.mark.parametrize("name", [*SYSTEM_CONVERSATIONS, "parts"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_checkpoint_template_system_and_parts(tiny_tokenizer, hf_tokenizer, family, name, add_generation_prompt):
    messages = PARTS_CONVERSATION if name == "parts" else SYSTEM_CONVERSATIONS[name]
    tokenizer = with_template(tiny_tokenizer, OFFICIAL[family])
    assert render_chat(messages, add_generation_prompt, tokenizer=tokenizer) == official(
        hf_tokenizer, OFFICIAL[family], messages, add_generation_prompt)


def test_gemma3_template_is_what_the_builtin_renderer_writes(tiny_tokenizer):
    tokenizer = with_template(tiny_tokenizer, GEMMA_3_TEMPLATE)
    for messages in [*CONVERSATIONS.values(), *SYSTEM_CONVERSATIONS.values()]:
        assert render_chat(messages, tokenizer=tokenizer) == render_chat(messages)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city."},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
TOOL_CHAT = [{"role": "system", "content": "Be helpful."},
             {"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function",
                  "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
             {"role": "assistant", "content": "It is 18 C and sunny."},
             {"role": "user", "content": "Thanks!"}]


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": True}], ids=["plain", "thinking"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma4_tools_and_variables_pass_through(tiny_tokenizer, hf_tokenizer, kwargs, add_generation_prompt):
    tokenizer = with_template(tiny_tokenizer, OFFICIAL["gemma-4"])
    ours = render_chat(TOOL_CHAT, add_generation_prompt, tokenizer=tokenizer, tools=[WEATHER_TOOL], **kwargs)
    assert ours == official(hf_tokenizer, OFFICIAL["gemma-4"], TOOL_CHAT, add_generation_prompt,
                            tools=[WEATHER_TOOL], **kwargs)
    assert "get_weather" in ours and "<|tool_call>" in ours


def test_gemma1_2_template_gets_the_system_message_folded_in(tiny_tokenizer, hf_tokenizer):
    """Their template refuses a system role; gemmakit renders it as the user writing it at the top of
    the first turn, which is the built-in renderer's text too."""
    tokenizer = with_template(tiny_tokenizer, GEMMA_1_2_TEMPLATE)
    for messages in SYSTEM_CONVERSATIONS.values():
        folded = messages[0]["content"].strip() + "\n\n" + messages[1]["content"].strip()
        by_hand = [{"role": "user", "content": folded}, *messages[2:]]
        assert render_chat(messages, tokenizer=tokenizer) == official(hf_tokenizer, GEMMA_1_2_TEMPLATE, by_hand)
    messages = SYSTEM_CONVERSATIONS["system"]
    assert render_chat(messages, tokenizer=tokenizer) == render_chat(messages)


@pytest.mark.parametrize("template, messages, fragment", [
    (GEMMA_3_TEMPLATE, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "refuses this chat: Conversation roles must alternate"),
    (GEMMA_1_2_TEMPLATE, [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "refuses this chat: System role not supported"),
    ("{{ messages[0].content + 1 }}", [{"role": "user", "content": "a"}], r"failed on this chat \(TypeError"),
    ("{{ bos_token }}{% for m in messages %}{{ m.content }", [{"role": "user", "content": "a"}],
     "has a syntax error on line 1"),
    ("{{ messages[0].content | no_such_filter }}", [{"role": "user", "content": "a"}], "syntax error"),
    (GEMMA_3_TEMPLATE, [], "at least one message"),
], ids=["alternation", "system-then-model", "str-plus-int", "unclosed-tag", "unknown-filter", "empty"])
def test_template_errors_are_one_line_invalid_requests(tiny_tokenizer, template, messages, fragment):
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        render_chat(messages, tokenizer=with_template(tiny_tokenizer, template))
    assert "\n" not in str(info.value)


def test_templates_run_in_the_sandbox(tiny_tokenizer):
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(InvalidRequestError, match="failed on this chat"):
        render_chat([{"role": "user", "content": "a"}], tokenizer=with_template(tiny_tokenizer, escape))
    mutate = "{% set x = messages.append(1) %}{{ messages | length }}"
    with pytest.raises(InvalidRequestError, match="failed on this chat"):
        render_chat([{"role": "user", "content": "a"}], tokenizer=with_template(tiny_tokenizer, mutate))


def test_template_helpers_as_transformers_gives_them(tiny_tokenizer, hf_tokenizer):
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}"
                "{% endif %}{% set ns.n = ns.n + 1 %}{{ m | tojson }}{% endfor %}|{{ ns.n }}|{{ eos_token }}"
                "|{{ dict(a=1) | tojson }}|{{ tools | tojson }}|{{ add_generation_prompt }}\n  {% if true %}\n"
                "x{% endif %}")
    messages = [{"role": "system", "content": "<s> & é"}, {"role": "user", "content": "ü", "name": None}]
    ours = render_chat(messages, tokenizer=with_template(tiny_tokenizer, template))
    assert ours == hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                     add_generation_prompt=True)
    assert '"ü"' in ours and "name" not in ours


# --- <bos>: written by the template, added by the tokenizer, never both ---------------------------

@pytest.mark.parametrize("family", ["gemma-2", "gemma-3"])
def test_prompt_ids_have_one_bos_and_match_transformers(tiny_tokenizer, hf_tokenizer, family):
    tokenizer = with_template(tiny_tokenizer, OFFICIAL[family])
    messages = CONVERSATIONS["multi-turn-whitespace"]
    text = render_chat(messages, tokenizer=tokenizer)
    assert not text.startswith("<bos>")
    ids = tokenizer.encode(text, add_bos=True)
    assert ids.count(tokenizer.bos_id) == 1 and ids[0] == tokenizer.bos_id
    assert ids == hf_tokenizer.apply_chat_template(messages, chat_template=OFFICIAL[family],
                                                   add_generation_prompt=True, return_dict=False)


def test_a_template_without_bos_is_left_as_it_is(tiny_tokenizer):
    template = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert render_chat([{"role": "user", "content": "a"}], tokenizer=with_template(tiny_tokenizer, template)) == "[a]"


# --- where templates come from ----------------------------------------------------------------------

def test_gguf_chat_template_is_used(tmp_path):
    import gemmakit
    from tiny import random_model, tiny_config, write_gguf

    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    path = write_gguf(tmp_path / "t.gguf", random_model(tiny_config(num_layers=1)), chat_template=template)
    _, tokenizer = gemmakit.load(path)
    assert tokenizer.chat_template == template
    assert render_chat([{"role": "user", "content": "hi"}], tokenizer=tokenizer) == "<user>hi"
    plain = write_gguf(tmp_path / "plain.gguf", random_model(tiny_config(num_layers=1)))
    assert gemmakit.load(plain)[1].chat_template is None


def test_hf_directory_templates(tiny_tokenizer, tmp_path):
    import json

    from gemmakit.tokenizer import Tokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    assert Tokenizer.from_directory(tmp_path).chat_template is None
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": GEMMA_3_TEMPLATE}))
    tokenizer = Tokenizer.from_directory(tmp_path)
    assert tokenizer.chat_template == GEMMA_3_TEMPLATE
    # a list of named templates: the "default" one
    config_path.write_text(json.dumps({**config, "chat_template": [{"name": "tool_use", "template": "T"},
                                                                   {"name": "default", "template": "D"}]}))
    assert Tokenizer.from_directory(tmp_path).chat_template == "D"
    # chat_template.jinja beside it wins over the config, as in transformers
    (tmp_path / "chat_template.jinja").write_text(OFFICIAL["gemma-4"], encoding="utf-8")
    tokenizer = Tokenizer.from_directory(tmp_path)
    assert tokenizer.chat_template == OFFICIAL["gemma-4"]
    assert render_chat([{"role": "user", "content": "hi"}], tokenizer=tokenizer).startswith("<|turn>user\nhi<turn|>")
    # and save_pretrained keeps it where transformers reads it
    tokenizer.save_pretrained(tmp_path / "again")
    assert Tokenizer.from_directory(tmp_path / "again").chat_template == OFFICIAL["gemma-4"]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "again").chat_template == OFFICIAL["gemma-4"]


def test_processor_chat_template_json(tiny_tokenizer, tmp_path):
    import json

    from gemmakit.tokenizer import Tokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": GEMMA_3_TEMPLATE}))
    assert Tokenizer.from_directory(tmp_path).chat_template == GEMMA_3_TEMPLATE


def test_quantised_gguf_keeps_the_template(tmp_path):
    import gemmakit
    from gemmakit.checkpoints.gguf_writer import quantize_checkpoint
    from tiny import random_model, tiny_config, write_gguf

    source = write_gguf(tmp_path / "t.gguf", random_model(tiny_config(num_layers=1)), chat_template=GEMMA_3_TEMPLATE)
    quantize_checkpoint(source, tmp_path / "q.gguf", "int8")
    assert gemmakit.load(tmp_path / "q.gguf")[1].chat_template == GEMMA_3_TEMPLATE


# --- the warning for a pretrained model ----------------------------------------------------------

@pytest.mark.parametrize("source, tuned", [
    ("gemma-3-1b-it.gguf", True), ("/models/gemma-2-9b-it/", True), ("gemma-3-270m-it-Q4_K_M.gguf", True),
    ("hub/models--google--gemma-3-4b-it/snapshots/abc", True), ("Gemma-7B-Instruct.gguf", True),
    ("codegemma_it.gguf", True), ("gemma-3-270m-q4_k_m.gguf", False), ("/home/kit/gemma-2b.gguf", False),
    ("/srv/git/gemma-2b/", False), (None, False),
])
def test_looks_instruction_tuned(source, tuned):
    assert looks_instruction_tuned(source) is tuned


def test_pretrained_warning(tiny_tokenizer):
    line = pretrained_warning(tiny_tokenizer, "/models/gemma-3-270m-q4_k_m.gguf")
    assert line == ("gemmakit: warning: gemma-3-270m-q4_k_m.gguf has no chat template and looks pretrained, so chat "
                    "replies may just continue or repeat the text; use an instruction-tuned (-it) checkpoint")
    assert pretrained_warning(tiny_tokenizer, "/models/gemma-3-270m-it.gguf") is None
    assert pretrained_warning(with_template(tiny_tokenizer, GEMMA_3_TEMPLATE), "/models/base.gguf") is None
    assert pretrained_warning(None, "/models/base.gguf") is None


THOUGHTFUL = [{"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "<|channel>thought\nadd them<channel|>4"},
              {"role": "user", "content": "and 3+3?"}]


@pytest.mark.parametrize("thinking", [False, True], ids=["plain", "thinking"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_gemma4_turns_are_what_the_official_template_writes(hf_tokenizer, thinking, add_generation_prompt):
    from gemmakit.chat import render_builtin

    # (the official template writes a system message's content list as Python would print it; the
    # built-in renderer takes its text, so the parts chat here has a plain system string)
    parts = [{"role": "system", "content": "Describe images."}, *PARTS_CONVERSATION[1:]]
    for messages in [*CONVERSATIONS.values(), *SYSTEM_CONVERSATIONS.values(), THOUGHTFUL, parts]:
        ours = render_builtin(messages, add_generation_prompt, turns="gemma4", enable_thinking=thinking)
        assert ours == official(hf_tokenizer, OFFICIAL["gemma-4"], messages, add_generation_prompt,
                                enable_thinking=thinking)


def test_thought_splitter_separates_thoughts_from_the_answer_across_pieces():
    from gemmakit.chat.thinking import ThoughtSplitter

    reply = "<|channel>thought\nFirst, add.\nThen check.<channel|>The answer is 4."
    for size in (1, 2, 3, 7, len(reply)):
        splitter = ThoughtSplitter()
        events = [e for i in range(0, len(reply), size) for e in splitter.push(reply[i:i + size])]
        events += splitter.flush()
        assert "".join(t for k, t in events if k == "thought") == "First, add.\nThen check."
        assert "".join(t for k, t in events if k == "answer") == "The answer is 4."
        assert (splitter.thought, splitter.answer) == ("First, add.\nThen check.", "The answer is 4.")
    plain = ThoughtSplitter()
    assert plain.push("no thoughts <here> <|chan") == [("answer", "no thoughts <here> ")]  # a marker may follow
    assert plain.push("ged") + plain.flush() == [("answer", "<|changed")]
