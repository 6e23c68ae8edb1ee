"""Real clients of `/v1/responses` against the session app's SmolLM2 (`smol`, GGUF on llama.cpp):
OpenAI's Agents SDK (its default Runner, a function tool), OpenAI's Codex CLI (`codex exec`, with
its defaults and with the small-context options README documents) and LangChain's ChatOpenAI
(`bind_tools` with a named tool, over chat completions and over the Responses API).

The Python clients come with the `dev` extra; Codex is npm's `@openai/codex`, which
`scripts/install` puts in `.tools/`. Without a client these tests skip, unless the `CI`
environment variable is set: there a missing client is a failure, not a silent skip. Codex runs
with a throwaway `CODEX_HOME`, no update check and no analytics: it talks to the app alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import REPO, ServedApp

MODEL = "smol"
CODEX_VERSION = "0.171.0"  # the same pin as scripts/install's
CODEX = REPO / ".tools" / "node_modules" / ".bin" / "codex"
KEY_ENV = "VOLTAGE_API_KEY"

# Every Codex run: the app as a Responses provider, the key from KEY_ENV, nothing else reached.
# NOTE: top-level keys first (SMALL_CONTEXT's go between): after a [table], TOML files them there.
PROVIDER_KEYS = """\
model = "{model}"
model_provider = "voltage"
check_for_update_on_startup = false
"""
PROVIDER_TABLES = """
[analytics]
enabled = false

[model_providers.voltage]
name = "voltage_ray"
base_url = "{base_url}/v1"
wire_api = "responses"
env_key = "{key_env}"
"""

# README's options for a small-context model (its "Codex CLI" section): Codex's 17 KB
# instructions replaced, and the tools and context blocks a small model has no room for left out.
# Codex's first request drops from about 9,200 SmolLM2 tokens to about 800 (exec_command and
# write_stdin stay).
SMALL_CONTEXT = """\
model_instructions_file = "small_model_instructions.md"
model_context_window = 8192
model_reasoning_summary = "none"
project_doc_max_bytes = 0
web_search = "disabled"
include_permissions_instructions = false
include_environment_context = false
include_apps_instructions = false
include_collaboration_mode_instructions = false

[agents]
enabled = false

[skills]
include_instructions = false

[tools.experimental_request_user_input]
enabled = false

[tools.update_plan]
enabled = false

