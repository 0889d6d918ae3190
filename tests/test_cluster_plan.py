"""Multi-node clusters read from each platform's variables (plan/cluster.py): pure, no training."""

import pytest

from finetune_worker.contract.errors import Problem
from finetune_worker.plan.cluster import ClusterPlan, cluster_from_env

RUNPOD = {
    "PRIMARY_ADDR": "10.65.0.2",
    "PRIMARY_PORT": "29400",
    "NODE_ADDR": "10.65.0.3",
    "NODE_RANK": "1",
    "NUM_NODES": "2",
    "NUM_TRAINERS": "8",
}
# What a RunPod node really carries besides: the legacy names and the world size.
RUNPOD_FULL = {**RUNPOD, "MASTER_ADDR": "10.65.0.2", "MASTER_PORT": "29400", "WORLD_SIZE": "16", "HOST_NODE_ADDR": "10.65.0.2:29400"}
DSTACK = {
    "DSTACK_MASTER_NODE_IP": "10.0.0.5",
    "DSTACK_NODES_IPS": "10.0.0.5\n10.0.0.6\n",
    "DSTACK_NODES_NUM": "2",
    "DSTACK_NODE_RANK": "0",
    "DSTACK_GPUS_PER_NODE": "4",
    "DSTACK_GPUS_NUM": "8",
}
SKYPILOT = {
    "SKYPILOT_NODE_IPS": "\n172.31.0.1\n172.31.0.2\n172.31.0.3",
    "SKYPILOT_NUM_NODES": "3",
    "SKYPILOT_NODE_RANK": "2",
    "SKYPILOT_NUM_GPUS_PER_NODE": "2",
}
TORCHRUN = {"NNODES": "4", "NODE_RANK": "3", "NPROC_PER_NODE": "2", "MASTER_ADDR": "[fd00::1]", "MASTER_PORT": "1234"}
ASYNC = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def plan_of(env, gpus=8, **job):
    plan, problems = cluster_from_env(env, gpus, **job)
    assert problems == []
    return plan


def problems_of(env, gpus=8, **job):
    plan, problems = cluster_from_env(env, gpus, **job)
    assert plan is None
    return problems


def test_runpod_instant_cluster():
    assert plan_of(RUNPOD) == ClusterPlan(
        platform="runpod",
        nodes=2,
        node_rank=1,
        processes_per_node=8,
        host="10.65.0.2",
        port=29400,
        env={"NCCL_SOCKET_IFNAME": "ens1", "GLOO_SOCKET_IFNAME": "ens1", **ASYNC},
    )


def test_runpod_nodes_with_master_variables_and_world_size_are_runpod_not_torchrun():
    plan = plan_of(RUNPOD_FULL)
    assert (plan.platform, plan.endpoint, plan.world_size) == ("runpod", "10.65.0.2:29400", 16)


def test_runpod_port_falls_back_to_master_port_then_29500():
    without_primary_port = {key: value for key, value in RUNPOD_FULL.items() if key != "PRIMARY_PORT"}
    assert plan_of({**without_primary_port, "MASTER_PORT": "4000"}).port == 4000
    assert plan_of({key: value for key, value in without_primary_port.items() if key != "MASTER_PORT"}).port == 29500


def test_dstack_cluster():
    assert plan_of(DSTACK, gpus=4) == ClusterPlan(platform="dstack", nodes=2, node_rank=0, processes_per_node=4, host="10.0.0.5", port=29500, env=ASYNC)


def test_dstack_cpu_nodes_run_one_process_each():
    plan = plan_of({**DSTACK, "DSTACK_GPUS_PER_NODE": "0", "DSTACK_GPUS_NUM": "0"}, gpus=0)
    assert (plan.processes_per_node, plan.world_size) == (1, 2)


def test_skypilot_cluster_rendezvous_on_the_first_listed_node():
    assert plan_of(SKYPILOT, gpus=2) == ClusterPlan(platform="skypilot", nodes=3, node_rank=2, processes_per_node=2, host="172.31.0.1", port=29500, env=ASYNC)


def test_skypilot_cpu_nodes_run_one_process_each():
    assert plan_of({**SKYPILOT, "SKYPILOT_NUM_GPUS_PER_NODE": "0"}, gpus=0).processes_per_node == 1


def test_torchrun_cluster_keeps_ipv6_brackets():
    plan = plan_of(TORCHRUN, gpus=2)
    assert plan == ClusterPlan(platform="torchrun", nodes=4, node_rank=3, processes_per_node=2, host="[fd00::1]", port=1234, env=ASYNC)
    assert plan.endpoint == "[fd00::1]:1234"
    assert not plan.primary


@pytest.mark.parametrize(("gpus", "expected"), [(8, 8), (0, 1)])
def test_torchrun_without_nproc_per_node_runs_one_process_per_gpu(gpus, expected):
    env = {key: value for key, value in TORCHRUN.items() if key != "NPROC_PER_NODE"}
    assert plan_of(env, gpus=gpus).processes_per_node == expected


def test_no_marker_is_no_cluster():
    assert cluster_from_env({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "8", "NODE_RANK": "0"}, 8) == (None, [])


