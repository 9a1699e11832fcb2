"""The decode-graph unit without a GPU: buckets, the capture-on-second-use policy, the packed
input layout, and DecodeGraphs' fall-backs with a scripted capture in place of CUDA's."""

from __future__ import annotations

import pytest
import torch

from modelserver.graphs import CaptureOnSecondUse, DecodeGraphs, DecodeRow, bucket, pack
from modelserver.kvcache import KVPool

BS = 16  # block size


@pytest.mark.parametrize(("n", "want"), [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (64, 64), (65, 128)])
def test_bucket_rounds_up_to_a_power_of_two(n: int, want: int) -> None:
    assert bucket(n) == want


def test_a_bucket_is_captured_the_second_time_it_is_needed() -> None:
    policy = CaptureOnSecondUse()
    needs = [(1, 1), (2, 1), (1, 1), (1, 2), (2, 1), (1, 1)]
    assert [policy.wants(k) for k in needs] == [False, False, True, False, True, True]


def test_pack_lays_out_ids_positions_slots_lengths_then_the_table_and_pads_with_scratch() -> None:
    rows = [DecodeRow(token=11, position=3, slot=2 * BS + 3, blocks=[2]),
            DecodeRow(token=12, position=17, slot=5 * BS + 1, blocks=[4, 5])]
    scratch = 9
    assert pack(rows, batch=4, width=2, scratch=scratch, block_size=BS) == [
        11, 12, 0, 0,  # input ids
        3, 17, 0, 0,  # positions
        2 * BS + 3, 5 * BS + 1, scratch * BS, scratch * BS,  # slots: pad rows write the scratch block
        4, 18, 1, 1,  # sequence lengths: pad rows read one token
        2, 0, 4, 5,  # block tables
        scratch, 0, scratch, 0,  # pad rows read only the scratch block
    ]


def test_pack_of_no_rows_is_the_capture_time_input() -> None:
    assert pack([], batch=2, width=3, scratch=1, block_size=BS) == [
        0, 0, 0, 0, BS, BS, 1, 1, 1, 0, 0, 1, 0, 0]


def _pool(blocks: int = 8) -> KVPool:
    return KVPool(1, blocks, 1, 4, torch.float32, "cpu")


def test_off_the_gpu_graphs_are_off_and_cost_no_block() -> None:
    pool = _pool()
    graphs = DecodeGraphs(torch.nn.Linear(1, 1), pool, torch.device("cpu"), cuda_graphs=True)
    assert (graphs.enabled, graphs.reserved_blocks, graphs.scratch, pool.allocator.free) == (False, 0, -1, 8)
    assert graphs.decode([DecodeRow(1, 0, 0, [0])]) is None
    assert not graphs.on_out_of_memory()


class FakeStep:
    """Stands in for a captured step: 'replay' writes the static input into every logits row."""

    def __init__(self, b: int, w: int) -> None:
        size = 4 * b + b * w
        self.packed = torch.zeros(size, dtype=torch.int64)
        self.logits = torch.zeros(1, b, size, dtype=torch.int64)
        self.graph = self

    def replay(self) -> None:
        self.logits[0, :, :] = self.packed


class ScriptedGraphs(DecodeGraphs):
    """DecodeGraphs on the CPU with a scripted capture (``fail`` makes it raise)."""

    def __init__(self, fail: bool = False) -> None:
        self.pool_ = _pool()
        super().__init__(torch.nn.Linear(1, 1), self.pool_, torch.device("cpu"), cuda_graphs=True)
        self.fail = fail
        self.captures: list[tuple[int, int]] = []

    @staticmethod
    def supports(device: torch.device) -> bool:
        return True

    def _capture(self, b: int, w: int) -> FakeStep:  # type: ignore[override]
        self.captures.append((b, w))
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return FakeStep(b, w)


def _rows(n: int, blocks: int = 1) -> list[DecodeRow]:
    return [DecodeRow(100 + i, 5, (i * blocks) * BS + 5, list(range(i * blocks, (i + 1) * blocks))) for i in range(n)]


def test_the_second_need_captures_and_replays_with_the_packed_rows() -> None:
    graphs = ScriptedGraphs()
    assert (graphs.enabled, graphs.reserved_blocks, graphs.pool_.allocator.free) == (True, 1, 7)  # scratch taken
    rows = _rows(3, blocks=3)
    assert graphs.decode(rows) is None and graphs.captures == []  # first need: eager
    logits = graphs.decode(rows)
    assert graphs.captures == [(4, 4)] and (graphs.captured, graphs.replays, len(graphs)) == (1, 1, 1)
    assert logits is not None and logits.shape[0] == 3  # the pad row is cut off
    want = torch.tensor(pack(rows, 4, 4, graphs.scratch, BS))
    assert all(torch.equal(row, want) for row in logits)
    assert graphs.decode(_rows(4, blocks=4)) is not None  # the same bucket: replayed, not captured
    assert (graphs.captures, graphs.replays) == ([(4, 4)], 2)
    assert graphs.decode(_rows(5)) is None  # another bucket, first need


def test_dropped_graphs_are_captured_again_on_their_next_use() -> None:
    graphs = ScriptedGraphs()
    rows = _rows(2)
    assert graphs.decode(rows) is None and graphs.decode(rows) is not None
    graphs.drop()  # the pool grew
    assert len(graphs) == 0 and graphs.enabled
    assert graphs.decode(rows) is not None  # seen twice already: captured at once
    assert graphs.captures == [(2, 1), (2, 1)]


def test_a_failed_capture_turns_graphs_off_for_good() -> None:
    graphs = ScriptedGraphs(fail=True)
    rows = _rows(2)
    assert graphs.decode(rows) is None and graphs.decode(rows) is None
    assert graphs.captures == [(2, 1)] and not graphs.enabled and len(graphs) == 0
    assert graphs.decode(rows) is None and graphs.captures == [(2, 1)]  # never tried again
    assert graphs.reserved_blocks == 1  # the scratch block stays out of the pool


def test_out_of_memory_drops_held_graphs_and_turns_them_off() -> None:
    graphs = ScriptedGraphs()
    assert not graphs.on_out_of_memory() and graphs.enabled  # nothing held: nothing to retry
    rows = _rows(1)
    assert graphs.decode(rows) is None and graphs.decode(rows) is not None
    assert len(graphs) == 1
    assert graphs.on_out_of_memory()  # the step is worth retrying eagerly
    assert not graphs.enabled and len(graphs) == 0 and graphs.decode(rows) is None
