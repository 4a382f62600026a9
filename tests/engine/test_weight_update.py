"""In-flight weight updates on a tiny model: pause, drain and abort while streams run."""
import asyncio

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from engine import AsyncEngine, EngineConfig, GenerateRequest, SamplingParams
from engine.loader import load_state_dict


@pytest.fixture(scope="module")
def new_state(tiny_model_dir):
    g = torch.Generator().manual_seed(1)
    state = load_state_dict(tiny_model_dir)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def hf_with(state, model_dir):
    model = LlamaForCausalLM(AutoConfig.from_pretrained(str(model_dir))).eval()
    model.load_state_dict(state, strict=False)
    return model


async def collect(stream):
    tokens, versions, finish = [], [], None
    async for d in stream:
        tokens += d.token_ids
        versions += d.weights_versions
        finish = d.finish_reason
    return tokens, versions, finish


def run(tiny_model_dir, scenario):
    async def main():
        engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir)))
        await engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


def test_pause_with_cache_reset_continues_on_new_weights(tiny_model_dir, new_state):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def scenario(engine):
        ids = tuple(engine.tokenizer("Hello world, this is").input_ids)
        task = asyncio.create_task(collect(engine.add_request(GenerateRequest("a", ids, params))))
        while not engine.core.scheduler.running or engine.core.scheduler.running[0].num_completion_tokens < 5:
            await asyncio.sleep(0.001)
        version = await engine.update_weights(new_state, mode="pause", reset_cache=True)
        tokens, versions, finish = await task
        free = engine.core.blocks.num_free_blocks == engine.core.blocks.num_blocks
        return ids, tokens, versions, version, finish, free

    ids, tokens, versions, version, finish, free = run(tiny_model_dir, scenario)
    assert version == 1 and finish.value == "length" and free
    assert versions == sorted(versions) and versions[0] == 0 and versions[-1] == 1
    switch = versions.index(1)
    # After the swap (KV recomputed), each token is the new model's greedy choice.
    new = hf_with(new_state, tiny_model_dir)
    with torch.inference_mode():
        logits = new(torch.tensor([list(ids) + tokens])).logits[0]
    for t in range(switch, len(tokens)):
        assert tokens[t] == logits[len(ids) + t - 1].argmax().item()


def test_drain_lets_running_finish_on_old_weights(tiny_model_dir, new_state):
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)

    async def scenario(engine):
        ids = tuple(engine.tokenizer("Once upon a time").input_ids)
        first = asyncio.create_task(collect(engine.add_request(GenerateRequest("old", ids, params))))
        while not engine.core.scheduler.running:
            await asyncio.sleep(0.001)
        update = asyncio.create_task(engine.update_weights(new_state, mode="drain"))
        while engine.core.scheduler.admitting:      # the new weights are built; draining began
            await asyncio.sleep(0.001)
        later = asyncio.create_task(collect(engine.add_request(GenerateRequest("new", ids, params))))
        return await first, await later, await update

    (old_tokens, old_versions, _), (new_tokens, new_versions, _), version = run(tiny_model_dir, scenario)
    assert version == 1 and set(old_versions) == {0} and set(new_versions) == {1}
    assert len(old_tokens) == len(new_tokens) == 30


def test_abort_mode_ends_running_requests(tiny_model_dir, new_state):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def scenario(engine):
        ids = tuple(engine.tokenizer("Once upon a time").input_ids)
        running = asyncio.create_task(collect(engine.add_request(GenerateRequest("r", ids, params))))
        while not engine.core.scheduler.running:
            await asyncio.sleep(0.001)
        version = await engine.update_weights(new_state, mode="abort")
        after = await collect(engine.add_request(GenerateRequest("after", ids, SamplingParams(
            max_tokens=5, temperature=0.0))))
        return await running, after, version, engine.core.blocks.num_free_blocks == engine.core.blocks.num_blocks

    (_, versions, finish), after, version, free = run(tiny_model_dir, scenario)
    assert finish.value == "abort" and set(versions) <= {0}
    assert set(after[1]) == {1} and version == 1 and free


def test_mismatched_weights_are_refused(tiny_model_dir, new_state):
    bad = dict(new_state)
    bad["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)

    async def scenario(engine):
        with pytest.raises(ValueError, match="down"):
            await engine.update_weights(bad)
        return engine.weights_version

    assert run(tiny_model_dir, scenario) == 0


def test_a_rebuilt_model_keeps_the_heads_measured_onednn_path(tiny_model_dir, new_state):
    """The fp32 lm_head's oneDNN crossover is measured once, at load (calibrate_panels); a model
    built from new weights gets the same two paths, and both give the new head's logits."""
    import torch.nn.functional as F

    from engine import EngineCore
    from kernels.linear import NEVER, _onednn, keep_onednn_copy, panel_gemm

    runner = EngineCore(EngineConfig(model=str(tiny_model_dir))).runner
    measured = runner.model.lm_head.onednn_rows
    assert measured in (1, 2, 8, 32, NEVER)
    assert (runner.model.lm_head.packed is not None) == (measured != NEVER)
    keep_onednn_copy(runner.model.lm_head, 2)     # as if it had measured oneDNN faster from 2 rows
    model = runner.build_model(new_state)
    head = model.lm_head
    assert head.packed is not None and head.panels is not None and head.onednn_rows == 2
    g = torch.Generator().manual_seed(3)
    weight = new_state["lm_head.weight"]
    for rows in (1, 2, 5):
        hidden = torch.randn(rows, weight.shape[1], generator=g)
        logits = model.compute_logits(hidden)
        torch.testing.assert_close(logits, F.linear(hidden, weight), rtol=1e-5, atol=1e-4)
        want = (panel_gemm(hidden, head.panels, None, head.panel_data) if rows < 2
                else _onednn(hidden, head.packed, None))
        assert torch.equal(logits, want), rows
