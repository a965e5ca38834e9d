"""`tierkv serve` end to end on the CPU: the official openai client against a live server on a tiny model, streams
that equal the whole answers, concurrent clients that disconnect, and every error in OpenAI's shape."""

import asyncio
import json
import random
import socket
import threading
import time

import httpx2 as httpx
import openai
import pytest
from tiny_models import make_chat_checkpoint

import tierkv
from tierkv import SamplingParams
from tierkv.serve.app import build_app
from tierkv.serve.engine_loop import EngineLoop
from tierkv.serve.server import start_engine

NAME = "tiny"


def engine_options(nvme):
    # Tiers small enough that the KV of a few requests moves through all three.
    return dict(device="cpu", block_size=4, gpu_blocks=6, cpu_blocks=40, nvme_dir=str(nvme), nvme_blocks=256)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    make_chat_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    import uvicorn

    llm = tierkv.LLM(model_path, **engine_options(tmp_path_factory.mktemp("nvme")))
    engine = start_engine(llm, max_waiting=512)
    app = build_app(engine, NAME, api_key="secret", max_body_bytes=64 << 10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield SimpleServer(f"http://127.0.0.1:{port}", engine)
    srv.should_exit = True
    thread.join(timeout=30)
    engine.close(0)


class SimpleServer:
    def __init__(self, url, engine):
        self.url, self.engine = url, engine
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)

    def held_sequences(self) -> int:
        return self.engine.call(lambda llm: len(llm.pm.sequences)).result(timeout=30)


@pytest.fixture(scope="module")
def reference(model_path, tmp_path_factory):
    """The same model run alone through LLM.generate: what every client must get."""
    llm = tierkv.LLM(model_path, **engine_options(tmp_path_factory.mktemp("ref")))
    yield llm
    llm.close()


def greedy(n=8, **kw):
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def test_completions_chat_and_models(server, reference):
    c = server.client
    assert [m.id for m in c.models.list().data] == [NAME]
    prompt = "The tiers of a KV cache are"
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    want = reference.generate([prompt], greedy(), use_tqdm=False)[0]
    assert r.choices[0].text == want.outputs[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == len(want.prompt_token_ids)
    chat = [{"role": "user", "content": "what is paging?"}]
    r = c.chat.completions.create(model=NAME, messages=chat, max_completion_tokens=6, temperature=0)
    want = reference.chat(chat, greedy(6), use_tqdm=False)[0]
    assert r.choices[0].message.content == want.outputs[0].text and r.choices[0].message.role == "assistant"


def test_streams_equal_the_whole_answers(server):
    c = server.client
    for stop in (None, ["e"]):
        whole = c.completions.create(model=NAME, prompt="Once upon", max_tokens=12, temperature=0, stop=stop)
        chunks = list(
            c.completions.create(
                model=NAME,
                prompt="Once upon",
                max_tokens=12,
                temperature=0,
                stop=stop,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == whole.choices[0].text
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert reasons == [whole.choices[0].finish_reason]
    whole = c.completions.create(model=NAME, prompt="Once upon", max_tokens=8, temperature=0, logprobs=1)
    parts = c.completions.create(model=NAME, prompt="Once upon", max_tokens=8, temperature=0, logprobs=1, stream=True)
    streamed = [
        v for ch in parts if ch.choices and ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs
    ]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs)
    chat = [{"role": "user", "content": "tell me about blocks"}]
    whole = c.chat.completions.create(model=NAME, messages=chat, max_tokens=10, temperature=0)
    parts = c.chat.completions.create(model=NAME, messages=chat, max_tokens=10, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in parts) == whole.choices[0].message.content


def test_n_seed_stop_and_logprobs(server, reference):
    c = server.client
    r = c.completions.create(model=NAME, prompt="abc", max_tokens=6, temperature=1.0, seed=3, n=3)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    again = c.completions.create(model=NAME, prompt="abc", max_tokens=6, temperature=1.0, seed=3, n=3)
    assert [ch.text for ch in r.choices] == [ch.text for ch in again.choices]  # seeded: the same samples
    pen = dict(presence_penalty=0.8, frequency_penalty=0.4, extra_body={"repetition_penalty": 1.3, "min_tokens": 3})
    r = c.completions.create(model=NAME, prompt="abc", max_tokens=6, temperature=0, **pen)
    params = greedy(6, presence_penalty=0.8, frequency_penalty=0.4, repetition_penalty=1.3, min_tokens=3)
    assert r.choices[0].text == reference.generate(["abc"], params, use_tqdm=False)[0].outputs[0].text
    r = c.completions.create(model=NAME, prompt="abc", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    want = reference.generate(["abc"], greedy(6, logprobs=2), use_tqdm=False)[0].outputs[0]
    assert lp.token_logprobs == pytest.approx([s[t].logprob for s, t in zip(want.logprobs, want.token_ids)], abs=1e-5)
    r = c.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(
        len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content
    )


def test_echo_and_prompt_logprobs(server, reference):
    """`echo` puts the prompt (and, with logprobs, its tokens' entries: null for the first) before the completion,
    streamed or not; vLLM's `prompt_logprobs` extra field returns them in vLLM's shape. Both equal LLM.generate's
    prompt_logprobs."""
    c = server.client
    prompt = "the cat sat"
    want = reference.generate([prompt], greedy(4, logprobs=1, prompt_logprobs=1), use_tqdm=False)[0]
    ids, comp = want.prompt_token_ids, want.outputs[0]
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1)
    ch = r.choices[0]
    assert ch.text == prompt + comp.text
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [s[t].logprob for s, t in zip(want.prompt_logprobs[1:], ids[1:])]
    expected += [s[t].logprob for s, t in zip(comp.logprobs, comp.token_ids)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(ids)] == len(prompt)
    chunks = list(
        c.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1, stream=True)
    )
    assert "".join(k.choices[0].text for k in chunks if k.choices) == ch.text
    streamed = [t for k in chunks if k.choices and k.choices[0].logprobs for t in k.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(expected, abs=1e-5)
    plain = c.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0, echo=True)
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None
    extra = c.completions.create(
        model=NAME, prompt=prompt, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 0}
    ).choices[0]
    got = extra.model_dump()["prompt_logprobs"]
    assert got[0] is None and [list(s) for s in got[1:]] == [[str(t)] for t in ids[1:]]
    assert [s[str(t)]["logprob"] for s, t in zip(got[1:], ids[1:])] == pytest.approx(expected[: len(ids) - 1], abs=1e-5)
    assert extra.text == reference.generate([prompt], greedy(2), use_tqdm=False)[0].outputs[0].text  # no echo


