"""Model replicas on a Ray cluster: data-parallel actors and tensor-parallel replicas.

Data parallel: `ActorPoolStrategy(size=replicas)` runs one `InferenceStage` actor per replica,
each with `gpus_per_replica` GPUs (one per GPU by default) or a share of the CPUs; Ray Data
streams row batches to whichever actor is free, restarts a dead actor and retries its task.

Tensor parallel (`tensor_parallel: tp > 1`, DeepSpeed AutoTP), placed the way Ray Data LLM
places vLLM's workers: for every replica the driver reserves a placement group of 1 + tp
bundles, STRICT_PACK (one node: NCCL over NVLink/PCIe, or gloo over loopback on CPU). Bundle 0
holds the coordinator (`TensorParallelStage`, the Ray Data actor, a tenth of a CPU, no GPU),
bundles 1..tp one `TPRank` actor each (a GPU, or `cpus_per_replica` CPUs). The ranks join one
torch.distributed group (NCCL on GPUs, gloo on CPU; RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE,
MASTER_ADDR, MASTER_PORT set for DeepSpeed), and each builds the same `InferenceEngine` with
`deepspeed.init_inference(tp_size=tp)`. The coordinator sends every batch to all ranks; all
ranks run the same prepare / plan / generate (the planner agrees on the smallest free memory
of the group; a head-aggregating policy all-reduces its scores over the group), and rank 0's
rows are returned, with the cache figures summed over the ranks (each holds its heads' share).
"""

from __future__ import annotations

import logging
import os
import socket

import pyarrow as pa

log = logging.getLogger(__name__)

COORDINATOR_CPUS = 0.1  # the TP coordinator only forwards rows
FAULT_ENV = ("KVPIPE_FAULT_EXIT_AFTER_ROWS", "KVPIPE_FAULT_MARKER")  # test-only fault injection
SUMMED_OVER_RANKS = ("kv_tokens_kept", "kv_bytes_kept")


