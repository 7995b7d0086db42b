"""What a training run asks of the cluster: impossible requests are refused, busy ones are explained, and the shipped
defaults leave a retrain room beside the shipped Serve app."""

from __future__ import annotations

from pathlib import Path

import yaml

from ray_app.config import TrainConfig
from ray_app.config_loader import load_config
from ray_app.resources import TrainingRequest, impossible, storage_problem, waiting_for, worker_threads

ROOT = Path(__file__).resolve().parents[1]
NODE = {"CPU": 2.0, "memory": 1e10}


def request(**train) -> TrainingRequest:
    return TrainingRequest.of(TrainConfig(**train))


def test_a_request_larger_than_the_cluster_names_itself_the_total_and_the_setting() -> None:
    reason = impossible(request(cpus_per_worker=8), {"CPU": 2.0}, [NODE])
    assert reason is not None
    assert "1 worker(s) x {8 CPU} = 8 CPU" in reason
    assert "the cluster has 2 CPU in total" in reason
    assert "train.cpus_per_worker" in reason


def test_workers_must_each_fit_on_one_node_even_when_the_sum_fits() -> None:
    nodes = [NODE, NODE]
    assert impossible(request(num_workers=2, cpus_per_worker=1.5), {"CPU": 4.0}, nodes) is None
    reason = impossible(request(cpus_per_worker=3), {"CPU": 4.0}, nodes)
    assert reason is not None and "no node holds one worker (the largest has 2 CPU)" in reason


def test_a_gpu_request_on_a_cpu_cluster_is_impossible() -> None:
    reason = impossible(request(use_gpu=True), {"CPU": 2.0}, [NODE])
    assert reason is not None and "0 GPU in total" in reason


def test_a_feasible_request_says_what_it_waits_for_only_when_it_must_wait() -> None:
    busy = waiting_for(request(cpus_per_worker=1.5), {"CPU": 0.75}, {"CPU": 2.0})
    assert busy is not None and "1.5 CPU: 0.75 CPU of 2 CPU are free now" in busy
    assert waiting_for(request(cpus_per_worker=0.5), {"CPU": 0.75}, {"CPU": 2.0}) is None


def test_threads_and_reserved_cpus_are_separate_settings() -> None:
    assert worker_threads(TrainConfig(cpus_per_worker=0.5, torch_threads=2)) == 2
    assert worker_threads(TrainConfig(cpus_per_worker=3, torch_threads=None)) == 3
    assert worker_threads(TrainConfig(cpus_per_worker=0.25, torch_threads=None)) == 1


def serving_max_cpus(serve_config: dict) -> float:
    """What the shipped app can hold at most: every deployment at its largest replica count."""
    total = 0.0
    for dep in serve_config["applications"][0]["deployments"]:
        replicas = dep.get("autoscaling_config", {}).get("max_replicas", dep.get("num_replicas", 1))
        total += replicas * dep.get("ray_actor_options", {}).get("num_cpus", 1)
    return total


def test_the_default_retrain_fits_beside_the_default_app_at_its_largest() -> None:
    """The job `monitor.on_breach: retrain` submits (configs/default.yaml) on make run's 2-CPU head, with
    serve_config.yaml's app scaled to max_replicas: its data tasks and its training worker both find room."""
    cfg = load_config(ROOT / "configs" / "default.yaml")
    held = serving_max_cpus(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    free = cfg.ray.num_cpus - held
    assert held == 1.0
    assert TrainingRequest.of(cfg.train).total()["CPU"] <= free
    assert cfg.data.cpus_per_task <= free
    assert worker_threads(cfg.train) == 2  # and it still computes on both cores


def test_a_local_storage_path_on_several_nodes_names_the_setting_and_both_fixes() -> None:
    reason = storage_problem(2, "~/ray_results", shared_filesystem=False)
    assert reason is not None
    assert "train.storage_path='~/ray_results' is a local path" in reason and "2 nodes" in reason
    assert "s3://" in reason and "train.shared_filesystem=true" in reason
    assert storage_problem(3, "file:///mnt/results", shared_filesystem=False) is not None  # a file:// URI is local too


def test_shared_or_single_node_storage_is_accepted() -> None:
    assert storage_problem(1, "~/ray_results", shared_filesystem=False) is None  # one node: its disk is shared
    assert storage_problem(2, "s3://bucket/ray_results", shared_filesystem=False) is None
    assert storage_problem(2, "/mnt/nfs/ray_results", shared_filesystem=True) is None  # NFS, said explicitly


def test_a_checkpoint_on_s3_is_named_by_a_uri_that_opens_again() -> None:
    """Ray gives an S3 checkpoint's path without its scheme; alone it would read as a local path."""
    from ray_app.storage import checkpoint_uri

    in_bucket = "ray-app/ray_results/run/checkpoint_1"
    assert checkpoint_uri(in_bucket, "s3://ray-app/ray_results") == "s3://ray-app/ray_results/run/checkpoint_1"
    assert checkpoint_uri(f"s3://{in_bucket}", "s3://ray-app/ray_results") == f"s3://{in_bucket}"  # once only
    local = "/home/u/ray_results/run/checkpoint_1"
    assert checkpoint_uri(local, "~/ray_results") == local
    assert checkpoint_uri(local, "file:///home/u/ray_results") == local


def test_each_process_restores_a_remote_checkpoint_from_a_copy_of_its_own(tmp_path: Path) -> None:
    """Ray's `as_directory()` hands every process of a machine one shared temp dir for a remote checkpoint, which a
    later process downloads into again while an earlier one reads it; `own_copy` gives each reader its own. A
    pyarrow filesystem other than the local one stands in for S3 here (the cluster drill reads from real S3)."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from ray_app.storage import own_copy

    stored = tmp_path / "bucket" / "checkpoint_000001"
    stored.mkdir(parents=True)
    (stored / "train_state.pt").write_bytes(b"state" * 1000)
    remote = Checkpoint("checkpoint_000001", filesystem=pafs.SubTreeFileSystem(str(tmp_path / "bucket"),
                                                                                  pafs.LocalFileSystem()))  # fmt: skip
    with remote.as_directory() as ray_a, remote.as_directory() as ray_b:
        assert ray_a == ray_b  # Ray's own: one directory for both readers
    with own_copy(remote) as first, own_copy(remote) as second:
        assert first != second and first.parent != stored.parent
        assert (first / "train_state.pt").read_bytes() == (second / "train_state.pt").read_bytes() == b"state" * 1000
        (second / "train_state.pt").write_bytes(b"")  # what a later download would do to a shared file
        assert (first / "train_state.pt").read_bytes() == b"state" * 1000
    assert not first.exists() and not second.exists() and (stored / "train_state.pt").exists()
    with own_copy(Checkpoint(str(stored))) as local:  # local or shared file system: read where it is, no copy
        assert local == stored
