"""Compile and mask-fill time of the tool-call grammars (`grammars/tools.py`), per tool_choice.

    python -m benchmarks.tool_masks

Two tools (get_weather, add), parallel calls on. For "auto" and "required": the compile time,
then one cursor walked through a realistic response with a `fill_bitmask` before every token
(median / p90 / max), then 32 cursors filled together per step (what the engine does at 32
constrained streams). Uses the default model's tokenizer.
"""
from __future__ import annotations

import statistics
import time

from transformers import AutoTokenizer

from engine.loader import resolve_model
from grammars import GrammarCompiler, allocate_bitmask, fill_bitmasks
from grammars.tools import parse_tools_request, tool_call_grammar

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"]}}},
]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
TEXTS = {"auto": "Sure, let me check. " + CALL, "required": CALL}
ROWS = 32


def main() -> None:
    tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m-instruct")))
    vocab_size = len(tok)
    compiler = GrammarCompiler(tok, vocab_size=vocab_size)
    bitmask = allocate_bitmask(ROWS, vocab_size)
    for mode, text in TEXTS.items():
        request = parse_tools_request(TOOLS, mode, True)
        spec = tool_call_grammar(request, tok)
        assert spec is not None
        t0 = time.perf_counter()
        compiled = compiler.compile(spec)
        compile_ms = (time.perf_counter() - t0) * 1000
        ids = tok.encode(text, add_special_tokens=False)
        one = compiled.matcher()
        times = []
        for token in ids:
            t0 = time.perf_counter()
            fill_bitmasks(bitmask, [(one, 0)])
            times.append((time.perf_counter() - t0) * 1000)
            assert one.accept_token(token), tok.decode([token])
        times.sort()
        cursors = [compiled.matcher() for _ in range(ROWS)]
        t0 = time.perf_counter()
        for token in ids:
            fill_bitmasks(bitmask, [(c, row) for row, c in enumerate(cursors)])
            for c in cursors:
                c.accept_token(token)
        batch_ms = (time.perf_counter() - t0) * 1000 / len(ids)
        print(f"{mode:8s}: compile {compile_ms:7.1f} ms | one row: median "
              f"{statistics.median(times):.3f} ms, p90 {times[int(0.9 * len(times))]:.3f} ms, "
              f"max {times[-1]:.3f} ms ({len(ids)} tokens) | {ROWS} rows per step {batch_ms:.2f} ms")


if __name__ == "__main__":
    main()
