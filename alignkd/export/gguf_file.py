"""A llama-family student (a ``save_pretrained`` folder) as one GGUF file that llama.cpp and Ollama run.

The file holds llama.cpp's ``llama`` architecture: the hyperparameters under
``llama.*``, every weight under llama.cpp's tensor names, and the tokenizer (see
``tokenizer``). Two things differ from the Hugging Face checkpoint:

- the query and key projections' rows are reordered within each head: Hugging
  Face's llama rotates the two halves of a head together (dimension i with
  i + d/2), llama.cpp's rotates neighbours (2i with 2i + 1), so row i of the
  first half must land on row 2i and row i of the second half on row 2i + 1;
- with tied embeddings there is no ``output.weight``: llama.cpp then reads the
  output head from ``token_embd.weight``, as the student does.

Weights keep the precision they are asked for (``DTYPES``); norms and other
vectors stay float32 whatever it is, as llama.cpp expects of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import torch

from alignkd.disk import disk_errno, fix, why
from alignkd.errors import DiskError, ExportError
from alignkd.export import DTYPES
from alignkd.export.tokenizer import GGUFVocab, gguf_vocab
from alignkd.models.adapters import is_adapter_folder

ARCHITECTURES = ("llama",)
"""Hugging Face ``model_type`` values that export (as llama.cpp's ``llama``)."""
ROPE_TYPES = ("default",)


def export_gguf(student: str | os.PathLike, out: str | os.PathLike, dtype: str = "auto") -> dict:
    """Write ``student`` (a llama-family folder) to ``out`` (``*.gguf``); returns what was written.

    Everything is checked before the file is opened; the file is written beside ``out`` and renamed, so a failed
    export leaves no half-written ``out``. Returns ``{"path", "dtype", "tensors", "bytes", "params"}``.
    """
    from transformers import AutoModelForCausalLM

    student, out = Path(student), Path(out)
    _check_paths(student, out)
    config = _check_config(student)
    resolved = _resolve_dtype(dtype, config)
    tok = _tokenizer(student)
    vocab = gguf_vocab(tok, config.vocab_size, getattr(config, "bos_token_id", None))
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    tensors = gguf_tensors(model.state_dict(), config, resolved)
    part = out.with_name(out.name + ".part")
    try:
        _write(part, student.resolve().name, config, vocab, tensors, resolved)
        part.replace(out)
    except OSError as e:  # a full disk or a folder without write permission: one line, like a run's writes
        needed = sum(array.nbytes for array, _ in tensors.values())
        code = disk_errno(e, out.parent, needed)
        if code is None:
            raise
        raise DiskError(
            f"could not write {out}: {why(code, out.parent, needed)}; {fix(code, out.parent)} and export again", code
        ) from None
    finally:
        part.unlink(missing_ok=True)
    return {
        "path": out,
        "dtype": resolved,
        "tensors": len(tensors),
        "bytes": out.stat().st_size,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _check_paths(student: Path, out: Path) -> None:
    if not student.is_dir():
        raise ExportError(f"student folder not found: {student}; give a save_pretrained folder, e.g. runs/x/student")
    if is_adapter_folder(str(student)):
        raise ExportError(
            f"{student} is a PEFT adapter folder, and a GGUF file holds whole weights; distil with "
            "student.peft.merge: true, or save PeftModel.merge_and_unload() of it and export that"
        )
    if not (student / "config.json").is_file():
        raise ExportError(f"{student} has no config.json; point it at a save_pretrained folder (a run's student/)")
    if out.suffix != ".gguf":
        raise ExportError(f"--gguf {out} does not end in .gguf; name the file e.g. student.gguf")
    if not out.parent.is_dir():
        raise ExportError(f"--gguf {out}: folder {out.parent} does not exist; create it or write elsewhere")
    if out.is_dir():
        raise ExportError(f"--gguf {out} is a folder; give a file name ending in .gguf")


def _check_config(student: Path):
    """The student's transformers config, if its family, activation and rope are what llama.cpp's llama runs."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(student)
    except (OSError, ValueError) as e:
        raise ExportError(f"{student}: could not read config.json ({str(e).splitlines()[0]})") from None
    kind = getattr(config, "model_type", "?")
    if kind not in ARCHITECTURES:
        raise ExportError(
            f"{student} is a {kind} model; GGUF export supports {', '.join(ARCHITECTURES)} students "
            "(LlamaForCausalLM, e.g. SmolLM2): distil into a llama student to run it in llama.cpp"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"{student} uses hidden_act={config.hidden_act}; llama.cpp's llama runs silu only")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise ExportError(
            f"{student} uses {rope['rope_type']} rope scaling; GGUF export writes plain rope only (rope_type default)"
        )
    return config


def _tokenizer(student: Path):
    """The student's tokenizer as saved (not ``load_tokenizer``'s, which lends a missing pad token the EOS)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(student)
    except (OSError, ValueError) as e:
        raise ExportError(
            f"{student}: no tokenizer could be loaded ({str(e).splitlines()[0]}); save it beside the student"
        ) from None


def _rope(config) -> dict:
    """The rope settings: ``rope_parameters`` (transformers 5) or the older ``rope_theta``/``rope_scaling``."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def _resolve_dtype(dtype: str, config) -> str:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    saved = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    saved = saved.removeprefix("torch.")
    return saved if saved in ("float16", "bfloat16") else "float32"


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def interleave_rope(w, heads: int):
    """Rows of a query or key projection (or its bias), Hugging Face's rope order -> llama.cpp's.

    ``w``: (heads * d, ...) with each head's rows as [first half, second half]; returns the same shape with each
    head's rows as [h0, s0, h1, s1, ...] (h: first half, s: second half), so that llama.cpp's rotation of rows
    (2i, 2i + 1) is Hugging Face's of (i, i + d/2).
    """
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(state: dict, config, dtype: str) -> dict:
    """The student's weights under llama.cpp's names, as numpy arrays ready to write: name -> (array, ggml type).

    ``state``: the model's ``state_dict`` (float32). The output head is left out when tied to the embedding.
    """
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    out = {}
    for name, w in state.items():
        if name == "lm_head.weight" and tied:
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ExportError(f"the student's weight {name} has no llama.cpp name; GGUF export writes plain llama")
        w = w.detach().to(torch.float32)
        if ".self_attn.q_proj." in name:
            w = interleave_rope(w, config.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            w = interleave_rope(w, kv_heads)
        out[target] = _array(w, dtype if w.dim() > 1 else "float32")
    return out


def _array(w, dtype: str):
    """``w`` (a float32 tensor) as (numpy array, ggml type); bfloat16 goes as raw bytes, numpy having no bfloat16."""
    kinds = gguf.GGMLQuantizationType
    if dtype == "bfloat16":
        return w.to(torch.bfloat16).contiguous().view(torch.uint8).numpy(), kinds.BF16
    if dtype == "float16":
        return w.to(torch.float16).numpy(), kinds.F16
    return w.contiguous().numpy(), kinds.F32


def _write(path: Path, name: str, config, vocab: GGUFVocab, tensors: dict, dtype: str) -> None:
    writer = _Writer(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    file_types = {"float32": "ALL_F32", "float16": "MOSTLY_F16", "bfloat16": "MOSTLY_BF16"}
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[dtype]))
    _write_hparams(writer, config)
    _write_vocab(writer, vocab)
    for target, (array, kind) in tensors.items():
        writer.add_tensor(target, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_hparams(writer, config) -> None:
    d = head_dim(config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_rope_dimension_count(d)
    if d * config.num_attention_heads != config.hidden_size:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(d)
        writer.add_value_length(d)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _write_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for name, i in vocab.special.items():
        getattr(writer, f"add_{name}_token_id")(i)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


class _Writer(gguf.GGUFWriter):
    """gguf's writer, except that it writes an empty string array (the merges of a tokenizer that has none).

    llama.cpp refuses a ``gpt2`` tokenizer without ``tokenizer.ggml.merges``, while ``GGUFWriter`` skips an empty
    array (``add_array``) or refuses it (``_pack_val``); a byte-level tokenizer of single bytes has no merges.
    """

    def add_array(self, key, val):
        if len(val) == 0:
            self.add_key_value(key, val, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
            return
        super().add_array(key, val)

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type or gguf.GGUFValueType.STRING) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)
