"""`tierkv run`: YAML batch runs end to end, kill -9 and resume, and every validation error with its message."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from tiny_models import make_checkpoint

import tierkv
from tierkv import BeamSearchParams, ConfigError, batch

PROMPTS = [
    "Once upon a time",
    "The quick brown fox",
    "Tiered memory keeps hot blocks",
    "a little cat who lived",
    "by the sea",
    "and the dog does not mind",
    "cold ones in host memory",
    "jumps over the lazy dog",
    "there was a little",
    "on the GPU and",
    "big house by the sea",
    "The dog",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path, "llama")
    return str(path)


def write_job(folder, model_dir, records=None, **sections):
    folder.mkdir(parents=True, exist_ok=True)
    records = records if records is not None else [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    with open(folder / "in.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    config = {
        "model": model_dir,
        "engine": {
            "device": "cpu",
            "gpu_blocks": 4,
            "cpu_blocks": 4,
            "nvme_dir": "nvme",
            "nvme_blocks": 64,
            "max_num_batched_tokens": 32,
        },
        "sampling": {"max_tokens": 40, "temperature": 0, "ignore_eos": True},
        "input": "in.jsonl",
        "output": "out/results.jsonl",
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def read_output(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_yaml_run_end_to_end_matches_the_python_api(model_dir, tmp_path):
    job = write_job(tmp_path / "job", model_dir)
    summary = batch.run(batch.load_spec(job), progress=False)
    assert summary["run"] == len(PROMPTS) and summary["generated_tokens"] == 40 * len(PROMPTS)
    rows = {r["id"]: r for r in read_output(tmp_path / "job" / "out" / "results.jsonl")}
    assert sorted(rows) == sorted(f"r{i}" for i in range(len(PROMPTS)))
    with tierkv.LLM(model_dir, device="cpu", gpu_blocks=8) as llm:
        want = llm.generate(
            PROMPTS, tierkv.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False
        )
    for i, out in enumerate(want):
        assert rows[f"r{i}"]["outputs"][0]["token_ids"] == out.outputs[0].token_ids
        assert rows[f"r{i}"]["text"] == out.outputs[0].text
    # A second run has nothing left to do.
    assert batch.run(batch.load_spec(job), progress=False)["run"] == 0


def test_chat_messages_and_per_record_overrides(model_dir, tmp_path):
    records = [
        {"id": 1, "prompt": "Once upon a time", "max_tokens": 3},
        {"id": 2, "prompt": "Once upon a time", "n": 2, "temperature": 1.0, "seed": 3},
    ]
    job = write_job(tmp_path / "job", model_dir, records)
    batch.run(batch.load_spec(job), progress=False)
    rows = {r["id"]: r for r in read_output(tmp_path / "job" / "out" / "results.jsonl")}
    assert len(rows[1]["outputs"][0]["token_ids"]) == 3
    assert len(rows[2]["outputs"]) == 2


def cli(job, *extra, wait=True):
    cmd = [sys.executable, "-m", "tierkv.cli", "run", job, "--no-progress", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if wait:
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err
    return proc


def lines_in(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill_9_at_any_moment_then_resume_gives_the_uninterrupted_output(model_dir, tmp_path):
    straight = write_job(tmp_path / "straight", model_dir)
    assert cli(straight)[0] == 0
    want = {r["id"]: r for r in read_output(tmp_path / "straight" / "out" / "results.jsonl")}
    assert len(want) == len(PROMPTS)

    for kills in ([1], [0.0, 4], [7]):  # after n records are out, or after a delay (0.0: during start-up)
        job_dir = tmp_path / f"killed-{'-'.join(map(str, kills))}"
        job = write_job(job_dir, model_dir)
        out = job_dir / "out" / "results.jsonl"
        for when in kills:
            proc = cli(job, wait=False)
            deadline = time.time() + 120
            if isinstance(when, float):
                time.sleep(when)
            else:
                while lines_in(out) < when and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            assert lines_in(out) < len(PROMPTS), f"kills {kills}: the run finished before the kill"
        code, _, err = cli(job)
        assert code == 0, err
        got = read_output(out)
        ids = [r["id"] for r in got]
        assert sorted(ids) == sorted(want) and len(ids) == len(set(ids)), f"kills {kills}: ids {ids}"
        for r in got:
            assert r == want[r["id"]], f"kills {kills}: record {r['id']} differs from the uninterrupted run"


def test_half_written_last_line_is_cut_off_and_redone(model_dir, tmp_path):
    job = write_job(
        tmp_path / "job", model_dir, [{"id": "a", "prompt": "The dog"}, {"id": "b", "prompt": "by the sea"}]
    )
    out = tmp_path / "job" / "out" / "results.jsonl"
    batch.run(batch.load_spec(job), progress=False)
    good = read_output(out)
    first, second = (json.dumps(r, ensure_ascii=False) for r in good)
    out.write_text(first + "\n" + second[: len(second) // 2])  # killed in the middle of writing the second line
    summary = batch.run(batch.load_spec(job), progress=False)
    assert summary["already_done"] == 1 and summary["run"] == 1
    assert sorted(r["id"] for r in read_output(out)) == ["a", "b"]
    assert {r["id"]: r for r in read_output(out)} == {r["id"]: r for r in good}


def test_record_priorities_run_under_the_priority_policy(model_dir, tmp_path):
    """Records with priorities: greedy results equal the same records run first come, first served."""
    records = [{"id": f"r{i}", "prompt": p, "priority": (i * 7) % 3} for i, p in enumerate(PROMPTS)]
    plain = [{k: v for k, v in r.items() if k != "priority"} for r in records]
    ranked = write_job(tmp_path / "ranked", model_dir, records, engine={"scheduling_policy": "priority"})
    fcfs = write_job(tmp_path / "fcfs", model_dir, plain)
    for job in (ranked, fcfs):
        batch.run(batch.load_spec(job), progress=False)
    got = {r["id"]: r["outputs"] for r in read_output(tmp_path / "ranked" / "out" / "results.jsonl")}
    want = {r["id"]: r["outputs"] for r in read_output(tmp_path / "fcfs" / "out" / "results.jsonl")}
    assert got == want and len(got) == len(PROMPTS)


def test_beam_search_records(model_dir, tmp_path):
    """sampling.beam_width makes a record a beam search: its result line holds the beams, best first, as
    LLM.beam_search gives them."""
    records = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS[:3])]
    records[1]["beam_width"] = 3  # a record's own width
    job = write_job(tmp_path / "job", model_dir, records, sampling={"beam_width": 2, "max_tokens": 6})
    text = yaml.safe_load(open(job))
    del text["sampling"]["temperature"]  # beam search takes no temperature
    open(job, "w").write(yaml.safe_dump(text))
    spec = batch.load_spec(job)
    batch.run(spec, progress=False)
    got = {r["id"]: r for r in read_output(tmp_path / "job" / "out" / "results.jsonl")}
    with tierkv.LLM(model_dir, **spec.engine) as llm:
        for r in records:
            width = r.get("beam_width", 2)
            want = llm.beam_search([r["prompt"]], BeamSearchParams(beam_width=width, max_tokens=6, ignore_eos=True))
            beams = want[0].sequences
            outs, n = got[r["id"]]["outputs"], got[r["id"]]["prompt_tokens"]
            assert [o["token_ids"] for o in outs] == [b.tokens[n:] for b in beams]
            assert len(outs) == width and [o["cumulative_logprob"] for o in outs] == pytest.approx(
                [b.cum_logprob for b in beams]
            )


def test_check_and_overrides(model_dir, tmp_path):
    job = write_job(tmp_path / "job", model_dir)
    code, out, err = cli(job, "--check")
    assert code == 0 and "ok, 12 records" in out and not os.path.exists(tmp_path / "job" / "out")
    spec = batch.load_spec(job, ["engine.eviction=clock", "sampling.max_tokens=5"])
    assert spec.engine["eviction"] == "clock" and spec.sampling["max_tokens"] == 5
    code, _, err = cli(job, "--check", "--set", "engine.eviction=fifo")
    assert code == 2 and "engine: eviction 'fifo' is not one of lru, clock" in err


def test_lossy_kv_storage_is_part_of_the_settings_fingerprint(model_dir, tmp_path):
    """A resume under another kv_cache_dtype or cold_kv_dtype would mix outputs of two precisions: the settings
    digest names them where set (and only there, so that earlier outputs keep their fingerprints)."""
    spec = batch.load_spec(write_job(tmp_path / "job", model_dir))
    digest = lambda: batch.prepare(spec)[0].fingerprint["settings"]  # noqa: E731
    exact = digest()
    spec.engine["kv_cache_dtype"] = "auto"
    assert digest() == exact
    spec.engine["kv_cache_dtype"] = "fp8"
    fp8 = digest()
    spec.engine.update(kv_cache_dtype="auto", cold_kv_dtype="fp8")
    assert len({exact, fp8, digest()}) == 3


@pytest.mark.parametrize(
    "change, records, message",
    [
        (dict(engin={"device": "cpu"}), None, "engin: unknown top-level key (did you mean 'engine'?)"),
        (dict(engine={"gpu_blokcs": 4}), None, "engine.gpu_blokcs: unknown key (did you mean 'gpu_blocks'?)"),
        (dict(engine={"gpu_blocks": "four"}), None, "engine.gpu_blocks: expected int | None, got 'four'"),
        (dict(sampling={"temperature": "hot"}), None, "sampling.temperature: expected float, got 'hot'"),
        ({}, [{"id": 1, "prompt": "a", "priority": 2}], 'start it with scheduling_policy="priority"'),
        ({}, [{"id": 1, "prompt": "a", "priority": "high"}], '"priority" must be an integer'),
        (dict(sampling={"length_penalty": 2.0}), None, "length_penalty apply to beam search only: set beam_width"),
        (dict(sampling={"beam_width": 2}), None, "beam search (beam_width) takes max_tokens, ignore_eos"),
        (dict(sampling={"max_tokens": 0}), None, "sampling: SamplingParams.max_tokens=0"),
        (
            dict(sampling={"temperature": float("nan")}),
            None,
            "sampling: SamplingParams.temperature=nan: must be a finite number",
        ),
        (dict(input="missing.jsonl"), None, "input: file"),
        (dict(model=None), None, "model: expected a string"),
        (dict(engine={"gpu_blocks": 1}), None, "engine.gpu_blocks/gpu_memory: the GPU tier holds 1 blocks"),
        (dict(engine={"kv_cache_dtype": "int3"}), None, "engine: kv_cache_dtype 'int3' is not one of 'auto'"),
        (
            dict(engine={"cpu_blocks": 0, "nvme_blocks": 2}, sampling={"max_tokens": 200}),
            None,
            "may need 13 KV blocks but all tiers together hold 6",
        ),
        ({}, [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}], "in.jsonl:2: duplicate id 1 (first on line 1)"),
        ({}, [{"prompt": "a"}], 'in.jsonl:1: missing "id"'),
        ({}, [{"id": 1, "prompt": "a", "messages": []}], 'give exactly one of "prompt"'),
        (
            {},
            [{"id": 1, "prompt": "a", "temperatur": 0}],
            "(id 1).temperatur: unknown key (did you mean 'temperature'?)",
        ),
    ],
)
def test_validation_errors_name_the_key_and_the_fix(model_dir, tmp_path, change, records, message):
    job = write_job(tmp_path / "job", model_dir, records, **change)
    if change.get("model", "") is None:
        text = yaml.safe_load(open(job))
        text["model"] = None
        open(job, "w").write(yaml.safe_dump(text))
    with pytest.raises(ConfigError) as err:
        spec = batch.load_spec(job)
        batch.prepare(spec)
    assert message in str(err.value), str(err.value)
    assert not os.path.exists(tmp_path / "job" / "out")  # nothing ran, nothing was written


def test_the_demos_set_paths_mean_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = batch.paths_from_here(
        ["input=mine.jsonl", "engine.nvme_dir=../disk", "output=/abs/o.jsonl", "engine.eviction=clock", "model=./ckpt"]
        + ["model=smollm2-135m-instruct"]
    )
    assert got == [
        f"input={tmp_path}/mine.jsonl",
        f"engine.nvme_dir={tmp_path.parent}/disk",
        "output=/abs/o.jsonl",
        "engine.eviction=clock",
        f"model={tmp_path}/ckpt",
        "model=smollm2-135m-instruct",
    ]