def replica_name(device: str, tp: int = 1) -> str:
    """host:device@node/pid: names the node (Ray node id) and the process of a replica."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    dev = f"{device}x{tp}" if tp > 1 else device
    return f"{socket.gethostname()}:{dev}@{node[:12]}/{os.getpid()}"


def fault_from_env() -> dict | None:
    """Test-only fault injection, read on the driver and handed to the replicas."""
    values = {k: os.environ[k] for k in FAULT_ENV if os.environ.get(k)}
    return values or None


class FaultInjector:
    """Kills its process (os._exit) once the replica has processed N rows, once per marker file.

    The batch that crosses N is lost with the process, so Ray must restart the actor and retry
    the task: the fault tests check that every row still comes out exactly once.
    """

    def __init__(self, fault: dict | None) -> None:
        fault = fault or {}
        after = fault.get("KVPIPE_FAULT_EXIT_AFTER_ROWS")
        self.after = int(after) if after else None
        self.marker = fault.get("KVPIPE_FAULT_MARKER")
        self.rows = 0

    def after_rows(self, n: int) -> None:
        self.rows += n
        if self.after is None or self.rows < self.after or not self.marker:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # the fault already happened once
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        log.warning("fault injection: replica %d exits after %d rows", os.getpid(), self.rows)
        os._exit(1)


# -- sizing and placement -----------------------------------------------------------------------
def gpus_per_rank(spec: dict, cluster_resources: dict) -> float:
    gpus = spec["cluster"]["gpus_per_replica"]
    if gpus is None:
        has_gpu = cluster_resources.get("GPU", 0) > 0 and spec["device"] != "cpu"
        return 1.0 if has_gpu else 0.0
    return gpus / spec["tensor_parallel"]


def replica_count(spec: dict, cluster_resources: dict) -> int:
    """`cluster.replicas`, or for "auto" as many replicas as the cluster's resources hold."""
    c = spec["cluster"]
    if c["replicas"] != "auto":
        return int(c["replicas"])
    tp = spec["tensor_parallel"]
    limits = []
    gpu = gpus_per_rank(spec, cluster_resources)
    if gpu > 0:
        limits.append(cluster_resources.get("GPU", 0) // (gpu * tp))
    else:  # CPU replicas: keep one CPU for the read and write tasks
        per = c["cpus_per_replica"] * tp + (COORDINATOR_CPUS if tp > 1 else 0)
        if per > 0:
            limits.append((cluster_resources.get("CPU", 1) - 1) // per)
    for name, amount in c["resources_per_replica"].items():
        if amount > 0:
            limits.append(cluster_resources.get(name, 0) // amount)
    return max(1, int(min(limits))) if limits else 1


def replica_remote_args(spec: dict, cluster_resources: dict, placement_groups: list) -> dict:
    """Keyword arguments for `map_batches`: resources, placement, and the stage class."""
    from pipeline.stage import InferenceStage

    c = spec["cluster"]
    tp = spec["tensor_parallel"]
    custom = dict(c["resources_per_replica"])
    if tp == 1:
        args: dict = {
            "fn": InferenceStage,
            "num_cpus": c["cpus_per_replica"],
            "num_gpus": gpus_per_rank(spec, cluster_resources),
        }
        if custom:
            args["resources"] = custom
        if c["placement"] == "spread":
            args["scheduling_strategy"] = "SPREAD"
        return args

    gpu = gpus_per_rank(spec, cluster_resources)
    rank_bundle = {"CPU": c["cpus_per_replica"], **({"GPU": gpu} if gpu else {})}
    bundles = [{"CPU": COORDINATOR_CPUS, **custom}] + [dict(rank_bundle) for _ in range(tp)]

    def in_placement_group() -> dict:
        """Called by Ray Data before each coordinator actor starts: a fresh group per replica."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = placement_group(bundles, strategy="STRICT_PACK")
        placement_groups.append(pg)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)}

    return {
        "fn": TensorParallelStage,
        "num_cpus": COORDINATOR_CPUS,
        "num_gpus": 0,
        **({"resources": custom} if custom else {}),
        "ray_remote_args_fn": in_placement_group,
    }


# -- tensor parallelism -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class TPRank:
    """One tensor-parallel rank (a Ray actor in bundle rank+1 of its replica's placement group)."""

    def __init__(self, spec: dict, rank: int, world: int) -> None:
        self.spec, self.rank, self.world = spec, rank, world

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> str:
        import deepspeed
        import torch

        env = {
            "RANK": self.rank,
            "WORLD_SIZE": self.world,
            "LOCAL_RANK": self.rank,
            "LOCAL_SIZE": self.world,  # without it DeepSpeed's CPU shared-memory all-reduce crashes
            "CROSS_RANK": 0,
            "CROSS_SIZE": 1,
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": master_port,
        }
        os.environ.update({k: str(v) for k, v in env.items()})
        on_gpu = torch.cuda.is_available() and self.spec["device"] != "cpu"
        if on_gpu:
            torch.cuda.set_device(0)  # Ray gives each rank its own GPU as cuda:0
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
        if not on_gpu:
            _cpu_all_reduce_over_gloo(master_addr, master_port, self.rank)

        from pipeline.engine import InferenceEngine

        self.engine = InferenceEngine(self.spec)
        return str(self.engine.device)

    def process(self, rows: list[dict]) -> list[dict]:
        return self.engine.process(rows)


def _cpu_all_reduce_over_gloo(master_addr: str, master_port: int, rank: int) -> None:
    """On CPU, AutoTP's all-reduce goes through gloo, not DeepSpeed's shared-memory kernel.

    The shm kernel spin-waits on flags in /dev/shm; on an oversubscribed CPU (more busy
    processes than cores) its peers were seen to hang for good, and its 66 MB buffers outlive
    the processes. Gloo is slower per call but safe; the buffers are unlinked once every rank
    has mapped them.
    """
    import glob

    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    if ds_comm.cdb is not None:
        ds_comm.cdb.shm_vector_kernel_level = 0  # inference_all_reduce -> torch.distributed.all_reduce
    dist.barrier()
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{master_addr}_{master_port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass


class TensorParallelStage:
    """The coordinator of one tensor-parallel replica (the Ray Data actor)."""

    def __init__(self, spec: dict, fault: dict | None = None) -> None:
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        tp = spec["tensor_parallel"]
        pg = get_current_placement_group()
        if pg is None:
            raise RuntimeError("TensorParallelStage must run in its replica's placement group")
        bundle = pg.bundle_specs[1]
        rank_cls = ray.remote(TPRank)
        self.ranks = [
            rank_cls.options(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=1 + r),
            ).remote(spec, r, tp)
            for r in range(tp)
        ]
        addr, port = ray.get(self.ranks[0].address.remote())
        devices = ray.get([rank.setup.remote(addr, port) for rank in self.ranks])
        self.replica = replica_name(devices[0], tp)
        self.fault = FaultInjector(fault)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        from pipeline.arrow_rows import attach_results

        rows = batch.to_pylist()
        per_rank = ray.get([rank.process.remote(rows) for rank in self.ranks])
        results = per_rank[0]
        for i, row in enumerate(results):
            row["replica"] = self.replica
            for key in SUMMED_OVER_RANKS:
                if row.get(key) is not None:
                    row[key] = sum(r[i][key] for r in per_rank)
        out = attach_results(batch, results)
        self.fault.after_rows(batch.num_rows)
        return out
