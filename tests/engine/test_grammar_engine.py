"""Grammar masks inside the engine: outputs obey the grammar; logprobs under a mask are those
of the masked, renormalised distribution (processed) or of the unmasked model (raw)."""
import asyncio
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, AsyncEngine, EngineConfig, GenerateRequest, RequestError, SamplingParams
from grammars import GrammarCompiler, GrammarSpec
from tests.engine.reference import hf_logits

REGEX = r"(cat|dog)-[0-9]{2,4}"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return LLM(str(tiny_model_dir)), hf


def allowed_ids(compiled, prefix: list[int], vocab: int) -> torch.Tensor:
    m = compiled.matcher()
    assert m.accept(prefix)
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    m.fill_bitmask(bitmask, 0)
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].bool()


@pytest.mark.parametrize("mode", ["processed", "raw"])
def test_masked_logprobs(tiny, mode):
    llm, hf = tiny
    spec = GrammarSpec("regex", REGEX)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=4, grammar=spec, logprobs_mode=mode)
    outs = llm.generate(["Name an animal:", "x"], params)
    compiled = GrammarCompiler(llm.tokenizer, vocab_size=llm.core.vocab_size).compile(spec)
    for out in outs:
        assert re.fullmatch(REGEX, out.text), out.text
        assert out.finish_reason == "stop"
        logits = hf_logits(hf, out.prompt_token_ids, out.token_ids)
        for t, token in enumerate(out.token_ids):
            row = logits[t]
            if mode == "processed":
                row = row.masked_fill(~allowed_ids(compiled, out.token_ids[:t], row.shape[0]),
                                      float("-inf"))
            want = torch.log_softmax(row, -1)[token].item()
            assert abs(want - out.logprobs[t]) <= 1e-5


def test_json_schema_output_validates_and_length_is_reported(tiny):
    llm, _ = tiny
    schema = {"type": "object", "properties": {"id": {"type": "integer"},
              "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
              "required": ["id", "tags"], "additionalProperties": False}
    spec = GrammarSpec("json_schema", json.dumps(schema))
    import jsonschema
    for out in llm.generate(["{"] * 3, SamplingParams(max_tokens=60, temperature=1.0, seed=9,
                                                      n=2, grammar=spec)):
        for o in out.outputs:
            if o.finish_reason == "stop":
                jsonschema.validate(json.loads(o.text), schema)
            else:
                assert o.finish_reason == "length"
    short = llm.generate(["{"], SamplingParams(max_tokens=2, temperature=0.0, grammar=spec))[0]
    assert short.finish_reason == "length"


def test_async_engine_grammar_errors_and_waiting(tiny_model_dir):
    async def scenario():
        engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir)))
        await engine.start()
        try:
            ids = tuple(engine.tokenizer("hello").input_ids)
            bad = engine.add_request(GenerateRequest("bad", ids, SamplingParams(
                max_tokens=4, grammar=GrammarSpec("regex", "(unclosed"))))
            good = engine.add_request(GenerateRequest("good", ids, SamplingParams(
                max_tokens=8, temperature=0.0, grammar=GrammarSpec("regex", "[ab]{3}"))))
            with pytest.raises(RequestError):
                await bad.ready()
            await good.ready()
            tokens = [t async for d in good for t in d.token_ids]
            text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
            assert re.fullmatch("[ab]{3}", text)
            assert engine.core.blocks.num_free_blocks == engine.core.blocks.num_blocks
        finally:
            await engine.shutdown()

    asyncio.run(scenario())
