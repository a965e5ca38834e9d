"""The scheduler's decisions on stub sequences: decodes first, chunked prefill, GPU budget, streaming, slicing."""

import torch

from tierkv import SamplingParams
from tierkv.scheduler import Scheduler
from tierkv.sequence import Request, Sequence


def make(prompt_len, computed, arrival, generated=0, max_tokens=64):
    req = Request(str(arrival), arrival, None, [3] * prompt_len, SamplingParams(max_tokens=max_tokens), arrival)
    seq = Sequence(arrival, req, 0, [3] * (prompt_len + generated), prompt_len, torch.Generator(), computed)
    req.sequences.append(seq)
    return seq


def complete(entries):
    """What the engine does after a step: the entries' KV is computed, each sampled one gets a token."""
    for e in entries:
        e.seq.num_computed = e.end
        if e.samples:
            e.seq.token_ids.append(3)


def scheduler(gpu_blocks=100, tokens=64, slice_steps=2):
    return Scheduler(block_size=16, gpu_blocks=gpu_blocks, total_blocks=10_000, max_num_batched_tokens=tokens, max_num_seqs=8, slice_steps=slice_steps)


def test_decodes_go_first_and_a_long_prompt_is_chunked():
    s = scheduler()
    long_prompt = make(500, 0, 0)
    decoding = [make(20, 20, i, generated=1) for i in (1, 2)]
    s.running.extend([long_prompt, *decoding])
    for step in range(3):
        entries = s.schedule()
        kinds = [(e.seq.seq_id, e.num_tokens) for e in entries]
        assert kinds[:2] == [(1, 1), (2, 1)]  # every step keeps the decodes going
        assert kinds[2] == (0, 62)  # the rest of the 64-token budget goes to the prompt
        complete(entries)


def test_sequences_that_do_not_fit_the_gpu_wait_and_take_turns():
    s = scheduler(gpu_blocks=4, slice_steps=2)
    seqs = [make(30, 30, i, generated=1) for i in range(4)]  # 2 blocks each after the next token
    s.running.extend(seqs)
    groups = []
    for _ in range(6):
        groups.append([e.seq.seq_id for e in s.schedule()])
    assert groups == [[0, 1], [0, 1], [2, 3], [2, 3], [0, 1], [0, 1]]
    assert s.preemptions == 6  # a group of two rotated out after steps 2, 4 and 6


def test_prefetch_hints_name_the_next_group_and_keep_the_one_still_running():
    s = scheduler(gpu_blocks=4, slice_steps=3)
    seqs = [make(30, 30, i, generated=1) for i in range(4)]
    s.running.extend(seqs)
    hints = []
    for _ in range(4):
        s.schedule()
        hints.append(([q.seq_id for q in s.upcoming()], [q.seq_id for q in s.staying()]))
    # Step 1 of 3: nothing to prefetch. Step 2: the next group, best effort, without evicting [0, 1], which still
    # runs step 3. After step 3 the slice ends: the next group, and [0, 1] gives way.
    assert hints[0] == ([], [0, 1])
    assert hints[1] == ([2, 3], [0, 1])
    assert hints[2] == ([2, 3], [])
    assert hints[3] == ([], [2, 3])


def test_a_sequence_longer_than_the_gpu_runs_alone_with_a_window():
    s = scheduler(gpu_blocks=3, tokens=200, slice_steps=100)
    big = make(300, 0, 0)
    small = make(10, 0, 1)
    s.running.extend([big, small])
    entries = s.schedule()
    # While its KV still fits, the long prompt shares the GPU: 2 blocks for its chunk, 1 for the short prompt.
    assert [(e.seq, e.start, e.num_tokens, e.first_block) for e in entries] == [(big, 0, 32, 0), (small, 0, 10, 0)]
    big.num_computed = 160
    entries = s.schedule()
    # Now it is longer than the GPU tier: alone, positions [160, 208) go into blocks 10..12 (its window of 3)
    # and blocks 0..9 are streamed.
    assert [(e.seq, e.start, e.num_tokens, e.first_block) for e in entries] == [(big, 160, 48, 10)]
    big.num_computed = 170  # mid-block: the chunk shrinks so that its blocks still fit the window
    e = s.schedule()[0]
    assert (e.start, e.num_tokens, e.first_block) == (170, 38, 10)


def test_prefills_get_their_turn_beside_a_long_decode():
    """A decoding sequence that fills the GPU tier must not starve prompts waiting to be prefilled."""
    s = scheduler(gpu_blocks=2, slice_steps=2)
    long_decode = make(40, 40, 0, generated=1)  # 3 blocks after the next token: streams alone
    waiting = make(20, 0, 1)
    s.running.extend([long_decode, waiting])
    ran = []
    for _ in range(4):
        entries = s.schedule()
        ran.append([e.seq.seq_id for e in entries])
        complete(entries)
    assert ran == [[0], [0], [1], [1]]


def test_admission_reserves_every_sample():
    s = Scheduler(block_size=16, gpu_blocks=8, total_blocks=9, max_num_batched_tokens=64, max_num_seqs=8, slice_steps=8)
    a = Request("a", 0, None, [3] * 40, SamplingParams(max_tokens=24, n=2), 0)  # 4 blocks + 1 more for the 2nd sample
    b = Request("b", 1, None, [3] * 40, SamplingParams(max_tokens=24), 1)  # 4 blocks: does not fit beside a
    assert s.reservation(a) == 4 + (4 - 2)
    s.add(a)
    s.add(b)

    def make_seq(req):
        return Sequence(req.arrival, req, 0, list(req.prompt_ids), len(req.prompt_ids), torch.Generator())

    admitted = s.admit(make_seq)
    assert [r.request_id for r in admitted] == ["a"] and list(s.waiting) == [b]


def test_waiting_for_token_budget_alone_rotates_no_one():
    """Prompts that wait only for the step's token budget (the GPU has room for all) keep their order: the ones
    prefilling finish first and nobody counts as preempted. Where decodes take the whole budget, the order rotates
    so that the waiting prompts get their turn."""
    s = scheduler(gpu_blocks=1000, tokens=64, slice_steps=2)
    prompts = [make(100, 0, i) for i in range(4)]
    s.running.extend(prompts)
    order = []
    for _ in range(4):
        entries = s.schedule()
        order.append([e.seq.seq_id for e in entries])
        complete(entries)
    assert order == [[0], [0, 1], [0, 1], [0, 1, 2]]  # first come, first prefilled; then each decodes
    assert s.preemptions == 0
    starving = scheduler(gpu_blocks=1000, tokens=2, slice_steps=1)
    decoding = [make(20, 20, i, generated=1) for i in range(3)]
    waiting = make(50, 0, 3)
    starving.running.extend([*decoding, waiting])
    starving.schedule()  # three decodes take more than the 2-token budget: the prompt waits, the order rotates
    assert [q.seq_id for q in starving.running][-1] != 3
