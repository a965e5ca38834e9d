"""`tierkv run CONFIG.yaml`: batch runs from a YAML file, resumable after any kill.

The YAML maps onto tierkv's own dataclasses key for key:

    model: smollm2-135m-instruct     # a checkpoint folder, a packaged model's name, or a config (engine.load_format: dummy)
    engine: {...}                    # tierkv.LLM options: the fields of tierkv.EngineConfig
    sampling: {...}                  # defaults for every record: the fields of tierkv.SamplingParams (or, with
                                     # beam_width, of tierkv.BeamSearchParams: a beam search per record)
    input: prompts.jsonl             # one JSON object per line: "id", "prompt" (text) or "messages" (chat), "priority"
    output: out/results.jsonl        # one JSON object per finished record, appended and flushed as it finishes
    cluster: {...}                   # optional: replicas on a Ray cluster, the fields of tierkv.config.ClusterConfig
                                     # (run by tierkv.cluster.driver; this module's run() is the single process)

Relative paths are relative to the YAML file. Each input record may override sampling fields. Everything is
checked before the weights load: unknown keys, wrong types, missing files, capacities that cannot work,
duplicate or missing ids. A run that is killed (kill -9 included) and started again skips the records already
in the output (a half-written last line is cut off) and runs the rest; greedy results do not depend on which
records share a batch, so the output is the same as an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field

import torch
import yaml

from tierkv import inputs
from tierkv.batch_output import OutputFile, check_output_path, digest, model_signature, peek_finished
from tierkv.batch_sections import check_section, sampling_params, suggest
from tierkv.beam import BeamSearchParams
from tierkv.config import ClusterConfig, EngineConfig, resolve_device
from tierkv.errors import ConfigError, TierKVError
from tierkv.sampling import SamplingParams

TOP_KEYS = ("model", "engine", "sampling", "input", "output", "cluster")
RECORD_KEYS = ("id", "prompt", "messages", "priority")
# Sampling fields added after outputs began to carry fingerprints: part of a fingerprint only when set, so that an
# output written before they existed still resumes.
LATER_SAMPLING_FIELDS = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
    "logit_bias": None,
    "prompt_logprobs": None,
}
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")  # package data


@dataclass
class Record:
    id: str | int
    line: int
    prompt: str | None
    messages: list | None
    sampling: dict
    fingerprint: str = ""  # digest of the input line's object: a result answers this record, not another
    priority: int = 0  # under engine.scheduling_policy "priority": lower runs first


@dataclass
class RunSpec:
    path: str
    model: str
    engine: dict
    sampling: dict
    input: str
    output: str
    records: list[Record] = field(default_factory=list)
    cluster: ClusterConfig | None = None  # replicas on Ray (tierkv.cluster.driver), or None: this process


# -- reading and checking the YAML -------------------------------------------------------------------------------


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set engine.eviction=clock` style overrides: a dotted key path and a YAML value."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as KEY=VALUE, e.g. --set engine.eviction=clock")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a mapping in the config")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


PATH_KEYS = ("input", "output", "engine.nvme_dir", "engine.tokenizer")


def paths_from_here(overrides: list[str]) -> list[str]:
    """The overrides with their relative paths made absolute against the current directory (for the demo, whose
    YAML lies inside the installed package: a path the user types means here, not there)."""
    out = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        value = raw.strip()
        is_path = key.strip() in PATH_KEYS or (key.strip() == "model" and (os.sep in value or value.startswith(".")))
        if eq and is_path and value and not os.path.isabs(value):
            item = f"{key}={os.path.abspath(value)}"
        out.append(item)
    return out


def load_spec(path: str, overrides: list[str] = ()) -> RunSpec:
    """Parse and check a run config (no model is loaded); raises ConfigError naming the key and the fix."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys {', '.join(TOP_KEYS)}")
    data = apply_overrides(data, list(overrides))
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(
                f"{key}: unknown top-level key{suggest(key, TOP_KEYS)}; known keys: {', '.join(TOP_KEYS)}"
            )
    for key in ("model", "input", "output"):
        if key not in data:
            raise ConfigError(
                f"{key}: missing; a run config needs {', '.join(k for k in TOP_KEYS if k in ('model', 'input', 'output'))}"
            )
        if not isinstance(data[key], str) or not data[key]:
            raise ConfigError(f"{key}: expected a string, got {data[key]!r}")
    base = os.path.dirname(os.path.abspath(path))

    def local(p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    engine = check_section("engine", data.get("engine"), EngineConfig, exclude=("model",))
    if engine.get("nvme_dir"):
        engine["nvme_dir"] = local(engine["nvme_dir"])
    if engine.get("tokenizer"):
        engine["tokenizer"] = local(engine["tokenizer"])
    sampling = check_section("sampling", data.get("sampling"), SamplingParams, also=BeamSearchParams)
    model = data["model"]
    if os.sep in model or model.startswith(".") or os.path.exists(local(model)):
        model = local(model)
    spec = RunSpec(path, model, engine, sampling, local(data["input"]), local(data["output"]))
    spec.cluster = cluster_section(data.get("cluster"), engine)
    try:  # (a cluster's replicas may have the GPUs that this machine, the driver, lacks)
        EngineConfig(model=spec.model, **{**engine, **({"device": "cpu"} if spec.cluster else {})})
    except ConfigError as exc:
        raise ConfigError(f"engine: {exc}") from None
    sampling_params(sampling, "sampling")
    if not os.path.isfile(spec.input):
        raise ConfigError(f"input: file {spec.input!r} does not exist")
    check_paths_apart(spec)
    check_output_path(spec.output)
    spec.records = read_records(spec.input)
    return spec


def cluster_section(data, engine: dict) -> ClusterConfig | None:
    """The `cluster:` section checked (None without one), Ray's presence too: before anything loads or starts."""
    if data is None:
        return None
    try:
        cluster = ClusterConfig(**check_section("cluster", data, ClusterConfig))
    except ConfigError as exc:
        raise ConfigError(exc if str(exc).startswith("cluster.") else f"cluster: {exc}") from None
    if engine.get("device") not in ("cpu", "cuda"):
        raise ConfigError(
            f"engine.device: a cluster run needs it set to 'cuda' or 'cpu' (got {engine.get('device')!r}): the "
            "replicas' device, which this machine cannot tell (Ray gives each replica its GPUs, so not 'cuda:N')"
        )
    cluster.gpus(engine)  # (checked: replicas sharing a GPU, tensor parallelism)
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("cluster: needs Ray, which is not installed here; pip install 'tierkv[ray]'")
    return cluster


def check_paths_apart(spec: RunSpec) -> None:
    """The output must not be (or live inside) anything else the run reads or owns: the input, the config, the
    model's files, the NVMe tier's directory. Writing there would destroy it."""
    out = os.path.realpath(spec.output)
    fix = "choose another output path"
    for what, path in (("input", spec.input), ("config", spec.path)):
        if out == os.path.realpath(path):
            raise ConfigError(
                f"output {spec.output!r} is the same file as the {what}; the run would overwrite it; {fix}"
            )
    owned = [("nvme_dir", spec.engine.get("nvme_dir"))]
    if os.path.exists(spec.model):
        owned.append(("model", spec.model))
    for what, path in owned:
        if not path:
            continue
        real = os.path.realpath(path)
        if out == real or out.startswith(real.rstrip(os.sep) + os.sep):
            raise ConfigError(f"output {spec.output!r} lies inside {what} {path!r}, which tierkv owns or reads; {fix}")
    nvme = spec.engine.get("nvme_dir")
    if nvme and os.path.realpath(spec.input).startswith(os.path.realpath(nvme).rstrip(os.sep) + os.sep):
        raise ConfigError(
            f"input {spec.input!r} lies inside nvme_dir {nvme!r}, whose files tierkv rewrites; move the input"
        )


def read_records(path: str) -> list[Record]:
    """The input JSONL, checked: ids present and unique, a prompt or messages, known sampling overrides."""
    records, seen = [], {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"input {os.path.basename(path)}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"{where}: not UTF-8 text (byte {exc.start} of the line); save the input as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{where}: each line must be a JSON object")
            if "id" not in obj or not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
                raise ConfigError(f'{where}: missing "id" (a string or an integer); every record needs a unique id')
            rid = obj["id"]
            if str(rid) in seen:
                raise ConfigError(f"{where}: duplicate id {rid!r} (first on line {seen[str(rid)]}); ids must be unique")
            seen[str(rid)] = n
            has_prompt, has_messages = "prompt" in obj, "messages" in obj
            if has_prompt == has_messages:
                raise ConfigError(f'{where}: give exactly one of "prompt" (text) or "messages" (a chat)')
            if has_prompt and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
                raise ConfigError(f'{where}: "prompt" must be a non-empty string')
            if has_messages:
                inputs.check_messages(obj["messages"], f'{where}: "messages"')
            overrides = {k: v for k, v in obj.items() if k not in RECORD_KEYS}
            record_where = f"{where} (id {rid!r})"
            check_section(record_where, overrides, SamplingParams, also=BeamSearchParams)
            priority = obj.get("priority", 0)
            if not isinstance(priority, int) or isinstance(priority, bool):
                raise ConfigError(f'{where}: "priority" must be an integer (lower runs first), got {priority!r}')
            records.append(Record(rid, n, obj.get("prompt"), obj.get("messages"), overrides, digest(obj), priority))
    if not records:
        raise ConfigError(f"input {path}: no records")
    return records


# -- the output file -----------------------------------------------------------------------------------------------


def result_line(prepared: PreparedRecord, output) -> dict:
    outs = [
        {
            k: v
            for k, v in {
                "index": o.index,
                "text": o.text,
                "token_ids": o.token_ids,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
                "logprobs": _jsonable_logprobs(o.logprobs),
                "cumulative_logprob": o.cumulative_logprob if isinstance(prepared.params, BeamSearchParams) else None,
            }.items()
            if v is not None or k == "stop_reason"
        }
        for o in output.outputs
    ]
    return {
        "id": prepared.record.id,
        "prompt_tokens": len(output.prompt_token_ids),
        "text": outs[0]["text"],
        "outputs": outs,
        "fingerprint": prepared.fingerprint,
    }


def _jsonable_logprobs(logprobs):
    return None if logprobs is None else [{str(k): v.logprob for k, v in step.items()} for step in logprobs]


# -- running ------------------------------------------------------------------------------------------------------


@dataclass
class PreparedRecord:
    record: Record
    token_ids: list[int]
    params: SamplingParams | BeamSearchParams
    fingerprint: dict  # {"input": digest of the input record, "settings": digest of what shapes its result}


def prepare(spec: RunSpec) -> list[PreparedRecord]:
    """Tokenize the records and check that each can run (the model's limits, the tiers' capacity) before the
    weights load; each comes with the fingerprint its result line will carry. For a cluster run, the checks are
    those this machine can make for the replicas' device."""
    from tierkv.capacity import check_gpu_tier, check_request_fits, make_scheduler, resolve_capacities
    from tierkv.layout import KVLayout
    from tierkv.loader import default_dtype, load_hf_config, load_tokenizer, resolve_config_path
    from tierkv.model import ModelSpec

    remote_cuda = spec.cluster is not None and spec.engine["device"] == "cuda" and not torch.cuda.is_available()
    cfg = EngineConfig(model=spec.model, **{**spec.engine, **({"device": "cpu"} if remote_cuda else {})})
    path = resolve_config_path(spec.model)
    hf_config = load_hf_config(path)
    mspec = ModelSpec.from_hf_config(hf_config)
    device = (
        torch.device("cuda")
        if remote_cuda
        else resolve_device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    )
    dtype = cfg.dtype or default_dtype(hf_config, device)
    layout = KVLayout(mspec.num_layers, mspec.num_kv_heads, mspec.head_dim, dtype, cfg.block_size, cfg.gpu_codec)
    tokenizer = load_tokenizer(cfg.tokenizer or path) if os.path.isdir(cfg.tokenizer or path) else None
    max_model_len = cfg.max_model_len or mspec.max_position_embeddings or 1 << 30
    gpu_known = cfg.gpu_blocks is not None or cfg.gpu_memory is not None or device.type != "cuda"
    if gpu_known:  # (defaults on CUDA are the free memory of a device, found once there)
        cold_nbytes = layout.compressed(cfg.cold_codec).block_nbytes
        gpu, cpu, nvme = resolve_capacities(cfg, layout.block_nbytes, device, cold_nbytes=cold_nbytes)
        try:
            check_gpu_tier(gpu, layout.block_nbytes)
        except ConfigError as exc:
            raise ConfigError(f"engine.gpu_blocks/gpu_memory: {exc}") from None
        sched = make_scheduler(cfg, gpu, cpu, nvme)
    try:
        inputs.priorities([r.priority for r in spec.records], len(spec.records), cfg.scheduling_policy)
    except ConfigError as exc:
        raise ConfigError(f"input {spec.input}: {exc} (engine.scheduling_policy)") from None
    # What shapes a result besides its record: the weights and tokenizer (their files' signatures), how they run.
    shared = {
        "model": model_signature(path),
        "tokenizer": model_signature(cfg.tokenizer) if cfg.tokenizer else None,
        "load_format": cfg.load_format,
        "dtype": str(dtype),
        "seed": cfg.seed,
        "device": device.type,
    }
    # Lossy KV storage shapes results too; named only where set, so that earlier results keep their fingerprints.
    shared.update({k: v for k in ("kv_cache_dtype", "cold_kv_dtype") if (v := getattr(cfg, k)) not in ("auto", None)})
    prepared = []
    for r in spec.records:
        where = f"input line {r.line} (id {r.id!r})"
        params = sampling_params({**spec.sampling, **r.sampling}, where)
        beam, params = (params, params.reservation()) if isinstance(params, BeamSearchParams) else (None, params)
        if tokenizer is None:
            raise ConfigError(
                f"model {spec.model!r} has no tokenizer for text prompts; set engine.tokenizer to a tokenizer folder"
            )
        if r.messages is not None:
            ids = inputs.chat_token_ids(tokenizer, r.messages, f'{where}: "messages"')
        else:
            ids = tokenizer(r.prompt).input_ids
        if not ids:
            raise ConfigError(f"{where}: the prompt tokenizes to nothing; give some text")
        inputs.check_request(where, len(ids), params, mspec.vocab_size, max_model_len)
        if gpu_known:
            try:
                check_request_fits(where, len(ids), params, sched, gpu, cpu, nvme)
            except TierKVError as exc:
                raise ConfigError(f"engine (capacity): {exc}") from None
        sampling = {
            k: v
            for k, v in dataclasses.asdict(params).items()
            if k != "stop_list" and not (k in LATER_SAMPLING_FIELDS and v == LATER_SAMPLING_FIELDS[k])
        }
        if beam is not None:  # (only then: results written before beam search existed keep their fingerprints)
            sampling["beam"] = dataclasses.asdict(beam)
        prepared.append(
            PreparedRecord(
                r,
                ids,
                beam or params,
                {"input": r.fingerprint, "settings": digest({**shared, "sampling": sampling})},
            )
        )
    return prepared


def check_run(spec: RunSpec, fresh: bool = False) -> tuple[list[PreparedRecord], set]:
    """Everything a run checks before it loads the model, changing nothing: the records, and the output (writable,
    not in use, its lines from this input and these settings). Returns (records, ids already done)."""
    prepared = prepare(spec)
    done = set() if fresh else peek_finished(spec.output, {p.record.id: p.fingerprint for p in prepared})
    return prepared, done  # (load_spec checked the output path, and that no run holds it)


def still_to_run(
    spec: RunSpec, prepared: list[PreparedRecord], out: OutputFile, fresh: bool
) -> tuple[list[PreparedRecord], dict]:
    """The records not yet answered in the (locked) output, and the run's summary so far (complete, with no time
    spent, when none is left)."""
    done = set() if fresh else out.finished({p.record.id: p.fingerprint for p in prepared})
    todo = [p for p in prepared if p.record.id not in done]
    summary = {
        "config": spec.path,
        "records": len(spec.records),
        "already_done": len(done),
        "run": len(todo),
        "output": spec.output,
    }
    if not todo:
        summary.update(wall_s=0.0, generated_tokens=0)
    return todo, summary


def run(spec: RunSpec, *, fresh: bool = False, show: bool = False, progress: bool = True, echo=print) -> dict:
    """Run every record not yet in the output; returns a summary (also when there was nothing left to do).

    Order, so that nothing is lost to a bad config or a second run: check every record; lock the output (a second
    run on it stops here); check its lines; load the model and take the tiers (the NVMe directory's lock); only then
    discard the old output (--fresh) and run."""
    from tierkv.llm import LLM

    if spec.cluster is not None:
        raise ConfigError(f"{spec.path}: a run with a cluster: section runs through tierkv.cluster.driver.run")
    prepared = prepare(spec)
    out = OutputFile(spec.output)
    llm = bar = None
    try:
        todo, summary = still_to_run(spec, prepared, out, fresh)
        if not todo:
            return summary
        t0 = time.perf_counter()
        llm = LLM(spec.model, **spec.engine)
        summary["load_s"] = time.perf_counter() - t0
        if fresh:
            out.discard()
        by_rid = {str(p.record.id): p for p in todo}
        llm.add_requests(
            [p.token_ids for p in todo],
            [p.params for p in todo],
            request_ids=[str(p.record.id) for p in todo],
            priority=[p.record.priority for p in todo],
        )
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(spec.records), initial=summary["already_done"], desc="records", unit="rec", dynamic_ncols=True
            )
        t1 = time.perf_counter()
        tokens0 = llm.engine.counters.generated_tokens
        while llm.has_unfinished():
            for output in llm.step():
                p = by_rid[output.request_id]
                out.write(result_line(p, output))
                if show:
                    echo(f"--- {p.record.id}: {output.outputs[0].text!r} ({output.outputs[0].finish_reason})")
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                rate = (llm.engine.counters.generated_tokens - tokens0) / max(1e-9, time.perf_counter() - t1)
                tiers = llm.kv_blocks_by_tier()
                used = sum(tiers.values()) or 1
                share = " ".join(f"{k} {100 * v / used:.0f}%" for k, v in tiers.items())
                bar.set_postfix_str(f"{rate:.0f} tok/s, KV {share}", refresh=False)
        summary["wall_s"] = time.perf_counter() - t1
        summary["generated_tokens"] = llm.engine.counters.generated_tokens - tokens0
        summary["stats"] = llm.stats()
        return summary
    finally:
        if bar is not None:
            bar.close()
        try:
            if llm is not None:
                llm.close()
        finally:
            out.close(remove_if_empty=llm is None)