[features]
goals = false
apps = false
plugins = false
image_generation = false
tool_suggest = false
skill_search = false
view_image = false
"""
SMALL_INSTRUCTIONS = "You are Codex, a coding agent. Answer briefly.\n"


def missing(what: str) -> None:
    reason = f"{what} is not installed"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must install it (scripts/install does)")
    pytest.skip(reason)


def need_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        missing(f"the Python package {name} (pyproject's dev extra)")


def codex() -> str:
    if not os.access(CODEX, os.X_OK):
        missing(f"Codex CLI {CODEX_VERSION} ({CODEX})")
    version = subprocess.run(
        [str(CODEX), "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert CODEX_VERSION in version, f"{CODEX} is {version.strip()}, not {CODEX_VERSION}"
    return str(CODEX)


def run_codex(served: ServedApp, tmp: Path, small: bool) -> subprocess.CompletedProcess[str]:
    """`codex exec --json` against the app in a fresh CODEX_HOME; its events and log."""
    home = tmp / "codex_home"
    home.mkdir()
    if small:
        (home / "small_model_instructions.md").write_text(SMALL_INSTRUCTIONS)
    config = PROVIDER_KEYS.format(model=MODEL) + (SMALL_CONTEXT if small else "")
    config += PROVIDER_TABLES.format(base_url=served.base_url, key_env=KEY_ENV)
    (home / "config.toml").write_text(config)
    work = tmp / "work"
    work.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "CODEX_HOME": str(home),
        KEY_ENV: served.key,
        "NO_COLOR": "1",
    }
    argv = [codex(), "exec", "--json", "--strict-config", "--skip-git-repo-check", "--ephemeral"]
    # Codex retries a dropped stream 5 times with backoff: the timeout leaves room for that.
    return subprocess.run(
        [*argv, "-C", str(work), "Say hello in one short sentence."],
        env=env,
        cwd=work,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=420,
    )


def events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_codex_defaults_print_the_context_length_error(served: ServedApp, tmp_path: Path) -> None:
    """Codex's default first request (its 17 KB instructions, a namespace of sub-agent tools,
    web_search: about 9,200 SmolLM2 tokens) is past SmolLM2's 8,192: the app's 400
    context_length_exceeded reaches the user, and Codex exits non-zero."""
    done = run_codex(served, tmp_path, small=False)
    printed = done.stdout + done.stderr
    assert done.returncode != 0, printed
    # Codex words it itself where it recognises OpenAI's code ("ran out of room in the model's
    # context window"), else prints the app's body (code and "maximum context length" message).
    assert "context" in printed.lower(), printed
    assert any(
        s in printed
        for s in ("context_length_exceeded", "maximum context length", "context window")
    ), printed
    assert not any(e["type"] == "turn.completed" for e in events(done.stdout)), printed


def test_codex_small_context_options_complete_a_turn(served: ServedApp, tmp_path: Path) -> None:
    done = run_codex(served, tmp_path, small=True)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    kinds = [e["type"] for e in events(done.stdout)]
    assert "turn.completed" in kinds and "turn.failed" not in kinds, printed
    # Codex takes the answer from response.output_item.done: an agent message means the app's
    # events carried the message item.
    items = [e["item"] for e in events(done.stdout) if e["type"] == "item.completed"]
    assert any(item["type"] == "agent_message" for item in items), printed


def recording_client(served: ServedApp, paths: list[str]) -> Any:
    """An AsyncOpenAI client for the app that notes the path of every request it sends."""
    from openai import AsyncOpenAI

    async def note(request: httpx.Request) -> None:
        paths.append(request.url.path)

    http = httpx.AsyncClient(timeout=300, event_hooks={"request": [note]})
    return AsyncOpenAI(base_url=f"{served.base_url}/v1", api_key=served.key, http_client=http)


async def test_agents_sdk_runner_with_a_function_tool(served: ServedApp) -> None:
    need_module("agents")
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # no trace export to OpenAI's servers
    called: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        called.append(city)
        return f"Sunny in {city}"

    paths: list[str] = []
    client = recording_client(served, paths)
    agent = Agent(
        name="weather",
        instructions="You answer briefly.",
        model=OpenAIResponsesModel(model=MODEL, openai_client=client),
        model_settings=ModelSettings(temperature=0.0, max_tokens=64),
        tools=[get_weather],
    )
    try:
        result = await Runner.run(agent, "What is the weather in Paris?", max_turns=6)
    finally:
        await client.close()
    assert isinstance(result.final_output, str)
    assert paths and all(p == "/v1/responses" for p in paths), paths
    # One request per model turn; a turn after the first answers the tool call before it.
    assert len(paths) == len(result.raw_responses), (paths, result.raw_responses)
    assert len(paths) == 1 or called, (paths, called)


@pytest.mark.parametrize("use_responses_api", [False, True], ids=["chat", "responses"])
def test_langchain_bind_tools_named_tool(served: ServedApp, use_responses_api: bool) -> None:
    need_module("langchain_openai")
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class City(BaseModel):
        city: str = Field(max_length=10)

    @tool("get_weather", args_schema=City)
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"Sunny in {city}"

    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{served.base_url}/v1",
        api_key=served.key,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=64,
        use_responses_api=use_responses_api,
        max_retries=0,
        timeout=300,
    )
    # Not strict, as LangChain binds by default: the service reads the schema, which does not
    # say whether it takes other keys, as closed (README: strict schemas by default), so the
    # small model's forced call cannot go on adding keys until max_tokens cuts it.
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    message = bound.invoke("What is the weather in Paris?")
    assert message.tool_calls, message  # type: ignore[attr-defined]
    call = message.tool_calls[0]  # type: ignore[attr-defined]
    assert call["name"] == "get_weather"
    assert isinstance(call["args"], dict) and isinstance(call["args"].get("city"), str), call
    assert call["id"]
