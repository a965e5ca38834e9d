"""The engine's side of beam search: the step's candidates reduced on the device, and the search's decisions carried
out on the beams' sequences (forks that share blocks, pruned beams freed at once).

A search only ever keeps its top `2k` (or more, with several EOS tokens) candidates, and any of those is among its
own beam's top ones, so each beam row is cut to its top candidates where the logits are (log-softmax in float32,
top-k, one copy to the host for the whole step) instead of copying whole vocabulary rows to the host per request.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tierkv.engine import Engine
    from tierkv.sequence import Request


def beam_candidates(logits: torch.Tensor, rows: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of `rows` of `logits` as its `width` most likely next tokens (fewer for a smaller vocabulary): their
    log-probabilities (float32) and token ids, on the host, best first."""
    picked = logits[torch.tensor(rows, device=logits.device)].float()
    values, ids = torch.topk(torch.log_softmax(picked, dim=-1), k=min(width, picked.shape[-1]), dim=-1)
    return values.cpu(), ids.cpu()


def advance(engine: Engine, req: Request) -> None:
    """One step of a beam search once its running beams' candidates are in: the search picks the next beams; a
    beam picked more than once forks (sharing its blocks), a beam not picked is freed at once, and each picked one
    takes its new token."""
    old = req.beam_seqs
    values = torch.stack([req.beam_rows[s.seq_id][0] for s in old])
    ids = torch.stack([req.beam_rows[s.seq_id][1] for s in old])
    req.beam_rows.clear()
    picks = req.beam.step(values, ids)
    if req.beam.done:  # the search is over: every running beam is let go
        picks = []
    now = time.perf_counter()
    picked = {old[p].seq_id for p, _ in picks}
    for s in {s.seq_id: s for s in old}.values():  # the pruned first: their blocks are free for the forks' copies
        if s.seq_id not in picked:
            s.finish_reason, s.finish_time, s.beam_waiting = "pruned", now, False
            engine.scheduler.finish(s)
            engine.pm.free(s.seq_id)
    kept: set[int] = set()
    new = []
    for parent_index, token in picks:
        parent = old[parent_index]
        if parent.seq_id in kept:  # forked before any of this step's tokens is appended
            child = engine.fork(parent)
        else:
            kept.add(parent.seq_id)
            child = parent
        new.append((child, token))
    for child, token in new:
        child.token_ids.append(token)
        child.beam_waiting = False
        child.first_token_time = child.first_token_time or now
        engine.counters.generated_tokens += 1
    req.beam_seqs = [child for child, _ in new]
    if req.beam.done:
        engine.retire(req)
