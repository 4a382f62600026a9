"""Tool calls: checking OpenAI `tools`/`tool_choice`, showing tools to a model, and the grammar
of a call.

One call format everywhere (the Hermes/Qwen one, which models trained on tools often know):

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

several calls separated by one newline. The grammar fixes the bytes around the arguments, so
`gateway/tool_calls.py` finds the name and the arguments by position, not by guessing, and the
arguments of each call are held to that tool's own parameter schema (llguidance `%json`).

A template that renders tools natively gets them through the template; the grammar still
asks for this format (sound for any model; in distribution for Hermes-style templates).
Limit: the tags are matched as text. A tokenizer that makes `<tool_call>` a special token
would need `<tool_call>` token syntax in the grammar and a detokenizer that keeps it; the
default model's tokenizer does not, and `tool_call_grammar` refuses such a tokenizer.
"""
from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from grammars.spec import GrammarError, GrammarSpec, check_json_schema

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
CALL_SEPARATOR = "\n"
# Calls per response when parallel_tool_calls is on: a bound, so a looping model must stop.
MAX_PARALLEL_CALLS = 8

_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names

ToolChoiceMode = Literal["none", "auto", "required", "named"]


class ToolError(GrammarError):
    """A bad `tools`/`tool_choice`/`parallel_tool_calls`; a 400 naming the parameter."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: Mapping[str, Any]  # a JSON schema for the arguments object


@dataclass(frozen=True, slots=True)
class ToolsRequest:
    """The checked tool part of a chat request."""

    tools: tuple[ToolSpec, ...]
    mode: ToolChoiceMode
    name: str | None = None          # the forced tool when mode == "named"
    parallel: bool = True
    # A response format beside the tools: with "auto", the answer that is not a call is one
    # document in it (the prompt says so, the grammar enforces it).
    answer_format: GrammarSpec | None = None

    @property
    def allowed(self) -> tuple[ToolSpec, ...]:
        """The tools a call may name."""
        if self.mode == "named":
            return tuple(t for t in self.tools if t.name == self.name)
        return self.tools

    @property
    def is_active(self) -> bool:
        """Whether tools are shown, calls constrained and parsed (False for "none")."""
        return self.mode != "none" and bool(self.tools)


# --- validation ---------------------------------------------------------------------------

def parse_tools_request(tools: Any, tool_choice: Any = None,
                        parallel_tool_calls: Any = None) -> ToolsRequest | None:
    """Check the OpenAI tool fields of a request; None when it has no tools. Raises ToolError."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("tool_choice requires tools", "tool_choice")
        return None
    parsed = parse_tools(tools)
    if parallel_tool_calls is None:
        parallel = True
    elif isinstance(parallel_tool_calls, bool):
        parallel = parallel_tool_calls
    else:
        raise ToolError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    mode, name = parse_tool_choice(tool_choice, parsed)
    return ToolsRequest(parsed, mode, name, parallel)


