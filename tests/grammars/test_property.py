"""Property: random walks through allowed tokens end only in documents that jsonschema accepts.

Each step fills the mask, then picks EOS when allowed and hypothesis says so, otherwise a
random allowed token, drawn half the time from the short (id < 512: single characters and
punctuation) ones so that strings and objects get closed within the step cap.
"""
from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grammars import GrammarSpec, allocate_bitmask
from tests.conftest import VENDORED_SCHEMAS
from tests.grammars.conftest import allowed_ids

EOS = 2
MAX_STEPS = 120
# A handful of dev schemas: plain ones llguidance compiles exactly, and ones it refuses
# (oneOf, not, patternProperties+not) that take the relaxed path with the EOS gate.
SCHEMAS = [
    "Github_trivial---o48167.json",
    "Github_easy---o43322.json",
    "BFCL_simple_259.json",
    "Glaiveai2K---calculate_area_defa27d8.json",
    "Synthesized---draft2019_09_valid_patternProperties_id15_subschema1_not_2.json",
    "Synthesized---draft2019_09_nonvalid_enum_id3_subschema1_not_2.json",
]

def _walk(data: st.DataObject, compiled: Any, vocab_size: int) -> tuple[list[int], bool]:
    m = compiled.matcher()
    bitmask = allocate_bitmask(1, vocab_size)
    token_ids: list[int] = []
    for _ in range(MAX_STEPS):
        m.fill_bitmask(bitmask, 0)
        allowed = allowed_ids(bitmask, 0, vocab_size)
        if not allowed:
            assert m.is_dead()
            return token_ids, False
        if EOS in allowed and data.draw(st.booleans(), label="stop"):
            assert m.accept_token(EOS) and m.is_terminated()
            return token_ids, True
        short = [t for t in allowed if t < 512 and t != EOS] or allowed
        pool = short if data.draw(st.booleans(), label="short") else allowed
        token = pool[data.draw(st.integers(0, len(pool) - 1), label="token")]
        assert m.accept_token(token), token
        if token == EOS:
            return token_ids, True
        token_ids.append(token)
    return token_ids, False


@pytest.mark.parametrize("name", SCHEMAS)
def test_random_walks_decode_to_valid_instances(name: str, compiler: Any, tokenizer: Any) -> None:
    schema = json.loads((VENDORED_SCHEMAS / name).read_text())["schema"]
    compiled = compiler.compile(GrammarSpec.json_schema(schema))
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)

    # derandomize: the same walks on every run. With random seeds, some seeds gave a schema
    # (calculate_area's oneOf) 12 walks that all hit the step cap, and the suite went red by
    # chance; any fixed seed still walks each schema's grammar 12 ways.
    @settings(max_examples=12, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def walk(data: st.DataObject) -> None:
        token_ids, ended = _walk(data, compiled, len(tokenizer))
        num_ended[0] += ended
        if ended:                               # a whole document: it validates
            text = tokenizer.decode(token_ids)
            assert validator.is_valid(json.loads(text)), text

    num_ended = [0]
    walk()
    assert num_ended[0] > 0                     # some walks ended: the check above ran
