"""Completion handles: combining them without repeats."""

from concurrent.futures import Future

from tierkv.handles import DONE, AllOf, FutureHandle, all_of


class Counting(FutureHandle):
    """A handle that counts how often a stream was made to wait on it."""

    def __init__(self) -> None:
        fut: Future = Future()
        fut.set_result(None)
        super().__init__(fut)
        self.waits = 0

    def wait_on(self, stream) -> None:
        self.waits += 1


def test_all_of_drops_done_and_repeats_also_inside_nested_all_ofs():
    a, b, c = Counting(), Counting(), Counting()
    assert all_of([]) is DONE and all_of([DONE, DONE]) is DONE
    assert all_of([a, DONE, a]) is a
    # What 2,048 blocks freed by one transfer look like: one AllOf of the same two handles each.
    nested = [all_of([a, b]) for _ in range(2048)] + [c, DONE]
    combined = all_of(nested)
    assert isinstance(combined, AllOf) and combined.parts == [a, b, c]
    combined.wait_on(None)
    assert (a.waits, b.waits, c.waits) == (1, 1, 1)
