"""``alignkd export --gguf``: the GGUF file read back holds the student's every weight, hyperparameter and token.

Each export is read back with gguf's own ``GGUFReader`` and compared with what
transformers loads from the student folder: every tensor (the query and key rows
put back in Hugging Face's order here, by a reordering written independently of
the exporter's), the llama hyperparameters and the tokenizer (tokens in id order,
types, merges, special ids). When llama-cpp-python is installed, llama.cpp itself
loads the file and must tokenize and continue a prompt as transformers does.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from alignkd import testing as tiny
from alignkd.cli import main
from alignkd.errors import DiskError, ExportError
from alignkd.export import gguf_file
from alignkd.export.gguf_file import export_gguf

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, block, rest = hf.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{block}.{BLOCK[module]}.{kind}"


def halves_first(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rope row order (neighbours 2i, 2i + 1 rotate together) back to Hugging Face's (i, i + d/2)."""
    d = w.shape[0] // heads
    per_head = w.reshape(heads, d, -1)
    out = torch.cat([per_head[:, 0::2], per_head[:, 1::2]], dim=1)
    return out.reshape(w.shape)


def read_back(path) -> tuple[dict[str, torch.Tensor], dict, dict[str, int]]:
    """The file's tensors (float32, numpy's row-major shape), its metadata values and its tensors' ggml types."""
    reader = gguf.GGUFReader(path)
    tensors, kinds = {}, {}
    for t in reader.tensors:
        kinds[t.name] = t.tensor_type
        shape = tuple(int(n) for n in reversed(t.shape))
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            raw = torch.from_numpy(np.array(t.data).view(np.int16).reshape(shape))
            tensors[t.name] = raw.view(torch.bfloat16).float()
        else:
            tensors[t.name] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return tensors, meta, kinds


