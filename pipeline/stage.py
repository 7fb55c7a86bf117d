"""The Ray Data inference stage: one actor holds one model replica and processes row batches."""

from __future__ import annotations

import pyarrow as pa

from pipeline.arrow_rows import attach_results


class InferenceStage:
    """Callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy(...))`."""

    def __init__(self, spec: dict) -> None:
        from pipeline.engine import InferenceEngine  # heavy: import inside the actor

        self.engine = InferenceEngine(spec)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return attach_results(batch, self.engine.process(batch.to_pylist()))