def parse_tools(tools: Any) -> tuple[ToolSpec, ...]:
    """OpenAI `tools` -> Tools; raises ToolError naming the first problem."""
    if not isinstance(tools, list):
        raise ToolError("tools must be a list of tool definitions", "tools")
    if not tools:
        raise ToolError("tools must not be empty (omit it instead)", "tools")
    parsed: list[ToolSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(entry, Mapping):
            raise ToolError(f"{where} must be an object", where)
        if entry.get("type", "function") != "function":
            raise ToolError(f"{where}.type must be 'function', got {entry.get('type')!r}", f"{where}.type")
        fn = entry.get("function")
        if not isinstance(fn, Mapping):
            raise ToolError(f"{where}.function must be an object", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ToolError(f"{where}.function.name {name!r} must match ^[a-zA-Z0-9_-]{{1,64}}$",
                            f"{where}.function.name")
        if name in seen:
            raise ToolError(f"duplicate tool name {name!r}", f"{where}.function.name")
        seen.add(name)
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        parsed.append(ToolSpec(name, description, _check_parameters(fn.get("parameters"), f"{where}.function.parameters")))
    return tuple(parsed)


def _check_parameters(parameters: Any, where: str) -> Mapping[str, Any]:
    if parameters is None:  # OpenAI: a function without parameters takes an empty object
        return {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping):
        raise ToolError(f"{where} must be a JSON schema object", where)
    kind = parameters.get("type")
    if kind is not None and kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise ToolError(f"{where} must describe a JSON object (type 'object'), got type {kind!r}", where)
    try:
        check_json_schema(dict(parameters))
    except GrammarError as e:
        raise ToolError(f"{where}: {e}", where) from None
    return parameters


def parse_tool_choice(tool_choice: Any, tools: Sequence[ToolSpec]) -> tuple[ToolChoiceMode, str | None]:
    """OpenAI `tool_choice` -> (mode, forced name); the default with tools is "auto"."""
    if tool_choice is None or tool_choice == "auto":
        return "auto", None
    if tool_choice in ("none", "required"):
        return tool_choice, None
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolError('tool_choice object must be {"type": "function", "function": {"name": ...}}',
                            "tool_choice")
        if name not in {t.name for t in tools}:
            raise ToolError(f"tool_choice names unknown tool {name!r}", "tool_choice")
        return "named", name
    raise ToolError(f"tool_choice must be 'none', 'auto', 'required' or a function object, got {tool_choice!r}",
                    "tool_choice")


# --- prompting ----------------------------------------------------------------------------

def tools_system_prompt(request: ToolsRequest) -> str:
    """The system section that shows the tools and the call format to a model."""
    lines = ["# Tools", "", "You can call these functions:", ""]
    for tool in request.allowed:
        shown = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        if not tool.description:  # every prompt token costs prefill time
            del shown["description"]
        lines.append(json.dumps(shown, ensure_ascii=False))
    example = format_tool_call("function_name", '{"argument": "value"}')
    lines += ["", "To call a function, write one JSON object with its name and arguments inside "
              f"{OPEN_TAG}{CLOSE_TAG} tags, like this:", example]
    if request.parallel:
        lines.append("To call several functions, write one such line per call.")
    if request.mode == "auto":
        lines.append("Call a function only when it helps answer; otherwise answer " + (
            "with one JSON document in the requested format." if request.answer_format is not None
            else "in plain text."))
    else:
        lines.append("You must call a function now.")
    return "\n".join(lines)


def format_tool_call(name: str, arguments: str) -> str:
    """One call as the model writes it; `arguments` is JSON text."""
    return f"{OPEN_TAG}{call_prefix(name)}{arguments}}}{CLOSE_TAG}"


def call_prefix(name: str) -> str:
    """What the grammar fixes between the opening tag and a call's arguments."""
    return f'{{"name": {json.dumps(name)}, "arguments": '


def render_messages(messages: Sequence[Mapping[str, Any]], request: ToolsRequest | None) -> list[dict[str, Any]]:
    """Messages for a template without tool support: tools in the system message, earlier
    calls as `<tool_call>` text, tool results as user messages."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = _text_of(message.get("content"))
        if role == "assistant" and message.get("tool_calls"):
            calls = [format_tool_call(c["function"]["name"], _arguments_text(c["function"].get("arguments")))
                     for c in message["tool_calls"]]
            content = (content + "\n" if content else "") + CALL_SEPARATOR.join(calls)
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            # Templates without tools rarely know a "tool" role, and some insist on strict
            # user/assistant turns: consecutive results merge into one user message.
            result = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "_tool_results": True})
        else:
            out.append({**message, "content": content})
    for message in out:
        message.pop("_tool_results", None)
    if request is not None and request.is_active:
        section = tools_system_prompt(request)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return str(content)


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)


_PROBE = "plumbline_probe_tool_x7"
_TEMPLATE_SUPPORT: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template shows `tools` (a probe tool's name appears)."""
    try:
        return _TEMPLATE_SUPPORT[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = [{"type": "function", "function": {"name": _PROBE, "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=probe,
                                             tokenize=False, add_generation_prompt=True)
        supported = _PROBE in text
    except Exception:  # a template that chokes on tools does not support them
        supported = False
    try:
        _TEMPLATE_SUPPORT[tokenizer] = supported
    except TypeError:
        pass
    return supported


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]], request: ToolsRequest | None,
                  add_generation_prompt: bool = True,
                  template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text for a chat with (possibly) tools, through the tokenizer's template;
    template_kwargs go to apply_chat_template as they are (its options, the template's variables)."""
    extra = dict(template_kwargs or {})
    if template_supports_tools(tokenizer):
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                   "parameters": dict(t.parameters)}}
                 for t in request.allowed] if request is not None and request.is_active else None
        native = [_native_message(m) for m in messages]
        text: str = tokenizer.apply_chat_template(native, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **extra)
        return text
    rendered = render_messages(messages, request)
    text = tokenizer.apply_chat_template(rendered, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **extra)
    return text


def _native_message(message: Mapping[str, Any]) -> dict[str, Any]:
    # Tool-aware templates (transformers convention) take arguments as an object, not JSON text.
    out = dict(message)
    if out.get("tool_calls"):
        calls = []
        for call in out["tool_calls"]:
            fn = dict(call["function"])
            try:
                fn["arguments"] = json.loads(fn["arguments"]) if isinstance(fn.get("arguments"), str) else fn.get("arguments")
            except json.JSONDecodeError:
                pass
            calls.append({**call, "function": fn})
        out["tool_calls"] = calls
    return out


# --- grammar ------------------------------------------------------------------------------

def tool_call_grammar(request: ToolsRequest | None, tokenizer: Any = None) -> GrammarSpec | None:
    """The grammar of a response with tools (grammars/tool_grammar.py); None when unconstrained."""
    # Built apart: this module shows tools to the model, that one constrains what it writes.
    from grammars.tool_grammar import tool_call_grammar as build

    return build(request, tokenizer)