def bpe_tokenizer(*, bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with merges, learnt on TEXT, digits split one by one as SmolLM2's tokenizer does.

    ``bos``: every encoded text starts with ``<|im_start|>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator([tiny.TEXT] * 4, trainer)
    if bos:
        first = [(specials[1], tok.token_to_id(specials[1]))]
        tok.post_processor = processors.TemplateProcessing(single=f"{specials[1]} $A", special_tokens=first)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>")


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """Tiny llama students: untied with the byte tokenizer, tied with a BOS, one with a merging BPE tokenizer, and
    one with biases (the query and key biases are reordered like their weights)."""
    root = tmp_path_factory.mktemp("gguf")
    bpe = root / "bpe"
    tok = bpe_tokenizer()
    tiny.save_model(bpe, "llama", vocab=len(tok) + 3, tie_word_embeddings=True, seed=2)
    tok.save_pretrained(bpe)
    return {
        "byte": tiny.save_model(root / "byte", "llama", seed=0),
        "tied_bos": tiny.save_model(root / "tied_bos", "llama", bos=True, tie_word_embeddings=True, seed=1),
        "bpe": bpe,
        "bias": tiny.save_model(root / "bias", "llama", attention_bias=True, mlp_bias=True, seed=5),
    }


@pytest.mark.parametrize("name", ["byte", "tied_bos", "bpe", "bias"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_tensor_reads_back_as_the_students(students, name, dtype, tmp_path):
    out = tmp_path / "student.gguf"
    done = export_gguf(students[name], out, dtype=dtype)
    assert done["dtype"] == dtype and out.is_file() and not list(tmp_path.glob("*.part"))
    tensors, _, kinds = read_back(out)
    model = AutoModelForCausalLM.from_pretrained(students[name], dtype=torch.float32)
    cfg = model.config
    state = model.state_dict()
    if cfg.tie_word_embeddings:  # llama.cpp reads the head from token_embd.weight
        assert "output.weight" not in tensors
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    assert set(tensors) == {gguf_name(k) for k in state}
    for hf, want in state.items():
        got = tensors[gguf_name(hf)]
        if ".q_proj." in hf:
            got = halves_first(got, cfg.num_attention_heads)
        elif ".k_proj." in hf:
            got = halves_first(got, cfg.num_key_value_heads)
        matrix = want.dim() > 1
        want = want.to(TORCH[dtype]).float() if matrix else want  # vectors stay float32
        expected_kind = gguf.GGMLQuantizationType[{"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]]
        assert kinds[gguf_name(hf)] == (expected_kind if matrix else gguf.GGMLQuantizationType.F32), hf
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, hf=hf: f"{hf}: {m}")


def test_the_rope_reordering_is_not_the_identity(students, tmp_path):
    """The comparison above would pass a file without the reordering only if the reordering did nothing."""
    export_gguf(students["byte"], tmp_path / "s.gguf")
    tensors, _, _ = read_back(tmp_path / "s.gguf")
    q = AutoModelForCausalLM.from_pretrained(students["byte"]).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(tensors["blk.0.attn_q.weight"], q)


@pytest.mark.parametrize("name", ["byte", "tied_bos", "bpe"])
def test_hyperparameters_and_tokenizer_are_the_students(students, name, tmp_path):
    out = tmp_path / "s.gguf"
    export_gguf(students[name], out)
    _, meta, _ = read_back(out)
    cfg = AutoConfig.from_pretrained(students[name])
    tok = AutoTokenizer.from_pretrained(students[name])
    assert meta["general.architecture"] == "llama"
    expected = {
        "llama.vocab_size": cfg.vocab_size,
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_hidden_layers,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)

    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))  # ids are dense, so id order is list order
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[: len(vocab)] == [t for t, _ in vocab]
    assert len(tokens) == cfg.vocab_size and all(t.startswith("[PAD") for t in tokens[len(vocab) :])
    types = meta["tokenizer.ggml.token_type"]
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == set(tok.all_special_ids)
    assert set(types[len(vocab) :]) <= {gguf.TokenType.UNUSED}
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert (len(merges) > 0) == (name == "bpe")
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == ("smollm" if name == "bpe" else "gpt-2")
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    bos = tok.bos_token_id if tok.bos_token_id is not None else cfg.bos_token_id
    assert meta["tokenizer.ggml.bos_token_id"] == bos
    assert meta.get("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] == (tok("a")["input_ids"][0] == tok.bos_token_id)


def test_float16_students_stay_float16_under_auto(students, tmp_path):
    student = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(students["byte"], dtype=torch.float16).save_pretrained(student)
    AutoTokenizer.from_pretrained(students["byte"]).save_pretrained(student)
    assert export_gguf(student, tmp_path / "half.gguf")["dtype"] == "float16"
    assert export_gguf(students["byte"], tmp_path / "full.gguf")["dtype"] == "float32"


def test_other_tokenizers_are_refused_in_one_line(students, tmp_path):
    student = tmp_path / "prefix"
    tiny.save_model(student, "llama")
    spec = json.loads((student / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True  # llama.cpp's gpt-2 split never adds one
    (student / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="pre-tokenizer .ByteLevel. has no llama.cpp twin"):
        export_gguf(student, tmp_path / "x.gguf")
    wordlevel = tmp_path / "wordlevel"
    tiny.save_model(wordlevel, "llama")
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(wordlevel)
    with pytest.raises(ExportError, match="WordLevel tokenizer; GGUF export supports byte-level BPE"):
        export_gguf(wordlevel, tmp_path / "y.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_a_full_disk_gives_one_line_and_no_file(students, tmp_path, monkeypatch):
    def full(path, *args):
        path.write_bytes(b"GGUF")  # part of the file made it before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf_file, "_write", full)
    with pytest.raises(DiskError, match="could not write .*s.gguf: no space left on the device .*; free some space"):
        gguf_file.export_gguf(students["byte"], tmp_path / "s.gguf")
    assert not list(tmp_path.iterdir())


def test_the_command_writes_the_file_and_says_so(students, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["export", str(students["tied_bos"]), "--gguf", str(out), "--dtype", "bfloat16"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}" in said and "bfloat16" in said
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16


HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
PROMPT = "It is a truth universally acknowledged (1813), that a single man"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def sharp_student(tmp_path_factory):
    """A student whose next-token logits stand well apart (larger random weights), so greedy choices are no ties."""
    root = tmp_path_factory.mktemp("sharp")
    return {
        "byte": tiny.save_model(root / "byte", "llama", width=64, initializer_range=0.2, seed=3),
        "bpe_tied_bos": _bpe_student(root / "bpe"),
        "bias": tiny.save_model(
            root / "bias", "llama", width=64, initializer_range=0.2, attention_bias=True, mlp_bias=True, seed=5
        ),
    }


def _bpe_student(path):
    tok = bpe_tokenizer(bos=True)
    tiny.save_model(path, "llama", vocab=len(tok), width=64, initializer_range=0.2, tie_word_embeddings=True, seed=4)
    tok.save_pretrained(path)
    return path


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
@pytest.mark.parametrize("name", ["byte", "bpe_tied_bos", "bias"])
def test_llama_cpp_tokenizes_scores_and_continues_as_transformers(sharp_student, name, tmp_path):
    import llama_cpp

    student = sharp_student[name]
    out = tmp_path / "s.gguf"
    export_gguf(student, out, dtype="float32")
    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    ids = tok(PROMPT)["input_ids"]
    # A float32 KV cache (llama.cpp's default is float16, which alone moves logits by ~1e-2): then only float32
    # rounding separates the two.
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(str(out), n_ctx=128, n_threads=1, logits_all=True, verbose=False, type_k=f32, type_v=f32)
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=False) == ids

    llm.eval(ids)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    top2 = torch.stack(ref.logits)[:, 0].topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-2, "greedy near-tie: the comparison below would be luck"
    llm.reset()
    greedy = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        greedy.append(token)
        if len(greedy) == NEW_TOKENS:
            break
    llm.close()
    assert greedy == ref.sequences[0, len(ids) :].tolist()


def test_an_adapter_folder_is_refused_in_one_line(tmp_path):
    from alignkd.errors import ExportError
    from alignkd.export.gguf_file import export_gguf

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match="is a PEFT adapter folder.*student.peft.merge: true"):
        export_gguf(folder, tmp_path / "s.gguf")
    assert not (tmp_path / "s.gguf").exists()
