"""Prefix caching: whole KV blocks reused across requests (engine/block_manager.py)."""
import torch

from engine import LLM, SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import Scheduler
from engine.types import StepResult
from engine.sequence import Sequence
from tests.engine.reference import hf_logits

EOS = 2


def make(num_blocks=16, block_size=4, budget=64):
    bm = BlockManager(num_blocks, block_size, prefix_caching=True)
    version = [0]
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=256,
                      eos_token_ids={EOS}, weights_version=lambda: version[0])
    return bm, sched, version


def add(sched, rid, prompt, max_tokens=3, **kw):
    s = Sequence(rid, 0, list(prompt), len(prompt),
                 SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw), 0)
    sched.add(s)
    return s


def step(sched, version=0):
    batch = sched.schedule()
    n = len(batch.sampling_seqs)
    scheduled = {s.request_id: s.num_scheduled_tokens for s in batch.seqs}
    sched.postprocess(batch, StepResult([7] * n, [0.0] * n, [()] * n, weights_version=version))
    return scheduled


def run_to_end(sched, version=0):
    while sched.has_work():
        step(sched, version)


def test_a_later_request_takes_the_whole_blocks_an_earlier_one_computed():
    bm, sched, _ = make()
    a = add(sched, "a", range(10, 20))                 # 10 tokens: two whole blocks of 4
    run_to_end(sched)
    a_blocks = bm.cached.copy()
    assert len(a_blocks) == 3      # 10 prompt + 2 computed completion tokens = 3 whole blocks
    assert bm.num_free_blocks == bm.num_blocks         # cached blocks still count as free
    b = add(sched, "b", [*range(10, 18), 99, 98, 97])  # same first 8 tokens, then different
    scheduled = step(sched)
    assert scheduled == {"b": 3}                       # only the tokens after the hit
    assert b.block_table[:2] == [a_blocks[d] for d in list(a_blocks)[:2]]
    assert b.num_cached_tokens == 8
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (21, 8)
    run_to_end(sched)
    assert bm.num_free_blocks == bm.num_blocks


def test_the_last_token_is_always_computed():
    bm, sched, _ = make()
    add(sched, "a", range(8))
    run_to_end(sched)
    add(sched, "b", range(8))                # identical: both blocks cached, but b needs logits
    assert step(sched) == {"b": 4}


def test_other_weights_and_prompt_logprobs_never_match():
    bm, sched, version = make()
    add(sched, "a", range(12))
    run_to_end(sched)
    version[0] = 1                           # weights swapped: the cached KV is stale
    add(sched, "b", range(12))
    assert step(sched, version=1) == {"b": 12}
    run_to_end(sched, version=1)
    add(sched, "c", range(12), prompt_logprobs=0)   # needs every position's logits
    assert step(sched, version=1) == {"c": 12}


def test_a_shared_block_stays_held_until_its_last_user_finishes():
    bm, sched, _ = make()
    a = add(sched, "a", range(8), max_tokens=6)
    step(sched)
    step(sched)                              # a's first two blocks are now cached
    b = add(sched, "b", [*range(8), 50, 51], max_tokens=20)
    step(sched)
    shared = b.block_table[:2]
    assert shared == a.block_table[:2] and all(bm.ref_counts[i] == 2 for i in shared)
    while not a.is_finished:
        step(sched)
    assert all(bm.ref_counts[i] == 1 and i not in bm.free_ids for i in shared)
    run_to_end(sched)
    assert all(bm.ref_counts[i] == 0 and i in bm.free_ids for i in shared)


def test_cached_blocks_are_handed_out_last_and_evicted_when_needed():
    bm, sched, _ = make(num_blocks=6)
    add(sched, "a", range(10), max_tokens=1)     # 10 tokens: blocks 0, 1 whole, 2 partial
    run_to_end(sched)
    assert len(bm.cached) == 2
    # The partial block went to the front of the free list, the cached ones to the back.
    assert list(bm.free_ids)[0] not in bm.cached.values()
    assert set(list(bm.free_ids)[-2:]) == set(bm.cached.values())
    add(sched, "b", range(100, 124), max_tokens=1)   # needs all 6 blocks: evicts both
    run_to_end(sched)
    assert len(bm.cached) == 6 and bm.num_free_blocks == 6
    c = add(sched, "c", range(10), max_tokens=1)
    assert step(sched) == {"c": 10} and c.num_cached_tokens == 0


def test_a_sequence_whose_weights_change_stops_adding_blocks():
    bm, sched, _ = make()
    a = add(sched, "a", range(6), max_tokens=8)
    step(sched)                                   # block 0 cached under version 0
    assert len(bm.cached) == 1
    step(sched, version=1)                        # a continues on new weights
    step(sched, version=1)
    assert a.kv_version is None and len(bm.cached) == 1
    run_to_end(sched, version=1)
    assert bm.num_free_blocks == bm.num_blocks


def test_reused_kv_gives_the_same_tokens_and_logprobs_as_computing_it(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    system = "You are a careful assistant. Answer in one short sentence, and never guess. " * 2
    prompts = [system + q for q in ("What is rain?", "Why is the sky blue?", "Name a prime.")]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs_mode="raw", ignore_eos=True)
    cold = LLM(str(tiny_model_dir), block_size=8, enable_prefix_caching=False)
    warm = LLM(str(tiny_model_dir), block_size=8)
    want = cold.generate(prompts, params)
    warm.generate(prompts[:1], params)            # computes (and caches) the shared prefix
    got = warm.generate(prompts, params)
    blocks = warm.core.blocks
    shared = len(warm.tokenizer(system).input_ids) // 8 * 8
    assert blocks.num_hit_tokens >= 3 * shared > 0
    assert cold.core.blocks.num_hit_tokens == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
        ref = torch.log_softmax(hf_logits(hf, g.prompt_token_ids, g.token_ids), -1)
        ref = ref.gather(1, torch.tensor(g.token_ids).unsqueeze(1)).squeeze(1)
        assert (torch.tensor(g.logprobs) - ref).abs().max().item() <= 1e-5
    assert blocks.num_free_blocks == blocks.num_blocks
