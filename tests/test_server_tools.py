"""Tool breakpoints (``tools.N.cache_control``) with a chat template that renders tools.

The checkpoint is random:tiny with its chat template replaced by one that writes the tool
definitions (one JSON line each) before the conversation, and — like most real templates — looks
at ``messages[0]``, so the tools cannot be rendered without the messages.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anthropic import Anthropic
from test_server_harness import Server, nonce, running, serve, text_of_tokens, tiny_engine

from promptcache.model.shapes import random_checkpoint
from promptcache.sequences import common_prefix_len

BLOCK = 16
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>tools\\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endif %}"
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    checkpoint = tmp_path_factory.mktemp("tools") / "tiny-tools"
    shutil.copytree(random_checkpoint("tiny"), checkpoint)
    config_path = checkpoint / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    with running(tiny_engine(model=str(checkpoint))) as aengine, serve(aengine) as srv:
        yield srv


def _tool(name: str, description: str, ttl: str | None = None) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": name, "description": description,
                            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}
    if ttl is not None:
        tool["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    return tool


def _tokens_through_line_of(server: Server, messages: list[dict[str, str]], tools: list[dict[str, Any]],
                            marker: str) -> int:
    """Tokens entirely before the end of the line holding ``marker`` (a tool's JSON line)."""
    tok = server.engine.tokenizer
    template_tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                        "parameters": t["input_schema"]}} for t in tools]
    text = tok.render_chat(messages, tools=template_tools)
    end = text.index("\n", text.index(marker)) + 1
    head, full = tok.encode(text[:end], add_special_tokens=False), tok.encode(text, add_special_tokens=False)
    return common_prefix_len(head, full)


def test_tool_breakpoints_cover_the_tool_definitions(server: Server) -> None:
    server.aengine.call(lambda e: e.reset_prefix_cache())
    client = Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    model = server.engine.model_name
    tok = server.engine.tokenizer
    first, second = text_of_tokens(tok, 200, nonce()), text_of_tokens(tok, 100, nonce())
    tools = [_tool("search", first, "1h"), _tool("lookup", second, "5m"), _tool("last", "No breakpoint.")]
    messages: Any = [{"role": "user", "content": "Which tool?"}]
    m = client.messages.create(model=model, max_tokens=1, tools=tools, messages=messages)  # type: ignore[arg-type]
    bp1 = _tokens_through_line_of(server, messages, tools, first)
    bp2 = _tokens_through_line_of(server, messages, tools, second)
    assert bp1 > 200 and bp2 > bp1 + 100
    c = m.usage.cache_creation
    assert c is not None
    assert c.ephemeral_1h_input_tokens == bp1 // BLOCK * BLOCK
    assert c.ephemeral_5m_input_tokens == bp2 // BLOCK * BLOCK - bp1 // BLOCK * BLOCK
    # a different conversation after the same tools reads them back from the cache
    again = client.messages.create(model=model, max_tokens=1, tools=tools,  # type: ignore[arg-type]
                                   messages=[{"role": "user", "content": "Another question entirely."}])
    assert (again.usage.cache_read_input_tokens or 0) >= bp2 // BLOCK * BLOCK
    assert again.usage.cache_creation_input_tokens == 0


def test_last_tool_breakpoint_stops_at_the_end_of_the_tools(server: Server) -> None:
    server.aengine.call(lambda e: e.reset_prefix_cache())  # the tools' opening block is the same in every test
    client = Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    tok = server.engine.tokenizer
    description = text_of_tokens(tok, 150, nonce())
    tools = [_tool("only", description, "5m")]
    messages: Any = [{"role": "user", "content": text_of_tokens(tok, 100, "A long question.")}]
    m = client.messages.create(model=server.engine.model_name, max_tokens=1, tools=tools,  # type: ignore[arg-type]
                               messages=messages)
    assert m.usage.cache_creation_input_tokens == _tokens_through_line_of(server, messages, tools, description) \
        // BLOCK * BLOCK > 0


PLAIN_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")


def test_a_template_without_tools_gives_tool_breakpoints_nothing(tmp_path: Path) -> None:
    """A template that ignores tools (plain ChatML, as random:tiny's was before it learned tools):
    the breakpoint covers 0 tokens (not the prompt)."""
    checkpoint = tmp_path / "tiny-plain"
    shutil.copytree(random_checkpoint("tiny"), checkpoint)
    config_path = checkpoint / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": PLAIN_CHATML}))
    with running(tiny_engine(num_blocks=64, model=str(checkpoint))) as aengine, serve(aengine) as srv:
        client = Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
        m = client.messages.create(model=srv.engine.model_name, max_tokens=1, messages=[
            {"role": "user", "content": text_of_tokens(srv.engine.tokenizer, 100, nonce())}],
            tools=[_tool("t", "A tool.", "5m")])  # type: ignore[list-item]
        assert m.usage.cache_creation_input_tokens == 0 and m.usage.input_tokens > 100
