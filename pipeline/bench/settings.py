"""What a benchmark run measures: the settings, the quick preset and the model shapes.

The models are random-weight Llamas built from a config: speed and memory depend on the
shapes (layers, heads, head_dim, hidden, intermediate, vocab) and the dtype, not on the
values of the weights, so no checkpoint is needed and none is downloaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.models import TINY_LLAMA_SHAPES

# Llama-3.1-8B's shapes. rope_scaling ("llama3") only changes the rotary frequencies, not the
# work, so it is left out.
LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

# SmolLM2-135M's shapes (the embedded model of kvpipe; 8K positions trained, any computed).
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)

# A tiny GQA Llama for CPU smoke tests (milliseconds per forward).
TINY = dict(TINY_LLAMA_SHAPES, vocab_size=512, rope_theta=10000.0, rms_norm_eps=1e-5)

MODEL_SHAPES = {"llama8b": LLAMA_8B, "smollm2": SMOLLM2_135M, "tiny": TINY}

DEFAULT_POLICIES = ("full", "streaming_llm", "snapkv", "pyramidkv", "adakv", "kivi", "spindlekv")
QUICK = dict(
    contexts=(32768, 8192),  # the targets' context first, should the time budget run out
    policies=("full", "streaming_llm", "snapkv", "kivi"),
    ratios=(0.25,),
    decode_steps=16,
    prefill_reps=1,
    max_minutes=7.5,
)
TINY_PRESET = dict(contexts=(128, 256), prefill_chunk=64, max_batch=4, decode_batch=2, decode_steps=4)


@dataclass
class BenchSettings:
    model: str = "llama8b"  # llama8b | smollm2 | tiny | a directory holding config.json
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    contexts: tuple[int, ...] = (8192, 32768, 65536)
    policies: tuple[str, ...] = DEFAULT_POLICIES
    ratios: tuple[float, ...] = (0.5, 0.25, 0.125)
    policy_params: dict = field(default_factory=dict)  # {policy: {param: value}}
    prefill_modes: tuple[str, ...] = ("oneshot", "chunked")
    prefill_chunk: int = 4096
    prefill_batch: int = 1  # rows prefilled together (the decode batch tiles their caches)
    prefill_reps: int = 2
    decode_batch: int = 4  # the "given batch" of the step-time comparison (clamped to what fits)
    decode_steps: int = 64
    decode_warmup: int = 3
    # cap of the largest-batch search: high enough that memory, not the cap, ends it (SmolLM2 at
    # 8K with a quarter budget fits ~1600 rows; a cap of 256 stopped every cell there)
    max_batch: int = 4096
    search_steps: int = 2  # decode steps of each largest-batch probe
    hf_baseline: bool = True
    hf_at_max_batch: bool = False  # also run HF generate at full's largest batch (slow: 2 prefills of it)
    micro: bool = True  # attention micro-benchmarks (mask build, sdpa backends) for the hot-path notes
    max_minutes: float | None = None
    seed: int = 0
    out_dir: str = "benchmarks/results"
    tag: str = ""
    quick: bool = False
    tiny: bool = False

    def __post_init__(self) -> None:
        if not self.contexts or any(c < 2 for c in self.contexts):
            raise ValueError("contexts must be integers >= 2")
        if not self.policies:
            raise ValueError("name at least one policy")
        if any(not 0.0 < r <= 1.0 for r in self.ratios):
            raise ValueError("ratios must be in (0, 1]")
        bad = [m for m in self.prefill_modes if m not in ("oneshot", "chunked")]
        if bad or not self.prefill_modes:
            raise ValueError(f"prefill modes are 'oneshot' and/or 'chunked', got {list(self.prefill_modes)}")
        for name in (
            "prefill_chunk",
            "prefill_batch",
            "prefill_reps",
            "decode_batch",
            "decode_steps",
            "max_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.search_steps < 1 or self.decode_warmup < 0:
            raise ValueError("search_steps must be >= 1 and decode_warmup >= 0")

    def to_dict(self) -> dict:
        return asdict(self)
