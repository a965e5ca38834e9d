"""The scheduler's decisions on stub sequences: decodes first, chunked prefill, GPU budget, streaming, slicing."""

import torch

from tierkv import SamplingParams
from tierkv.scheduler import Scheduler
from tierkv.sequence import Request, Sequence


def make(prompt_len, computed, arrival, generated=0, max_tokens=64):
    req = Request(str(arrival), arrival, None, [3] * prompt_len, SamplingParams(max_tokens=max_tokens), arrival)
    seq = Sequence(arrival, req, 0, [3] * (prompt_len + generated), prompt_len, torch.Generator(), computed)
    seq.started = computed > 0
    req.sequences.append(seq)
    return seq


def complete(entries):
    """What the engine does after a step: the entries' KV is computed, each sampled one gets a token."""
    for e in entries:
        e.seq.num_computed = e.end
        e.seq.started = True
        if e.samples:
            e.seq.token_ids.append(3)


def scheduler(gpu_blocks=100, tokens=64, slice_steps=2, oversubscribe=False):
    return Scheduler(
        block_size=16,
        gpu_blocks=gpu_blocks,
        total_blocks=10_000,
        max_num_batched_tokens=tokens,
        max_num_seqs=8,
        slice_steps=slice_steps,
        oversubscribe=oversubscribe,
    )


def test_decodes_go_first_and_a_long_prompt_is_chunked():
    s = scheduler()
    long_prompt = make(500, 0, 0)
    decoding = [make(20, 20, i, generated=1) for i in (1, 2)]
    s.running.extend([long_prompt, *decoding])
    for _ in range(3):
        entries = s.schedule()
        kinds = [(e.seq.seq_id, e.num_tokens) for e in entries]
        assert kinds[:2] == [(1, 1), (2, 1)]  # every step keeps the decodes going
        assert kinds[2] == (0, 62)  # the rest of the 64-token budget goes to the prompt
        complete(entries)


def test_whole_prompts_come_last():
    """Decodes, then prompts' later chunks, then prompts from their first token (the runner attends that trailing
    run of whole prompts apart, over their own keys), each kind in running order."""
    s = scheduler(tokens=200)
    new_a, later, new_b, decoding = make(30, 0, 0), make(100, 32, 1), make(20, 0, 2), make(20, 20, 3, generated=1)
    s.running.extend([new_a, later, new_b, decoding])
    assert [(e.seq.seq_id, e.start) for e in s.schedule()] == [(3, 20), (1, 32), (0, 0), (2, 0)]


def test_begun_sequences_that_outgrow_the_gpu_run_on_in_order_and_the_newest_wait():
    """Default scheduling: no turns. The first in running order keep the GPU; the one left out is preempted once
    (swapped down) and waits, however many steps, until a finish frees room."""
    s = scheduler(gpu_blocks=4, slice_steps=2)
    seqs = [make(30, 30, i, generated=1, max_tokens=4) for i in range(3)]  # 2 blocks each after the next token
    s.running.extend(seqs)
    s._last_group = {0, 1, 2}  # all three ran in the last step (before they grew past a block boundary)
    groups = [[e.seq.seq_id for e in s.schedule()] for _ in range(3)]
    assert groups == [[0, 1], [0, 1], [0, 1]] and s.preemptions == 1
    seqs[0].finish_reason = "length"  # (the engine's finish)
    s.finish(seqs[0])
    assert [e.seq.seq_id for e in s.schedule()] == [1, 2] and s.preemptions == 1
    upcoming, staying = s.prefetch_targets()
    assert [q.seq_id for q in staying] == [1, 2] and not upcoming


def test_oversubscribed_sequences_that_do_not_fit_the_gpu_take_turns():
    s = scheduler(gpu_blocks=4, slice_steps=2, oversubscribe=True)
    seqs = [make(30, 30, i, generated=1) for i in range(4)]  # 2 blocks each after the next token
    s.running.extend(seqs)
    groups = []
    for _ in range(6):
        groups.append([e.seq.seq_id for e in s.schedule()])
    # Staggered turns: each keeps the GPU for 2 steps, and one of the two gives way each step (the one that has run
    # longer), so that each step swaps one sequence, not two every other step.
    assert groups == [[0, 1], [1, 2], [2, 3], [3, 0], [0, 1], [1, 2]]
    assert s.preemptions == 6


def test_turns_are_staggered_to_about_group_over_slice_steps_a_step():
    """A group of 3 with slice_steps 4: 3/4 of a turn a step, so 3 steps in 4 let one sequence go; every sequence
    keeps the GPU 4 steps a turn (bar the first ones, which start together), everyone gets turns in order, and a
    group of one (a long sequence) gives way every slice_steps steps."""
    s = scheduler(gpu_blocks=6, slice_steps=4, oversubscribe=True)
    s.running.extend(make(30, 30, i, generated=1) for i in range(5))  # 2 blocks each: 3 fit
    groups = [[e.seq.seq_id for e in s.schedule()] for _ in range(12)]
    assert groups[:7] == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 0], [3, 4, 0], [4, 0, 1]]
    assert s.preemptions == 9  # 9 turns over 12 steps
    for k in range(5):
        steps = [i for i, g in enumerate(groups) if k in g]
        turns, run = [], [steps[0]]
        for i in steps[1:]:
            if i == run[-1] + 1:
                run.append(i)
            else:
                turns.append(run)
                run = [i]
        turns.append(run)
        # Every turn lasts slice_steps steps, except the first ones (0 to 2 start together and leave one by one)
        # and one still going at the end.
        assert all(len(t) == 4 for t in turns if t[0] > 0 and t[-1] < 11), (k, turns)
    one = scheduler(gpu_blocks=2, slice_steps=3, oversubscribe=True)
    one.running.extend(make(30, 30, i, generated=1) for i in range(2))  # one fits at a time
    assert [[e.seq.seq_id for e in one.schedule()] for _ in range(7)] == [[0], [0], [0], [1], [1], [1], [0]]


