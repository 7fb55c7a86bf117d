"""`kvpipe bench`: GPU performance of kvpipe's compressed cache against its baselines.

settings (what to run, the quick preset, model shapes) -> runner (plan cells, measure each,
save as it goes) -> measure (kvpipe prefill/decode, the largest batch, HF generate) and micro
(attention hot-path micro-benchmarks) on gpu (timing, memory, bandwidth) -> report (ratios,
targets, tables, merging several runs).
"""

from pipeline.bench.settings import BenchSettings

__all__ = ["BenchSettings"]