def test_beam_search_over_http(server, reference):
    """vLLM's use_beam_search: the best n beams of width best_of (or n), as LLM.beam_search gives them, streamed or
    not; best_of without it is refused."""
    c = server.client
    want = reference.beam_search(["the cat"], tierkv.BeamSearchParams(beam_width=3, max_tokens=5))[0].sequences
    extra = {"use_beam_search": True, "best_of": 3}
    r = c.completions.create(model=NAME, prompt="the cat", max_tokens=5, n=2, extra_body=extra)
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == [b.text for b in want[:2]]
    chunks = list(c.completions.create(model=NAME, prompt="the cat", max_tokens=5, n=2, extra_body=extra, stream=True))
    texts = {}
    for k in chunks:
        for ch in k.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert [texts[i] for i in range(2)] == [b.text for b in want[:2]]
    chat = c.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        n=2,
        extra_body={"use_beam_search": True},
    )
    assert len(chat.choices) == 2 and chat.choices[0].message.content != chat.choices[1].message.content
    bad = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": NAME, "prompt": "x", "best_of": 3},
        headers={"Authorization": "Bearer secret"},
    )
    assert bad.status_code == 400 and "use_beam_search" in bad.json()["error"]["message"]
    bad = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": NAME, "prompt": "x", "use_beam_search": True, "echo": True, "logprobs": 1},
        headers={"Authorization": "Bearer secret"},
    )
    assert bad.status_code == 400 and "no log-probabilities" in bad.json()["error"]["message"]
    assert c.completions.create(model=NAME, prompt="still here", max_tokens=2).choices[0].text is not None


def test_usage_counts_a_reused_prefix(server):
    c = server.client
    prompt = "a shared system prompt " * 3
    first = c.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    second = c.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 4