def test_prefetch_hints_name_the_next_group_and_keep_the_one_still_running():
    s = scheduler(gpu_blocks=4, slice_steps=3, oversubscribe=True)
    seqs = [make(30, 30, i, generated=1) for i in range(4)]
    s.running.extend(seqs)
    hints = []
    for _ in range(4):
        s.schedule()
        upcoming, staying = s.prefetch_targets()
        hints.append(([q.seq_id for q in upcoming], [q.seq_id for q in staying]))
    # Turns come at 2/3 a step. Step 1: nobody gives way, nothing to prefetch, [0, 1] stay. Step 2: 0 gives way;
    # 2 takes its place in step 3 beside 1. Step 3: 1 gives way to 3. Step 4: nobody gives way.
    assert hints[0] == ([], [0, 1])
    assert hints[1] == ([2], [1])
    assert hints[2] == ([3], [2])
    assert hints[3] == ([], [2, 3])


def test_a_sequence_longer_than_the_gpu_runs_alone_with_a_window():
    s = scheduler(gpu_blocks=3, tokens=200, slice_steps=100, oversubscribe=True)
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


def test_prefills_get_their_turn_beside_a_long_decode_when_oversubscribed():
    """With `oversubscribe`, a decoding sequence that fills the GPU tier must not keep a prompt waiting to be
    prefilled until it is done: they take turns. By default the prompt waits for it to finish (starting the
    prompt would swap the decode's KV out and back)."""
    ran = {}
    for over in (True, False):
        s = scheduler(gpu_blocks=2, slice_steps=2, oversubscribe=over)
        long_decode = make(40, 40, 0, generated=1, max_tokens=5)  # 3 blocks after the next token: streams alone
        waiting = make(20, 0, 1)
        s.running.extend([long_decode, waiting])
        ran[over] = []
        for _ in range(6):
            entries = s.schedule()
            ran[over].append([e.seq.seq_id for e in entries])
            complete(entries)
            if len(long_decode.output_ids) >= 5 and long_decode in s.running:
                s.finish(long_decode)  # what the engine does once its max_tokens are out
    assert ran[True][:4] == [[0], [0], [1], [1]]
    assert ran[False] == [[0], [0], [0], [0], [1], [1]]


def test_new_sequences_start_only_in_room_the_begun_ones_leave():
    """Four prompts of 40 tokens (3 blocks each with the next 2 tokens) on a 10-block GPU tier: three start, the
    fourth waits until one is done, and nobody is swapped out. With `oversubscribe` all four start and groups take
    turns on the GPU (preemptions)."""
    for over in (False, True):
        s = scheduler(gpu_blocks=10, tokens=200, slice_steps=2, oversubscribe=over)
        s.running.extend(make(40, 0, i, max_tokens=6 - i) for i in range(4))
        assert [e.seq.seq_id for e in s.schedule()] == ([0, 1, 2, 3] if over else [0, 1, 2])
        s = scheduler(gpu_blocks=10, tokens=200, slice_steps=2, oversubscribe=over)
        s.running.extend(make(40, 0, i, max_tokens=6 - i) for i in range(4))
        started_at = {}
        for step in range(40):
            if not s.running:
                break
            entries = s.schedule()
            for e in entries:
                started_at.setdefault(e.seq.seq_id, step)
            complete(entries)
            for q in list(s.running):
                if len(q.output_ids) >= q.params.max_tokens:
                    s.finish(q)
        assert not s.running and sorted(started_at) == [0, 1, 2, 3]
        if over:
            assert s.preemptions > 0
        else:
            assert s.preemptions == 0
            assert started_at[3] > max(started_at[k] for k in (0, 1, 2))  # after sequence 2 (max_tokens 4) was done
            assert started_at[3] == 4  # sequence 2's 4 tokens: its prompt step samples the first, 3 decode steps


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


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(
    prompts=st.lists(st.integers(1, 120), min_size=1, max_size=12),
    max_tokens=st.lists(st.integers(1, 20), min_size=12, max_size=12),
    gpu_blocks=st.integers(2, 40),
    tokens=st.integers(8, 96),
    slice_steps=st.integers(1, 8),
    over=st.booleans(),
)
def test_every_workload_finishes_and_each_step_fits_the_gpu(prompts, max_tokens, gpu_blocks, tokens, slice_steps, over):
    """Any mix of prompts and output lengths on any GPU tier finishes (no sequence waits forever: the begun ones
    always run, the new ones start as room frees), each step's blocks fit the GPU tier unless one sequence streams
    alone, and by default nobody is swapped out where a start leaves room for every output (max_tokens within
    slice_steps)."""
    s = scheduler(gpu_blocks=gpu_blocks, tokens=tokens, slice_steps=slice_steps, oversubscribe=over)
    seqs = [make(p, 0, i, max_tokens=max_tokens[i]) for i, p in enumerate(prompts)]
    s.running.extend(seqs)
    for _ in range(5000):
        if not s.running:
            break
        entries = s.schedule()
        assert entries, "running sequences but an empty step"
        if len(entries) > 1:
            assert sum(s.blocks_for(e.end) for e in entries) <= gpu_blocks
            assert all(e.first_block == 0 for e in entries)
        complete(entries)
        for q in list(s.running):
            if len(q.output_ids) >= q.params.max_tokens:
                s.finish(q)
    assert not s.running, f"{len(s.running)} sequences never finished"
    if not over and all(q.params.max_tokens <= slice_steps for q in seqs):
        assert s.preemptions == 0  # the begun ones never outgrow the room their start left them
