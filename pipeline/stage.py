"""The Ray Data inference stage: one actor holds one model replica and processes row batches.

`InferenceStage` is the data-parallel replica (one actor per GPU, or a share of the CPUs);
`pipeline.replicas.TensorParallelStage` is the coordinator of a tensor-parallel replica.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.arrow_rows import attach_results
from pipeline.replicas import FaultInjector, replica_name


class InferenceStage:
    """Callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy(...))`."""

    def __init__(self, spec: dict, fault: dict | None = None) -> None:
        from pipeline.engine import InferenceEngine  # heavy: import inside the actor

        self.engine = InferenceEngine(spec)
        self.engine.replica = replica_name(str(self.engine.device))
        self.fault = FaultInjector(fault)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = attach_results(batch, self.engine.process(batch.to_pylist()))
        self.fault.after_rows(batch.num_rows)
        return out
