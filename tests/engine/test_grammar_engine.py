"""Grammar masks inside the engine: outputs obey the grammar; logprobs under a mask are those
of the masked, renormalised distribution (processed) or of the unmasked model (raw)."""
import asyncio
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM, AsyncEngine, EngineConfig, GenerateRequest, RequestError, SamplingParams
from grammars import GrammarCompiler, GrammarSpec
from grammars.tools import parse_tools_request, tool_call_grammar
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


FF_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "tags"],
             "properties": {"name": {"type": "string", "maxLength": 6},
                            "kind": {"type": "string", "enum": ["cat", "dog"]},
                            "tags": {"type": "array", "maxItems": 2,
                                     "items": {"type": "string", "maxLength": 4}}}}


def _counting(llm):
    """Count the sequences sampled by each engine step."""
    rows: list[int] = []
    run = llm.core.runner.run

    def counted(batch):
        rows.append(len(batch.sampling_seqs))
        return run(batch)
    llm.core.runner.run = counted
    return rows


def test_fast_forward_changes_no_token_and_no_logprob(tiny_model_dir):
    """Deterministic mode computes every position with the same shapes either way, so outputs
    with and without fast-forward must be bit-identical; forced tokens report 0.0 and are
    never sampled."""
    spec = GrammarSpec("json_schema", json.dumps(FF_SCHEMA))
    prompts = ["{", "Name a pet:", "x y z"]
    tools = parse_tools_request([{"type": "function", "function": {
        "name": "pet", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}},
                                      "required": ["n"], "additionalProperties": False}}}],
        "required", False)
    calls = tool_call_grammar(tools, AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    runs = {}
    for ff in (True, False):
        llm = LLM(str(tiny_model_dir), deterministic=True, grammar_fast_forward=ff)
        rows = _counting(llm)
        outs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.9, seed=11, n=2,
                                                    grammar=spec))
        outs += llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0, grammar=spec))
        # A tool call's end, `}</tool_call>`, is forced token by token after its last argument.
        outs += llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0, grammar=calls))
        runs[ff] = ([(o.token_ids, o.logprobs, o.finish_reason) for r in outs for o in r.outputs],
                    llm.core.scheduler.num_forced_tokens, sum(rows))
        assert llm.core.blocks.num_free_blocks == llm.core.blocks.num_blocks
    (with_ff, forced, sampled_ff), (without, none, sampled) = runs[True], runs[False]
    assert with_ff == without
    assert none == 0 and forced > 0
    assert sampled_ff == sampled - forced           # a forced token costs no sampling
    total = sum(len(ids) for ids, _, _ in with_ff)
    assert sum(lp == 0.0 for _, lps, _ in with_ff for lp in lps) >= forced
    assert forced < total
    ends = [ids for ids, _, reason in with_ff[-3:] if reason == "stop"]
    assert ends and all(ids[-1] == ends[0][-1] for ids in ends)   # each call ends on the tag


def test_fast_forward_respects_max_tokens_and_skips_raw_mode(tiny_model_dir):
    llm = LLM(str(tiny_model_dir))
    spec = GrammarSpec("json_schema", json.dumps(FF_SCHEMA))
    for max_tokens in range(1, 7):
        for out in llm.generate(["{", "a"], SamplingParams(max_tokens=max_tokens, temperature=1.0,
                                                           seed=max_tokens, grammar=spec)):
            assert len(out.token_ids) <= max_tokens
            assert out.finish_reason == ("length" if len(out.token_ids) == max_tokens else "stop")
    assert llm.core.scheduler.num_forced_tokens > 0
    before = llm.core.scheduler.num_forced_tokens
    llm.generate(["{", "a"], SamplingParams(max_tokens=32, temperature=1.0, seed=5, grammar=spec,
                                            logprobs_mode="raw"))
    assert llm.core.scheduler.num_forced_tokens == before   # raw logprobs need the model's logits
    assert llm.core.blocks.num_free_blocks == llm.core.blocks.num_blocks


def test_forced_tokens_computed_as_decode_rows_match_transformers(tiny):
    """Outside deterministic mode, the sampled token and the tokens forced after it are computed
    next step as decode query rows of one sequence; every logprob after them must still be the
    masked distribution of a plain transformers forward."""
    llm, hf = tiny
    spec = GrammarSpec("json_schema", json.dumps(FF_SCHEMA))
    multi_rows = []
    prepare = llm.core.runner.prepare

    def watched(batch):
        out = prepare(batch)
        multi_rows.append(out[2].num_decodes - batch.num_decodes)   # rows beyond one per decode
        return out
    llm.core.runner.prepare = watched
    before = llm.core.scheduler.num_forced_tokens
    # close_reserve=0: budget-aware closing would narrow the masks beyond the grammar's
    outs = llm.generate(["{", "Name a pet:"], SamplingParams(max_tokens=40, temperature=1.0, seed=7,
                                                             grammar=spec, close_reserve=0))
    llm.core.runner.prepare = prepare
    assert llm.core.scheduler.num_forced_tokens > before and max(multi_rows) > 0
    compiled = GrammarCompiler(llm.tokenizer, vocab_size=llm.core.vocab_size).compile(spec)
    for out in outs:
        logits = hf_logits(hf, out.prompt_token_ids, out.token_ids)
        for t, token in enumerate(out.token_ids):
            row = logits[t].masked_fill(~allowed_ids(compiled, out.token_ids[:t], logits.shape[1]),
                                        float("-inf"))
            assert abs(torch.log_softmax(row, -1)[token].item() - out.logprobs[t]) <= 1e-5
