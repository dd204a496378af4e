"""A batch spread over machines: `jaxserve batch --shard`, `jaxserve batch-merge`, and the deployment manifests."""

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_batch import TINY, batch_line

from jaxserve.cli import build_parser, main
from jaxserve.engine_args import EngineArgs
from jaxserve.sharding import parse_mesh

DEPLOY = Path(__file__).resolve().parent.parent / "scripts" / "deploy"


def batch_command(tmp_path, checkpoints, output, *args):
    return [
        sys.executable,
        "-m",
        "jaxserve.cli",
        "batch",
        str(tmp_path / "in.jsonl"),
        str(tmp_path / output),
        "--model",
        TINY,
        "--checkpoints",
        str(checkpoints),
        "--max-slots",
        "4",
        "--max-context",
        "256",
        *args,
    ]


def results(path):
    return {r["custom_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def comparable(result):
    """What must not depend on the split: status, and each choice's text and finish, usage, or the error."""
    body = result["response"]["body"]
    if result["response"]["status_code"] != 200:
        return result["response"]["status_code"], body
    return 200, [(c["text"], c["finish_reason"]) for c in body["choices"]], body["usage"]


def test_three_shards_merged_equal_one_run_after_one_was_killed(tmp_path, tiny_dir):
    n = 60
    lines = [
        batch_line(
            f"r{i}",
            prompt=f"It was the {'best' if i % 2 else 'worst'} of times, {i}",
            max_tokens=30 + i % 7,
            temperature=0 if i % 3 else 0.8,
            seed=i,
        )
        for i in range(n)
    ]
    lines[4] = batch_line("bad", prompt="x", temperature=9)  # request 4 -> shard 1: an error line, kept in place
    (tmp_path / "in.jsonl").write_text("\n\n".join(lines) + "\n")  # blank lines are not requests
    ids = [json.loads(line)["custom_id"] for line in lines]
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")}
    root = tiny_dir.parent

    whole = subprocess.run(
        batch_command(tmp_path, root, "whole.jsonl"), env=env, capture_output=True, text=True, timeout=600
    )  # first: the shards then find every step compiled
    assert whole.returncode == 1, whole.stderr  # the bad line

    # the three ways a shard learns its index, run at once as on three machines
    shards = [
        (["--shard", "0/3"], {}),
        (["--num-shards", "3"], {"JOB_COMPLETION_INDEX": "1"}),
        (["--num-shards", "3"], {"SLURM_ARRAY_TASK_ID": "2"}),
    ]
    logs = [tmp_path / f"shard-{i}.log" for i in range(3)]
    with contextlib.ExitStack() as stack:
        procs = [
            subprocess.Popen(
                batch_command(tmp_path, root, f"shard-{i}.jsonl", *args),
                env={**env, **extra},
                stdout=subprocess.DEVNULL,
                stderr=stack.enter_context(open(logs[i], "w")),
            )
            for i, (args, extra) in enumerate(shards)
        ]
        for proc in procs:
            stack.callback(proc.wait)
            stack.callback(proc.kill)  # a failed assertion leaves nothing running
        killed = tmp_path / "shard-0.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and (not killed.exists() or killed.read_bytes().count(b"\n") < 4):
            time.sleep(0.02)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        done_before = killed.read_bytes().count(b"\n")  # whole lines; a torn last one is cut by the rerun
        assert 4 <= done_before < n // 3, "the kill should land mid-shard"
        for i in (1, 2):
            assert procs[i].wait(timeout=600) == (1 if i == 1 else 0), logs[i].read_text()  # 1: the bad line
            assert f"batch: shard {i}/3: 20 of 60 requests" in logs[i].read_text()

    rerun = subprocess.run(
        batch_command(tmp_path, root, "shard-0.jsonl", "--shard", "0/3"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done_before} already done" in rerun.stderr
    for i in range(3):  # each shard did its own third, each request once
        shard_ids = [json.loads(line)["custom_id"] for line in (tmp_path / f"shard-{i}.jsonl").read_text().splitlines()]
        assert sorted(shard_ids) == sorted(ids[i::3])

    outputs = [str(tmp_path / f"shard-{i}.jsonl") for i in (2, 0, 1)]  # any order
    assert main(["batch-merge", str(tmp_path / "in.jsonl"), str(tmp_path / "merged.jsonl"), *outputs]) == 0
    merged = [json.loads(line) for line in (tmp_path / "merged.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in merged] == ids  # the input's order
    want = results(tmp_path / "whole.jsonl")
    assert [comparable(r) for r in merged] == [comparable(want[cid]) for cid in ids]
    assert merged[4]["response"]["status_code"] == 400


def result_line(cid, status=200):
    return json.dumps({"custom_id": cid, "response": {"status_code": status, "body": {}}})


def test_merge_fails_loudly_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text("".join(batch_line(cid, prompt="x") + "\n" for cid in "abcd"))
    for name, cids in {"s0": "ac", "s1": "b", "s1b": "bd", "other": "dz"}.items():
        (tmp_path / name).write_text("".join(result_line(cid, 400 if cid == "d" else 200) + "\n" for cid in cids))
    (tmp_path / "torn").write_text(result_line("d") + "\n" + result_line("b")[:20])
    out = tmp_path / "out.jsonl"

    def merge(*names):
        code = main(["batch-merge", str(tmp_path / "in.jsonl"), str(out), *(str(tmp_path / n) for n in names)])
        return code, capsys.readouterr().err

    code, err = merge("s0", "s1")
    assert code == 2 and "missing from every shard output (1 of 4; is a shard unfinished?): d;" in err
    assert not out.exists()
    code, err = merge("s0", "s1", "s1b")
    assert code == 2 and "more than one" in err and f"b ({tmp_path / 's1'} and {tmp_path / 's1b'})" in err
    assert not out.exists()
    code, err = merge("s0", "s1", "other")
    assert code == 2 and "not in the input: z" in err and not out.exists()
    code, err = merge("s0", "s1", "torn")
    assert code == 2 and "torn: line 2 is cut short" in err and not out.exists()

    code, err = merge("s1b", "s0")
    assert code == 0 and "(1 with an error status)" in err
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == list("abcd")


def test_shard_flags(tmp_path, monkeypatch, capsys):
    (tmp_path / "in.jsonl").write_text(batch_line("a", prompt="x") + "\n")
    batch = ["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--model", TINY]
    for var in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    # each fails before any model is loaded
    assert main([*batch, "--num-shards", "3"]) == 2
    assert "$JOB_COMPLETION_INDEX or $SLURM_ARRAY_TASK_ID" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert main([*batch, "--num-shards", "3"]) == 2
    assert "$SLURM_ARRAY_TASK_ID='3' is not a shard index below --num-shards 3" in capsys.readouterr().err
    for bad in (["--shard", "3/3"], ["--shard", "1"], ["--shard", "0/2", "--num-shards", "2"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([*batch, *bad])
        assert exc.value.code == 2
    assert "not a shard I/N" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


LWS_LEADER = "jaxserve-0.jaxserve.default"  # what a LeaderWorkerSet puts in LWS_LEADER_ADDRESS


def pods(spec):
    """(pod spec, the variables Kubernetes expands in its args) of a Job, or of each pod of a LeaderWorkerSet
    group (the leader, index 0, then its workers, as the LWS controller numbers them)."""
    lws = spec.get("leaderWorkerTemplate")
    if lws is None:
        yield spec.get("template", {}).get("spec", {}), {}
        return
    for index in range(lws["size"]):
        template = lws["leaderTemplate"] if index == 0 else lws["workerTemplate"]
        yield (
            template["spec"],
            {"LWS_LEADER_ADDRESS": LWS_LEADER, "LWS_GROUP_SIZE": lws["size"], "LWS_WORKER_INDEX": index},
        )


def jaxserve_commands(doc):
    """(argv after `jaxserve`, the enclosing spec) for every container of a manifest that runs jaxserve,
    directly or in a shell script, with $(VAR) expanded as Kubernetes would for the variables it sets."""
    spec = doc.get("spec", {})
    for pod, variables in pods(spec):
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
            for name, value in variables.items():
                argv = [a.replace(f"$({name})", str(value)) for a in argv]
            if argv and Path(argv[0]).name in ("sh", "bash") and "-c" in argv:
                lines = [shlex.split(line) for line in argv[argv.index("-c") + 1].splitlines()]
            else:
                lines = [argv]
            for words in lines:
                if words and Path(words[0]).name == "jaxserve":
                    yield words[1:], spec


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_deploy_manifest_commands_parse(path):
    commands = [cmd for doc in yaml.safe_load_all(path.read_text()) if doc for cmd in jaxserve_commands(doc)]
    assert commands, f"{path} runs no jaxserve command"
    for argv, spec in commands:
        args = build_parser().parse_args(argv)  # a flag the CLI does not have exits here
        if args.command == "batch" and args.num_shards:
            # as an Indexed Job: one shard per completion index, each with its own output
            assert spec.get("completionMode") == "Indexed" and spec["completions"] == args.num_shards
            assert "$(JOB_COMPLETION_INDEX)" in args.output
    groups = [(build_parser().parse_args(argv), spec) for argv, spec in commands if "leaderWorkerTemplate" in spec]
    if groups:  # one serving group: process i of size, all at the leader's address, with the same engine flags
        size = groups[0][1]["leaderWorkerTemplate"]["size"]
        assert [a.process_id for a, _ in groups] == list(range(size))
        assert {(a.num_processes, a.coordinator.rsplit(":", 1)[0]) for a, _ in groups} == {(size, LWS_LEADER)}
        engine = [{k: v for k, v in vars(a).items() if k in EngineArgs.__dataclass_fields__} for a, _ in groups]
        assert all({**e, "process_id": 0} == {**engine[0], "process_id": 0} for e in engine)
        data, model = parse_mesh(groups[0][0].mesh)
        assert data * model == size  # one device per pod: the mesh uses every device of the group


def test_deploy_merge_takes_every_shard_of_the_batch():
    docs = [doc for path in DEPLOY.glob("*.yaml") for doc in yaml.safe_load_all(path.read_text()) if doc]
    parsed = [build_parser().parse_args(argv) for doc in docs for argv, _ in jaxserve_commands(doc)]
    sharded = {a.input: a for a in parsed if a.command == "batch" and a.num_shards}
    merges = [a for a in parsed if a.command == "batch-merge"]
    assert sharded and merges
    for merge in merges:
        batch = sharded[merge.input]
        want = [batch.output.replace("$(JOB_COMPLETION_INDEX)", str(i)) for i in range(batch.num_shards)]
        assert merge.shard_outputs == want