def test_errors_have_openais_shape_and_the_server_goes_on(server):
    url, c = server.url, server.client
    auth = {"Authorization": "Bearer secret"}
    cases = [
        ({"model": NAME, "prompt": "x", "temperature": -1}, auth, 400, "temperature"),
        ({"model": NAME, "prompt": "x", "max_tokens": 10**6}, auth, 400, "max_model_len"),
        ({"model": NAME, "prompt": [5] * 1500, "max_tokens": 1}, auth, 400, "all tiers together hold"),  # 1,208 tokens
        ({"model": "gpt-9", "prompt": "x"}, auth, 404, "does not exist"),
        ({"model": NAME, "prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, "API key"),
        ({"model": NAME, "prompt": "x" * (70 << 10)}, auth, 413, "limit"),
        ({"model": NAME, "prompt": "x", "presence_penalty": 5}, auth, 400, "presence_penalty"),
        ({"model": NAME}, auth, 400, "prompt"),
        ({"model": NAME, "prompt": "x", "priority": 3}, auth, 400, 'scheduling_policy="priority"'),
    ]
    for body, headers, status, words in cases:
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert words in err["message"] and set(err) == {"message", "type", "param", "code"}

    def chunked():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(f"{url}/v1/completions", content=chunked(), headers=auth | {"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-9", prompt="x")
    assert c.completions.create(model=NAME, prompt="still here", max_tokens=2).choices[0].text is not None
    assert httpx.get(f"{url}/health").status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("tierkv_tier_used_blocks", "tierkv_link_bytes_total", "tierkv_time_to_first_token_seconds_bucket"):
        assert name in metrics


def test_a_step_that_fails_mid_stream_ends_it_with_an_error_event(server):
    def fail_third_step(llm):  # the server is idle otherwise: the steps are this request's
        real, calls = llm.step_outputs, []

        def step_outputs():
            calls.append(1)
            if len(calls) < 3:
                return real()
            llm.step_outputs = real  # once
            ids = [r.request_id for r in llm.engine.live.values()]
            llm.abort(ids)
            exc = RuntimeError("injected step failure")
            exc.aborted_request_ids = ids
            raise exc

        llm.step_outputs = step_outputs

    server.engine.call(fail_third_step).result(timeout=30)
    body = {"model": NAME, "prompt": "fail in the middle", "max_tokens": 30, "temperature": 0, "stream": True}
    headers = {"Authorization": "Bearer secret"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) >= 3 and events[-1] == "[DONE]"  # some text first, then the error
    error = json.loads(events[-2])["error"]
    assert "injected step failure" in error["message"] and error["type"] == "server_error"
    assert server.held_sequences() == 0
    assert server.client.completions.create(model=NAME, prompt="after", max_tokens=2).choices  # it goes on


def test_concurrent_streams_with_disconnects_get_their_own_answers(server, reference):
    rng = random.Random(0)
    prompts = [
        " ".join(rng.choice(["paged", "tier", "block", "cache", "swap"]) for _ in range(rng.randint(3, 12)))
        for _ in range(200)
    ]
    leave = set(rng.sample(range(len(prompts)), len(prompts) // 3))
    want = [o.outputs[0].text for o in reference.generate(prompts, greedy(10), use_tqdm=False)]

    async def client(i, http):
        body = {"model": NAME, "prompt": prompts[i], "max_tokens": 10, "temperature": 0, "stream": True}
        text, seen = "", 0
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text += json.loads(line[6:])["choices"][0]["text"]
                seen += 1
                if i in leave and seen >= 1 + i % 3:
                    return None  # leaves mid-stream: the connection closes
        return text

    async def main():
        headers = {"Authorization": "Bearer secret"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as http:
            return await asyncio.gather(*(client(i, http) for i in range(len(prompts))))

    got = asyncio.run(main())
    for i, text in enumerate(got):
        if i not in leave:
            assert text == want[i], i
    for _ in range(100):  # the aborts reach the engine's thread
        if server.held_sequences() == 0:
            break
        time.sleep(0.05)
    assert server.held_sequences() == 0
    links = server.engine.call(lambda llm: llm.stats()["links"]).result(timeout=30)
    assert links["gpu->cpu"]["bytes"] and links["cpu->nvme"]["bytes"]  # the KV went through all three tiers


def test_the_server_warms_up_on_the_engines_thread_before_taking_requests(model_path, monkeypatch):
    """cuDNN keeps its attention plans per thread: the warm-up that plans them runs where the steps will run."""
    import tierkv.start_up

    threads = []
    real = tierkv.start_up.warm_up
    monkeypatch.setattr(tierkv.start_up, "warm_up", lambda llm: (threads.append(threading.current_thread()), real(llm)))
    engine = start_engine(tierkv.LLM(model_path, device="cpu", gpu_blocks=8, cpu_blocks=8))
    try:
        assert threads == [engine.thread]
        steps = engine.call(lambda llm: llm.stats()["engine"]["steps"]).result(timeout=30)
        assert steps == 0  # the warm-up's steps are not counted
    finally:
        engine.close(0)


def test_a_full_queue_is_refused_with_503(model_path, tmp_path):
    from tierkv.serve.app import _status_of
    from tierkv.serve.engine_loop import QueueFull

    engine = EngineLoop(tierkv.LLM(model_path, device="cpu", gpu_blocks=8, cpu_blocks=8), max_waiting=0)

    async def ask():
        async for _ in engine.generate("r1", "hello", greedy()):
            pass

    try:
        with pytest.raises(QueueFull, match="requests are waiting already"):
            asyncio.run(ask())
        assert _status_of(QueueFull("x")).status == 503
    finally:
        engine.close(0)


def test_the_command_serves_and_drains_on_sigterm(model_path, tmp_path):
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = ["device=cpu", "block_size=4", "gpu_blocks=8", "cpu_blocks=32", f"nvme_dir={tmp_path}", "nvme_blocks=64"]
    cmd = [sys.executable, "-m", "tierkv", "serve", model_path, "--port", str(port), "--served-model-name", "t"]
    proc = subprocess.Popen(
        cmd + [a for o in options for a in ("--set", o)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        stream = iter(
            client.completions.create(model="t", prompt="drain me", max_tokens=30, temperature=0, stream=True)
        )
        chunks = [next(stream)]
        proc.send_signal(signal.SIGTERM)  # the running request finishes; then the engine closes
        chunks += list(stream)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert reasons == ["length"]
        # uvicorn re-raises the signal once it has shut down (the engine closed by then, in the app's shutdown)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "slots.idx").exists()  # the NVMe tier was opened and closed by the server
