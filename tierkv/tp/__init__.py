"""Tensor parallelism: one process per rank, torch.distributed between them (NCCL between GPUs, gloo on CPU).

Rank 0 is the driver: it runs the scheduler, the sampler and the page manager's decisions. Every page-manager
call it makes is recorded; before each forward pass it broadcasts a compact step plan (those calls, then the
step's entries and token ids) to the other ranks, which replay the calls on their own page manager: the page
manager is deterministic, so every rank's block tables stay identical while each rank moves the bytes of its own
KV heads in its own tiers, in parallel. Weights are split Megatron-style (attention heads, MLP columns then
rows, vocabulary), with one all-reduce after attention and one after the MLP.

Under `torchrun`, every rank runs the same script: `tierkv.LLM(...)` on rank 0 returns the driver; on the other
ranks it serves rank 0 and exits the process when rank 0 closes.

Modules, each importing only those above it: `group` (the ranks' process groups, collectives, and which weight
shards a rank holds: what the model and the loader use), `driver` (rank 0: recording the page manager's calls,
sending step plans, failure reports), `follower` (the other ranks: replaying them), `launcher` (starting the ranks).
"""
