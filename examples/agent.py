"""A small agent loop against a plumbline server, through the openai SDK.

Two real tools: a calculator (arithmetic expressions, evaluated safely from the AST) and a unit
converter (length, mass, temperature). The first turn uses tool_choice="required" so the model
must call a tool; later turns use "auto" so it can answer from the tool results.

    make serve                       # start the server on 127.0.0.1:8000
    .venv/bin/python examples/agent.py "How many feet are 3.5 km, and what is (17 * 23) - 4?"
"""
from __future__ import annotations

import ast
import json
import operator
import sys
from typing import Any, Callable

from openai import OpenAI

BASE_URL = "http://127.0.0.1:8000/v1"
MAX_TURNS = 6

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with + - * / ** % and parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "convert_units",
        "description": "Convert a value between units of length (m, km, cm, mi, ft, in), "
                       "mass (kg, g, lb, oz) or temperature (C, F, K).",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
            "required": ["value", "from_unit", "to_unit"], "additionalProperties": False}}},
]

_OPS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def calculator(expression: str) -> float:
    """Arithmetic only: numbers and operators; anything else is refused."""
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Pow) and abs(walk(node.right)) > 100:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ValueError(f"unsupported expression: {ast.dump(node)[:60]}")
    return walk(ast.parse(expression, mode="eval"))


# Linear units as factors to the SI base unit of their dimension.
_FACTORS = {"m": 1.0, "km": 1000.0, "cm": 0.01, "mi": 1609.344, "ft": 0.3048, "in": 0.0254,
            "kg": 1.0, "g": 0.001, "lb": 0.45359237, "oz": 0.028349523125}
_DIMENSION = {**{u: "length" for u in ("m", "km", "cm", "mi", "ft", "in")},
              **{u: "mass" for u in ("kg", "g", "lb", "oz")}}


def convert_units(value: float, from_unit: str, to_unit: str) -> float:
    """Length, mass and temperature conversions."""
    if from_unit in ("C", "F", "K") and to_unit in ("C", "F", "K"):
        kelvin = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[from_unit]
        return {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[to_unit]
    if _DIMENSION.get(from_unit) is None or _DIMENSION.get(from_unit) != _DIMENSION.get(to_unit):
        raise ValueError(f"cannot convert {from_unit!r} to {to_unit!r}")
    return value * _FACTORS[from_unit] / _FACTORS[to_unit]


HANDLERS: dict[str, Callable[..., float]] = {"calculator": calculator, "convert_units": convert_units}


def run_tool(name: str, arguments: str) -> str:
    """Run one call; errors go back to the model as the tool's result, not up the stack."""
    try:
        return json.dumps({"result": HANDLERS[name](**json.loads(arguments))})
    except Exception as e:
        return json.dumps({"error": f"{type(e).__name__}: {e}"})


def run_agent(question: str, client: OpenAI, model: str) -> str:
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    for turn in range(MAX_TURNS):
        response = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required" if turn == 0 else "auto", temperature=0.0, max_tokens=256)
        message = response.choices[0].message
        if not message.tool_calls:
            return message.content or ""
        messages.append({"role": "assistant", "content": message.content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls]})
        for call in message.tool_calls:
            result = run_tool(call.function.name, call.function.arguments)
            print(f"-> {call.function.name}({call.function.arguments}) = {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return "(no answer within the turn limit)"


def main() -> None:
    question = " ".join(sys.argv[1:]) or "How many feet are 3.5 km, and what is (17 * 23) - 4?"
    client = OpenAI(base_url=BASE_URL, api_key="unused")
    model = client.models.list().data[0].id
    print(run_agent(question, client, model))


if __name__ == "__main__":
    main()
