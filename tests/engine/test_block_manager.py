from engine.block_manager import BlockManager
from engine.sequence import Sequence
from engine.types import SamplingParams


def seq(n_tokens: int) -> Sequence:
    return Sequence("r", 0, list(range(n_tokens)), n_tokens, SamplingParams(), seed=0)


def test_allocate_covers_tokens_and_free_returns_everything():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(10)
    assert bm.blocks_needed(s, 10) == 3
    bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    s.num_computed_tokens = 10
    assert bm.blocks_needed(s, 2) == 0        # 12 tokens still fit in 3 blocks of 4
    assert bm.blocks_needed(s, 3) == 1
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and s.num_computed_tokens == 0
    assert sorted(bm.free_ids) == list(range(8))


def test_shared_block_survives_until_last_reference():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = seq(4), seq(4)
    bm.allocate(a, 4)
    shared = a.block_table[0]
    bm.ref_counts[shared] += 1                 # b shares a's block
    b.block_table.append(shared)
    bm.free(a)
    assert shared not in bm.free_ids and bm.num_free_blocks == 3
    bm.free(b)
    assert shared in bm.free_ids and bm.num_free_blocks == 4
