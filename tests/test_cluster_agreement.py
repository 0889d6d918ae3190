"""How the nodes of a cluster agree, and what one node refuses, without training."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import make_job, tiny_args
from finetune_worker.checks.distributed import cluster_storage_problems
from finetune_worker.contract.errors import JobError
from finetune_worker.host.hardware import CPU_ONLY, Hardware
from finetune_worker.host.rundir import RunPaths, is_complete_checkpoint
from finetune_worker.pipeline import run_job
from finetune_worker.plan.children import build_torchrun_argv
from finetune_worker.plan.cluster import ClusterPlan
from finetune_worker.publish.card import cluster_section
from finetune_worker.run.cluster import config_digest
from finetune_worker.run.cluster_rank import agreed_resume_step, node_problems

TWO_GPUS = Hardware(gpu_count=2, gpu_names=("NVIDIA H100 80GB HBM3",) * 2, gpu_memory_bytes=(80 * 2**30,) * 2, bf16=True,
                    compute_capability=(9, 0))
VERSIONS = {"python": "3.12.1", "torch": "2.13.0", "axolotl": "0.21.0"}


def payload(rank: int, **changes) -> dict:
    return {"node_rank": rank, "job_sha256": "j", "config_sha256": "c", "processes_per_node": 8, "shared_volume": False,
            "checkpoints": [2, 4], "nonce": f"n{rank}", "versions": dict(VERSIONS), "seen": [rank], "train": True} | changes


def test_nodes_that_agree_have_no_problem_and_resume_from_the_newest_checkpoint_all_of_them_hold():
    nodes = [payload(0, checkpoints=[2, 4, 6]), payload(1, checkpoints=[2, 4])]
    assert node_problems(nodes) == []
    assert agreed_resume_step(nodes) == 4
    assert agreed_resume_step([payload(0, checkpoints=[]), payload(1)]) is None


def test_on_a_shared_volume_node_0s_checkpoints_are_everybodys():
    nodes = [payload(0, shared_volume=True, seen=[0, 1], checkpoints=[6]), payload(1, shared_volume=True, seen=[0, 1], checkpoints=[6])]
    assert node_problems(nodes) == [] and agreed_resume_step(nodes) == 6


@pytest.mark.parametrize(("change", "words"), [
    ({"job_sha256": "other"}, "node 1 was given another job than node 0"),
    ({"config_sha256": "other"}, "node 1 planned another Axolotl config"),
    ({"versions": {**VERSIONS, "torch": "2.12.0"}}, "node 1 runs torch 2.12.0, node 0 runs 2.13.0"),
    ({"processes_per_node": 4}, "node 1 runs 4 processes, node 0 runs 8"),
    ({"shared_volume": True, "seen": [0, 1]}, "node 1 has FINETUNE_SHARED_VOLUME=1, node 0 has 0"),
    ({"seen": [0, 1]}, "the nodes share a volume: set FINETUNE_SHARED_VOLUME=1"),
])
def test_each_disagreement_is_named_against_node_0(change, words):
    problems = node_problems([payload(0), payload(1, **change)])
    assert any(words in problem for problem in problems), problems


def test_when_node_0_has_nothing_to_train_only_the_job_and_the_stack_must_match():
    # node 0 answers a finished run before planning its data again: its config digest may differ
    assert node_problems([payload(0, train=False), payload(1, config_sha256="other")]) == []
    assert node_problems([payload(0, train=False), payload(1, job_sha256="other")]) != []


def test_a_shared_volume_that_a_node_cannot_see_is_refused():
    problems = node_problems([payload(0, shared_volume=True, seen=[0]), payload(1, shared_volume=True, seen=[0, 1])])
    assert problems == [problems[0]] and "node 0 cannot see the run directory of node(s) 1" in problems[0]


def test_the_torchrun_argv_is_the_static_rendezvous_with_the_rank_child():
    plan = ClusterPlan("runpod", nodes=2, node_rank=1, processes_per_node=8, host="10.65.0.2", port=29400)
    argv = build_torchrun_argv("/py", plan, Path("/run/config.yaml"), Path("/run/spec.json"), join_timeout_s=600)
    assert argv == ["/py", "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8",
                    "--rdzv_backend", "static", "--rdzv_endpoint", "10.65.0.2:29400", "--rdzv_id", "finetune-worker",
                    "--rdzv_conf", "timeout=600", "--max_restarts", "0",
                    "-m", "finetune_worker.run.cluster_rank", "/run/config.yaml", "--spec", "/run/spec.json"]


def test_without_a_shared_volume_fsdp_and_deepspeed_are_refused_by_key():
    args = {"fsdp_config": {"fsdp_version": 2}, "deepspeed": "zero2", "adapter": "qlora"}
    problems = cluster_storage_problems(args, shared_volume=False)
    assert [p.path for p in problems] == ["args.fsdp_config", "args.deepspeed"]
    assert all("FINETUNE_SHARED_VOLUME=1" in p.message for p in problems)
    assert cluster_storage_problems(args, shared_volume=True) == []
    assert cluster_storage_problems({"adapter": "lora"}, shared_volume=False) == []
    full = cluster_storage_problems({"base_model": "m"}, shared_volume=False)  # only node 0 would write its weights
    assert [p.path for p in full] == ["args.adapter"] and "FINETUNE_SHARED_VOLUME=1" in full[0].message
    assert cluster_storage_problems({"base_model": "m"}, shared_volume=True) == []


def test_the_config_digest_ignores_what_is_local_to_a_node(tmp_path):
    node0, node1 = RunPaths(tmp_path / "a" / "runs" / "u" / "r"), RunPaths(tmp_path / "b" / "runs" / "u" / "r", node=1)
    def config(paths, cache):
        return {"output_dir": str(paths.output_dir), "dataset_prepared_path": f"{cache}/prepared/x",
                "datasets": [{"path": str(paths.data_dir / "train.jsonl")}], "learning_rate": 1e-4}
    same = config_digest(config(node0, tmp_path / "a" / "cache"), node0, tmp_path / "a" / "cache")
    assert same == config_digest(config(node1, tmp_path / "b" / "cache"), node1, tmp_path / "b" / "cache")
    other = {**config(node1, tmp_path / "b" / "cache"), "learning_rate": 2e-4, "resume_from_checkpoint": "x"}
    assert same != config_digest(other, node1, tmp_path / "b" / "cache")
    # another run whose id starts with this one's (continue_from): the same on both nodes
    earlier = [{"lora_model_dir": str(paths.run_dir) + "-base/output"} for paths in (node0, node1)]
    assert config_digest(earlier[0], node0, tmp_path / "a" / "cache") == config_digest(earlier[1], node1, tmp_path / "b" / "cache")


def test_a_checkpoint_with_only_the_trainer_arguments_has_no_weights(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4}')
    (checkpoint / "training_args.bin").write_bytes(b"x")
    assert not is_complete_checkpoint(checkpoint)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x")
    assert is_complete_checkpoint(checkpoint)


def test_the_model_card_names_the_cluster_shape():
    section = "\n".join(cluster_section({"nodes": 2, "processes_per_node": 8, "world_size": 16}))
    assert "2 nodes x 8 GPU processes (world size 16)" in section
    assert cluster_section(None) == []


def events_of(job: dict, env: dict, launch: str, hardware=CPU_ONLY) -> list[dict]:
    async def run() -> list[dict]:
        return [event async for event in run_job(job, env=env, hardware=hardware, launch=launch)]

    return asyncio.run(run())


def test_one_machine_refuses_a_job_for_several_nodes_before_anything_runs(tiny, env, volume):
    job = make_job(tiny_args(tiny), num_nodes=2)
    final = events_of(job, env, "machine")[-1]
    assert final["type"] == "error" and final["code"] == "invalid_input", final
    assert any(d.startswith("num_nodes:") and "finetune-worker cluster JOB.json" in d for d in final["details"])
    assert not (volume / "runs" / job["user_id"] / job["run_id"]).exists()


def test_cluster_refuses_without_cluster_variables_and_names_malformed_ones(tiny, env, volume):
    job = make_job(tiny_args(tiny))
    plain = {k: v for k, v in env.items() if k not in ("NNODES", "PRIMARY_ADDR", "DSTACK_MASTER_NODE_IP", "SKYPILOT_NODE_IPS")}
    final = events_of(job, plain, "cluster")[-1]
    assert final["type"] == "error" and any(d.startswith("cluster: no cluster in the environment") for d in final["details"]), final
    final = events_of(job, {**plain, "NNODES": "2", "NODE_RANK": "two", "MASTER_ADDR": "127.0.0.1"}, "cluster")[-1]
    assert final["type"] == "error" and any("NODE_RANK='two' is not a whole number" in d for d in final["details"]), final
    assert not (volume / "runs" / job["user_id"] / job["run_id"]).exists()


def test_a_cluster_without_a_shared_volume_refuses_fsdp_before_any_download(tiny, env, volume):
    job = make_job(tiny_args(tiny, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True}))
    cluster = {**env, "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    events = events_of(job, cluster, "cluster", hardware=TWO_GPUS)  # FSDP itself is fine on these GPUs
    final = events[-1]
    assert final["type"] == "error" and final["details"][0].startswith("args.fsdp_config: fsdp_config across nodes without a shared volume"), final
    assert not any(e.get("stage") in ("downloading", "training") for e in events)


def test_the_memory_check_divides_sharded_state_over_every_gpu_of_every_node():
    from finetune_worker.sizing.capacity import check_memory

    model = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192}
    config = {"base_model": "x", "fsdp_config": {"fsdp_version": 2}, "micro_batch_size": 1, "sequence_len": 2048,
              "gradient_checkpointing": True, "bf16": True}
    eight = Hardware(gpu_count=8, gpu_names=("NVIDIA H100 80GB HBM3",) * 8, gpu_memory_bytes=(80 * 2**30,) * 8, bf16=True)
    plan = ClusterPlan("runpod", nodes=2, node_rank=0, processes_per_node=8, host="10.0.0.1", port=29500)
    with pytest.raises(JobError, match="out_of_memory|will not fit"):  # a 70B full fine-tune on one node of 8 H100s
        check_memory(config, model, eight, 8)
    cluster = check_memory(config, model, eight, plan.world_size, plan.describe())[0]  # sharded over 16 GPUs
    assert "per GPU on 2 nodes x 8 processes (world size 16)" in cluster["message"], cluster["message"]