def test_one_node_is_todays_path():
    assert cluster_from_env({**RUNPOD_FULL, "NUM_NODES": "1", "NODE_RANK": "0", "WORLD_SIZE": "8"}, 8) == (None, [])


def test_one_node_still_reports_malformed_values():
    problems = problems_of({**RUNPOD, "NUM_NODES": "1", "NODE_RANK": "0", "PRIMARY_PORT": "http"})
    assert [problem.path for problem in problems] == ["PRIMARY_PORT"]


def test_operators_socket_interface_wins_over_runpods_default():
    plan = plan_of({**RUNPOD, "NCCL_SOCKET_IFNAME": "eth0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"})
    assert plan.env == {"GLOO_SOCKET_IFNAME": "ens1"}


def test_fewer_processes_than_the_node_offers_is_accepted():
    plan = plan_of(RUNPOD, processes=4)
    assert (plan.processes_per_node, plan.world_size) == (4, 8)


def test_more_processes_than_the_node_offers_is_refused():
    [problem] = problems_of(RUNPOD, processes=9)
    assert problem.path == "num_processes"
    assert "num_processes=9" in problem.message and "NUM_TRAINERS" in problem.message and "8 or fewer" in problem.message


def test_matching_num_nodes_is_accepted_and_a_mismatch_refused():
    assert plan_of(RUNPOD, nodes=2).nodes == 2
    [problem] = problems_of(RUNPOD, nodes=3)
    assert problem.path == "num_nodes"
    assert "num_nodes=3" in problem.message and "NUM_NODES=2" in problem.message


MALFORMED = [
    ({**RUNPOD, "NODE_RANK": "x"}, "NODE_RANK", "'x' is not a whole number"),
    ({**RUNPOD, "NODE_RANK": "2"}, "NODE_RANK", "rank is 0 to 1"),
    ({**RUNPOD, "NUM_TRAINERS": "0"}, "NUM_TRAINERS", "at least 1 process"),
    ({**RUNPOD, "NUM_TRAINERS": "16"}, "NUM_TRAINERS", "8 GPUs"),
    ({**RUNPOD, "PRIMARY_PORT": "70000"}, "PRIMARY_PORT", "1 to 65535"),
    ({**RUNPOD_FULL, "WORLD_SIZE": "8"}, "WORLD_SIZE", "= 16"),
    ({**RUNPOD, "NUM_NODES": "65"}, "NUM_NODES", "1 to 64"),
    ({**SKYPILOT, "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "172.31.0.1"}, "SKYPILOT_NODE_IPS", "lists 1 addresses"),
    ({**DSTACK, "DSTACK_GPUS_NUM": "6"}, "DSTACK_GPUS_NUM", "= 8"),
    ({**DSTACK, "DSTACK_NODES_IPS": "10.0.0.7\n10.0.0.6"}, "DSTACK_NODES_IPS", "master"),
    ({**RUNPOD, "PRIMARY_ADDR": ""}, "PRIMARY_ADDR", "empty"),
    ({**RUNPOD, "PRIMARY_ADDR": "10.0.0.1 10.0.0.2"}, "PRIMARY_ADDR", "whitespace"),
    ({**TORCHRUN, "MASTER_ADDR": "fd00::1"}, "MASTER_ADDR", "'[fd00::1]'"),
    ({key: value for key, value in RUNPOD.items() if key != "NUM_NODES"}, "NUM_NODES", "not set"),
    ({key: value for key, value in TORCHRUN.items() if key != "MASTER_ADDR"}, "MASTER_ADDR", "not set"),
]


@pytest.mark.parametrize(("env", "variable", "words"), MALFORMED, ids=[f"{case[1]}-{case[2]}" for case in MALFORMED])
def test_malformed_value_is_a_problem_naming_the_variable(env, variable, words):
    [problem] = problems_of(env, gpus=8)
    assert problem.path == variable
    assert problem.message.startswith(variable)
    assert words in problem.message
    if variable in env:
        assert repr(env[variable]) in problem.message


def test_every_problem_is_reported_at_once():
    env = {**RUNPOD_FULL, "NODE_RANK": "x", "NUM_TRAINERS": "0", "PRIMARY_PORT": "0", "PRIMARY_ADDR": "fd00::1"}
    problems = problems_of(env, nodes=3)
    assert sorted(problem.path for problem in problems) == ["NODE_RANK", "NUM_TRAINERS", "PRIMARY_ADDR", "PRIMARY_PORT", "num_nodes"]
    assert all(isinstance(problem, Problem) for problem in problems)


def test_describe_and_record():
    plan = plan_of(RUNPOD)
    assert plan.describe() == "2 nodes x 8 processes (world size 16)"
    assert plan.record() == {"platform": "runpod", "nodes": 2, "node_rank": 1, "processes_per_node": 8, "world_size": 16, "rendezvous": "10.65.0.2:29400"}
    single = plan_of(TORCHRUN, gpus=2, processes=1)
    assert single.describe() == "4 nodes x 1 process (world size 4)"
    assert plan_of({**DSTACK, "DSTACK_NODE_RANK": "0"}, gpus=4).primary
