"""How a step's whole prompts are cut into parts for cuDNN (kernels/prompt_shapes): bounded padding, power-of-two
counts, every prompt exactly once, and every shape a step can make among those planned ahead."""

import random

import pytest

from tierkv.kernels.prompt_shapes import Part, bucket_length, cut, previous_bucket, shapes_within


def test_buckets_pad_under_a_quarter_four_to_an_octave():
    buckets = sorted({bucket_length(n) for n in range(1, 1 << 15)})
    for n in range(1, 1 << 15):
        b = bucket_length(n)
        assert n <= b and b < 1.25 * n + 1  # under 25% padding (exact for n < 8)
        assert bucket_length(b) == b  # a bucket rounds to itself
    for k in range(3, 15):
        assert sum(1 << k <= b < 1 << (k + 1) for b in buckets) == 4
    assert [bucket_length(n) for n in (1000, 1024, 1025, 1281, 5000, 8192)] == [1024, 1024, 1280, 1536, 5120, 8192]
    # previous_bucket walks the same set downwards
    assert all(previous_bucket(b) == a for a, b in zip(buckets, buckets[1:]))


def test_a_run_of_equal_prompts_goes_as_power_of_two_parts_and_the_rest_is_left_over():
    parts, rest = cut([1024] * 15, min_length=512, min_tokens=4096)
    assert parts == [Part(1024, tuple(range(8))), Part(1024, tuple(range(8, 12)))]
    assert rest == [12, 13, 14]  # 3 x 1024 < 4096 tokens
    # Mixed lengths: short prompts left over, one bucket shared by 1000 and 1024 (rows not consecutive).
    parts, rest = cut([1000, 100, 1024, 3000, 1024, 1010], min_length=512, min_tokens=2048)
    assert parts == [Part(1024, (0, 2, 4, 5)), Part(3072, (3,))]
    assert rest == [1]


@pytest.mark.parametrize("budget", [4096, 16384, 50000])
def test_every_prompt_is_attended_once_and_every_part_shape_is_one_planned_ahead(budget):
    rng = random.Random(budget)
    max_length = 20000
    planned = set(shapes_within(budget, max_length))
    seen = set()
    for _ in range(400):
        lengths, left = [], budget
        while left > 0 and rng.random() < 0.9:
            n = min(left, max_length, rng.choice([rng.randint(1, 64), rng.randint(1, 3000), rng.randint(1, budget)]))
            lengths.append(n)
            left -= n
        parts, rest = cut(lengths)
        covered = sorted(rest + [i for p in parts for i in p.prompts])
        assert covered == list(range(len(lengths)))
        for p in parts:
            assert p.count & (p.count - 1) == 0 and p.count * p.length >= 4096
            assert list(p.prompts) == sorted(p.prompts)
            assert all(previous_bucket(p.length) < lengths[i] <= p.length for i in p.prompts)
            assert (p.count, p.length) in planned
            seen.add((p.count, p.length))
    assert seen  # the draw made parts at all
    assert len(planned) <= 100


def test_the_shapes_planned_for_the_benchmark_budget():
    shapes = shapes_within(16384, 131072)
    assert len(shapes) == 42
    assert (16, 1024) in shapes and (8, 1024) in shapes and (2, 8192) in shapes and (1, 16384) in shapes
    assert (16, 1280) not in shapes  # 16 prompts over 1,024 tokens pass the budget
    assert shapes_within(2048, 131072) == []  # the engine's default budget: no part reaches 4,096 tokens
    assert max(length for _, length in shapes_within(16384, 3000)) == 3072  # prompts no longer than max_length
