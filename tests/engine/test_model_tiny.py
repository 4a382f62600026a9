"""Our model and sampler on a tiny random llama, against a plain transformers forward."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from tests.conftest import make_tiny_llama
from tests.engine.reference import hf_logits, processed_logprobs

PROMPTS = ["Hello there, how are you doing today?", "1 2 3 4 5 6 7 8 9 10 11 12 13 14", "Why"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_dir):
    # Wide init so logits are spread out: greedy comparisons must not hinge on near-ties.
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny-wide"), default_model_dir,
                           initializer_range=0.2, num_key_value_heads=1,
                           rope_parameters={"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 10000.0})
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    # A tiny budget forces chunked prefill; tiny blocks exercise block boundaries.
    llm = LLM(str(path), max_num_batched_tokens=7, block_size=8, num_kv_blocks=64)
    return llm, hf


def test_raw_logprobs_and_greedy_match_transformers(tiny):
    llm, hf = tiny
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs_mode="raw", ignore_eos=True)
    for out in llm.generate(PROMPTS, params):
        ref = torch.log_softmax(hf_logits(hf, out.prompt_token_ids, out.token_ids), -1)
        assert out.token_ids == ref.argmax(-1).tolist()
        got = torch.tensor(out.logprobs)
        want = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        assert (got - want).abs().max().item() <= 1e-5


def test_processed_logprobs_are_those_of_the_sampled_distribution(tiny):
    llm, hf = tiny
    params = SamplingParams(max_tokens=10, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05,
                            seed=3, ignore_eos=True, logprobs=3)
    for out in llm.generate(PROMPTS, params):
        ref = processed_logprobs(hf_logits(hf, out.prompt_token_ids, out.token_ids), 0.7, 40, 0.9, 0.05)
        want = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        assert torch.isfinite(want).all(), "a token outside the truncated set was sampled"
        assert (torch.tensor(out.logprobs) - want).abs().max().item() <= 1e-5
        top = out.outputs[0].top_logprobs
        for t, row in enumerate(top):
            assert [x.token_id for x in row] == torch.topk(ref[t], 3).indices.tolist()


def test_greedy_logprobs_are_untruncated_temperature_one(tiny):
    llm, hf = tiny
    # top_k and top_p are ignored for greedy requests: the report is the log-softmax at T=1.
    params = SamplingParams(max_tokens=6, temperature=0.0, top_k=5, top_p=0.5, ignore_eos=True)
    out = llm.generate(PROMPTS[:1], params)[0]
    ref = torch.log_softmax(hf_logits(hf, out.prompt_token_ids, out.token_ids), -1)
    want = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
    assert (torch.tensor(out.logprobs) - want).abs().max().item() <= 1e-5


def test_penalties_change_the_processed_distribution(tiny):
    llm, hf = tiny
    prompt = PROMPTS[1]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                            repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4)
    out = llm.generate([prompt], params)[0]
    logits = hf_logits(hf, out.prompt_token_ids, out.token_ids)
    for t, token in enumerate(out.token_ids):
        row = logits[t].clone()
        seen = sorted(set(out.prompt_token_ids + out.token_ids[:t]))
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / 1.3, vals * 1.3)
        counts = torch.bincount(torch.tensor(out.token_ids[:t], dtype=torch.long),
                                minlength=row.shape[0]).float() if t else torch.zeros_like(row)
        row -= 0.5 * counts + 0.4 * (counts > 0).float()
        assert token == row.argmax().item()
        assert abs(torch.log_softmax(row, -1)[token].item() - out.logprobs[t]) <= 1e-5


def test_seeded_sampling_is_reproducible_and_independent_of_batch(tiny):
    llm, _ = tiny
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[:1], p)[0].token_ids
    again = llm.generate(PROMPTS[:1], p)[0].token_ids
    crowd = llm.generate(PROMPTS * 3, [p] + [SamplingParams(max_tokens=10, temperature=1.0)] * 8)
    assert alone == again == crowd[0].token_ids
    other = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=10, temperature=1.0, seed=99,
                                                     ignore_eos=True))[0].token_ids
    assert other != alone


def test_n_samples_differ_and_stop_strings_cut_text(tiny):
    llm, _ = tiny
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=5,
                                                   ignore_eos=True))[0]
    assert len(out.outputs) == 3 and len({tuple(o.token_ids) for o in out.outputs}) > 1
    greedy = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0.0,
                                                      ignore_eos=True))[0]
    stop = greedy.text[2:5]
    cut = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                   stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert greedy.text.startswith(cut.text)


def test_prompt_logprobs_match_transformers_across_chunks(tiny):
    llm, hf = tiny
    prompt = PROMPTS[0] + " " + PROMPTS[1]          # longer than the 7-token step budget
    out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2))[0]
    ids = out.prompt_token_ids
    ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)   # [len, vocab]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for t in range(1, len(ids)):
        entry = out.prompt_logprobs[t]
        assert abs(entry.logprob - ref[t - 1, ids[t]].item()) <= 1e-5
        assert [x.token_id for x in entry.top] == torch.topk(ref[t - 1], 2).indices.tolist()


def test_logit_bias_min_tokens_and_allowed_token_ids(tiny):
    """logit_bias moves the processed distribution (+100 forces a token, -100 bans one);
    min_tokens holds EOS off; allowed_token_ids confines the output."""
    llm, hf = tiny
    eos = llm.core.steering.eos_token_ids
    (eos_id,) = sorted(eos)[:1]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, logprobs=1)
    plain = llm.generate(PROMPTS[:1], greedy)[0].outputs[0]
    forced = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=6, temperature=0.0, logprobs=1,
                                                      logit_bias={17: 100.0}))[0].outputs[0]
    assert forced.token_ids == [17] * 6 and all(lp > -1e-3 for lp in forced.logprobs)
    banned = llm.generate(PROMPTS[:1], SamplingParams(
        max_tokens=6, temperature=0.0, logit_bias={plain.token_ids[0]: -100.0}))[0].outputs[0]
    assert banned.token_ids[0] != plain.token_ids[0]
    # EOS forced by a bias, held off for min_tokens tokens, then the output ends on it
    ends = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=20, temperature=0.0, min_tokens=5,
                                                    logit_bias={eos_id: 100.0}))[0].outputs[0]
    assert len(ends.token_ids) == 6 and ends.token_ids[-1] == eos_id
    assert eos_id not in ends.token_ids[:5] and ends.finish_reason == "stop"
    allowed = (100, 200, 300)
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=1.0, seed=1,
                                                   allowed_token_ids=allowed))[0].outputs[0]
    assert set(out.token_ids) <= set(allowed)


def test_logit_rules_are_checked(tiny):
    from engine import GenerateRequest, RequestError
    from grammars import GrammarSpec
    llm, _ = tiny
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=(1,), grammar=GrammarSpec("regex", "a"))
    with pytest.raises(RequestError, match="logit_bias"):
        llm.core.validate(GenerateRequest("r", (1, 2), SamplingParams(logit_bias={10**7: 1.0})))


def test_min_tokens_yields_to_a_grammar_that_can_only_end(tiny):
    """min_tokens holds EOS off only where the grammar allows another token: a structure that
    is complete ends, never samples from an empty row."""
    import json
    from grammars import GrammarSpec
    llm, _ = tiny
    empty = GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {},
                                                   "additionalProperties": False}))
    # raw logprobs: no fast-forward, so the EOS after "{}" is sampled, from a row where the
    # grammar allows EOS alone and min_tokens would mask it
    out = llm.generate(PROMPTS[:1], SamplingParams(
        max_tokens=10, temperature=0.0, min_tokens=8, logprobs_mode="raw",
        grammar=empty))[0].outputs[0]
    assert json.loads(out.text) == {} and out.finish_reason == "stop"
    assert len(out.token_ids) < 8 and all(lp == lp for lp in out.logprobs)     # no NaN


def test_min_tokens_never_empties_a_masked_row():
    """Where the grammar's mask allows EOS alone, min_tokens gives way: the row keeps EOS and
    its logprob is finite (sampling from an all -inf row would give NaN)."""
    from engine.sampler import SamplingBatch, sample
    from engine.sequence import Sequence
    from grammars import allocate_bitmask
    eos, vocab = 2, 64
    seq = Sequence("r", 0, [5, 6], 2, SamplingParams(max_tokens=9, min_tokens=5, temperature=0.0,
                                                     logit_bias={7: 3.0}), 0)
    bitmask = allocate_bitmask(1, vocab)
    bitmask.zero_()
    bitmask[0, 0] = 1 << eos                                  # only EOS allowed
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    result = sample(logits, SamplingBatch.from_seqs([seq], [eos]), bitmask, [0])
    assert result.token_ids == [eos] and result.logprobs[0] == 0.0
    bitmask.fill_(-1)                                         # everything allowed: EOS held off
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    logits[0, eos] = 50.0
    result = sample(logits, SamplingBatch.from_seqs([seq], [eos]), bitmask, [0])
    assert result.token_ids[0] != eos
