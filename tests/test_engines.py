"""2 CPU processes under each engine give what 1 process gives with the same global batch.

Each engine runs the shipped accelerate config from `examples/accelerate/` once, and that one launch
runs every path of `engine_run.py` (launches cost 15-30 s each): Selective-DPO with a live reference,
with stored values from a larger reference (scored with unequal work per process), from the initial
policy and from a reference of another tokenizer; SePO from stored oracle rewards; held-out
evaluation before and after training; saving; and resuming from a checkpoint. Compared with one
plain process: losses and gradient norms of every step, stored per-token values, evaluations and
saved weights, within 1e-5. Each launch also reports the engine it really got, and the local size
of a weight under ZeRO-3 and FSDP2 (half of it: really sharded).

FSDP2 runs with accelerate's state patched to treat the CPU process group as FSDP (accelerate 1.15
enables FSDP only for GPU groups, and selective-po refuses the DDP it would otherwise run).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from conftest import build_model, build_tokenizer, preference_dataset

REPO = Path(__file__).resolve().parents[1]
RUN = Path(__file__).parent / "engine_run.py"
ENGINES = {
    "ddp": ("MULTI_CPU", "DistributedDataParallel", False, []),
    "zero2": ("DEEPSPEED", "DeepSpeedEngine", False, []),
    "zero3": ("DEEPSPEED", "DeepSpeedEngine", True, []),
    "fsdp2": ("FSDP", "FSDPLlamaForCausalLM", True, ["--fsdp-on-cpu"]),
}
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(**extra) -> dict:
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def accelerate(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env or environment(), timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny policy, a larger reference of the same tokenizer, a reference of another tokenizer, a SePO oracle pair,
    8 pairs; and the one-process results every engine is compared with."""
    from test_cross_tokenizer import OTHER_TEMPLATE

    root = tmp_path_factory.mktemp("engines")
    tokenizer = build_tokenizer()

    def save(name, tok, seed, **shape):
        build_model(tok, seed=seed, **shape).save_pretrained(root / name)
        tok.save_pretrained(root / name)

    save("policy", tokenizer, 0)
    save("larger_ref", tokenizer, 7, layers=3, hidden=48)
    save("oracle", tokenizer, 8)
    save("oracle_ref", tokenizer, 9)
    texts = ["Add the ones and carry. The answer is " + str(n) for n in range(200)] + ["What is x?"] * 20
    other = build_tokenizer(vocab_size=420, seed_texts=texts)
    other.chat_template = OTHER_TEMPLATE
    other.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    save("other_ref", other, 5)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_dataset().to_list()))

    one = root / "one-process"
    result = subprocess.run([sys.executable, str(RUN), str(root), str(one)], capture_output=True, text=True, env=environment(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, one, json.loads((one / "results.json").read_text())


def stored_values(entry: str) -> dict[str, np.ndarray]:
    """Every stored value of a cache entry, by column, in row order, flattened."""
    tables = [pq.read_table(path) for path in sorted(Path(entry).glob("shard-*.parquet"))]
    columns = [column for column in tables[0].column_names if column != "row"]
    return {c: np.concatenate([np.asarray(v, dtype=np.float32) for t in tables for v in t[c].to_pylist()]) for c in columns}


def assert_same_run(got: dict, expected: dict, label: str) -> dict[str, float]:
    """Losses, gradient norms, evaluations and stored values agree; returns the largest difference per path."""
    differences = {}
    for path, want in expected.items():
        have, worst = got[path], 0.0
        for key in ("losses", "grad_norms"):
            assert len(have.get(key, [])) == len(want.get(key, [])), (label, path, key)
            for a, b in zip(have.get(key, []), want.get(key, [])):
                assert abs(a - b) <= TOLERANCE, (label, path, key, have[key], want[key])
                worst = max(worst, abs(a - b))
        if want.get("evaluation"):
            for key, value in want["evaluation"].items():
                assert abs(have["evaluation"][key] - value) <= TOLERANCE, (label, path, key)
        for split, entry in want.get("stores", {}).items():
            mine, theirs = stored_values(have["stores"][split]), stored_values(entry)
            for column in theirs:
                np.testing.assert_allclose(mine[column], theirs[column], rtol=0, atol=TOLERANCE, err_msg=f"{label} {path} {column}")
                worst = max(worst, float(np.abs(mine[column] - theirs[column]).max()))
        differences[path] = worst
    return differences


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_equal_one(setup, engine):
    root, one, expected = setup
    distributed_type, wrapper, sharded, extra = ENGINES[engine]
    out = root / engine
    config = REPO / "examples" / "accelerate" / f"{engine}.yaml"
    result = accelerate("--config_file", str(config), "--main_process_port", str(free_port()), str(RUN), str(root), str(out), *extra)
    assert result.returncode == 0, result.stderr[-6000:]
    got = json.loads((out / "results.json").read_text())

    for path, record in got.items():
        engine_seen = record["engine"]
        assert engine_seen["distributed_type"] == distributed_type, (path, engine_seen)
        if path != "eval-untrained":
            assert engine_seen["wrapper"] == wrapper, (path, engine_seen)
        # Really sharded under ZeRO-3 and FSDP2: this process holds half of the weight.
        expected_local = engine_seen["full_numel"] // 2 if sharded else engine_seen["full_numel"]
        assert engine_seen["local_numel"] == expected_local, (path, engine_seen)
    differences = assert_same_run(got, expected, engine)
    mine = load_file(out / "sdpo-live" / "final" / "model.safetensors")
    theirs = load_file(one / "sdpo-live" / "final" / "model.safetensors")
    assert mine.keys() == theirs.keys()
    weights = max(float((mine[k] - theirs[k]).abs().max()) for k in theirs)
    assert weights <= TOLERANCE
    table = ", ".join(f"{path} {value:.2g}" for path, value in differences.items())
    print(f"\n{engine}: max |2 processes - 1 process| per path (losses, gradient norms, stored values): {table}; "
          f"saved weights {weights:.2g}")  # fmt: skip


def test_a_non_finite_value_on_one_process_stops_both(setup):
    """Process 1's reference gives a NaN while scoring: both processes stop with its message, nobody hangs."""
    root, _, _ = setup
    config = REPO / "examples" / "accelerate" / "ddp.yaml"
    env = environment(ENGINE_PATHS="sdpo-stored-larger-ref", NAN_ON_PROCESS="1")
    result = accelerate("--config_file", str(config), "--main_process_port", str(free_port()), str(RUN), str(root),
                        str(root / "nan"), env=env, timeout=300)  # fmt: skip
    assert result.returncode != 0
    message = "stopped on process 1 of 2: per-token reference log-probs are not finite for dataset row"
    assert result.stderr.count(message) >= 2, result.stderr[-4000:]  # raised by both processes


def test_kill_9_of_one_process_while_scoring_then_resume(setup):
    """ZeRO-3: process 1 dies after its first shard; the same command again scores what is missing and the stored
    values equal an uninterrupted run's."""
    root, _, expected = setup
    out = root / "killed"
    config = REPO / "examples" / "accelerate" / "zero3.yaml"
    launch = ["--config_file", str(config), str(RUN), str(root), str(out)]
    paths = {"ENGINE_PATHS": "sdpo-stored-larger-ref"}
    killed = accelerate("--main_process_port", str(free_port()), *launch, env=environment(KILL_AFTER_SHARD="1", **paths))
    assert killed.returncode != 0
    entries = [p for p in (out / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "shard-00001.json").is_file()  # process 1's shard survived the kill
    assert not (out / "results.json").exists()

    resumed = accelerate("--main_process_port", str(free_port()), *launch, env=environment(**paths))
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    got = json.loads((out / "results.json").read_text())
    assert_same_run(got, {"sdpo-stored-larger-ref": expected["sdpo-stored-larger-ref"]}, "killed then resumed")


def test_two_machines_on_loopback(setup):
    """examples/accelerate/two_machines.yaml as two launches (machine ranks 0 and 1) on one host."""
    root, _, expected = setup
    out = root / "two-machines"
    config = REPO / "examples" / "accelerate" / "two_machines.yaml"
    port = str(free_port())
    env = environment(ENGINE_PATHS="sdpo-live,sdpo-stored-larger-ref")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", port]
    machines = [
        subprocess.Popen([*command, "--machine_rank", str(rank), str(RUN), str(root), str(out)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [machine.communicate(timeout=600) for machine in machines]
    for machine, (_, err) in zip(machines, outputs):
        assert machine.returncode == 0, err[-6000:]
    got = json.loads((out / "results.json").read_text())
    assert set(got) == {"sdpo-live", "sdpo-stored-larger-ref"}
    assert_same_run(got, {path: expected[path] for path in got}, "two machines")
