"""Bad input, command by command: one line on stderr that says what to fix, exit 2, nothing written.

``CASES`` is the table (docs/bad-input.md lists it): an id, the
arguments of the real ``alignkd`` CLI and fragments its one error line must
hold. The cases share one set of tiny models and files, built once.

Every case runs in a process of its own (see ``FORK_SERVER`` for why forked, and
``FRESH`` for the ones also run in a new interpreter). "Nothing written" is
checked twice: the folder a case is pointed at (``out/<id>``) does not exist
afterwards, and no file or folder of the shared fixtures changed, appeared or
disappeared while the cases ran.

Cases marked ``argparse`` fail in argparse itself; they too give one line
(``alignkd`` does not print the usage before the error, it points at --help).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from alignkd import testing as tiny

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="the cases run in processes forked from one interpreter"
)

BAD_INPUT_PAGE = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
STUDY = Path(__file__).resolve().parents[1] / "configs" / "studies" / "lm.yaml"
SEQ_LEN = 32
HUB_TIMEOUT_S = 15  # an uncached hub id with HF_HUB_OFFLINE=1 must fail at once, not retry the network


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[World], list[str]]
    """The CLI's arguments, built from the shared fixtures."""
    expect: tuple[str, ...]
    """Fragments the error line holds."""
    argparse: bool = False
    """Rejected by argparse itself (the line then ends by pointing at --help)."""
    needs_run: bool = False
    """Needs the finished run (``w.run``) that the fixture prepares first."""
    skip: str = ""
    """Why the case cannot run here (empty: it runs)."""


class World:
    """Tiny models, data files and folders shared by every case, under one root."""

    def __init__(self, root: Path):
        self.root = root
        self.teacher = root / "teacher"
        self.other_tok = root / "other_tok"
        self.opt = root / "opt"
        self.neox = root / "neox"
        self.clf = root / "clf"
        self.corpus = root / "corpus"
        self.data = root / "data"
        self.config = root / "distill.yaml"
        self.clf_config = root / "clf.yaml"
        self.a_file = root / "a_file"
        self.old_run = root / "old_run"
        self.read_only = root / "read_only"
        self.run = root / "run"
        self.cwd = root / "cwd"
        self.cache = root / "cache"

    def out(self, case_id: str) -> Path:
        return self.root / "out" / case_id

    def distill(self, case_id: str, *overrides: str, config: Path | None = None) -> list[str]:
        """``distill CONFIG`` into the case's own output folder, with overrides."""
        return ["distill", str(config or self.config), f"train.output_dir={self.out(case_id)}", *overrides]


def _config(w: World, **sections) -> dict:
    cfg = {
        "teacher": {"path": str(w.teacher), "dtype": "float32"},
        "student": {"config": {"num_hidden_layers": 1}},
        "data": {"train": str(w.corpus), "seq_len": SEQ_LEN, "eval_fraction": 0.1},
        "losses": [{"type": "kl", "temperature": 2.0}, {"type": "ce"}, {"type": "hidden", "layers": [[0, 1]]}],
        "train": {
            "steps": 2,
            "batch_size": 4,
            "lr": 1.0e-3,
            "warmup": 0,
            "eval_every": 100,
            "eval_batches": 1,
            "save_every": 1,
            "mixed_precision": "no",
            "progress": False,
        },
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def build_world(root: Path) -> World:
    w = World(root)
    tiny.save_model(w.teacher, "llama", layers=2)
    _save_other_tokenizer(w.other_tok)
    # Two families alignkd does not know: OPT keeps its blocks in decoder.layers; GPT-NeoX
    # keeps them where llama does (so alignkd tries llama's layout), its attention elsewhere.
    _save_other(w.opt, "OPTConfig", ffn_dim=64, word_embed_proj_dim=32)
    _save_other(w.neox, "GPTNeoXConfig", intermediate_size=64)
    tiny.save_model(w.clf, "bert", task="sequence_classification", layers=2)
    tiny.write_corpus(w.corpus, docs=6)
    w.data.mkdir()
    (w.data / "empty.txt").write_text("")
    (w.data / "binary.txt").write_bytes(b"\x00\xff\xfe\x01" * 256)
    (w.data / "nul.txt").write_bytes(b"\x00\x01\x02\x03" * 256)  # valid UTF-8, still not text
    (w.data / "latin1.txt").write_bytes(("Ça coûte très cher, señor. " * 40).encode("latin-1"))
    (w.data / "empty_dir").mkdir()
    (w.data / "nolabel.csv").write_text(
        "text,sentiment\n" + "".join(f"a fine film {i},pos\nbad {i},neg\n" for i in range(20))
    )
    (w.data / "prompts_nofield.jsonl").write_text('{"text": "Once upon a time"}\n')
    (w.data / "prompts_chat.jsonl").write_text('{"messages": [{"role": "user", "content": "Hello"}]}\n')
    (w.data / "not_a_run").mkdir()
    (w.data / "not_a_run" / "notes.txt").write_text("hello\n")
    w.config.write_text(yaml.safe_dump(_config(w), sort_keys=False))
    w.clf_config.write_text(
        yaml.safe_dump(
            _config(
                w,
                teacher={"path": str(w.clf), "task": "sequence_classification"},
                data={"train": str(w.data / "nolabel.csv")},
                losses=[{"type": "kl"}, {"type": "ce"}],
            ),
            sort_keys=False,
        )
    )
    (w.data / "bad.yaml").write_text("teacher:\n  path: [x\ntrain: {steps: 3\n")
    (w.data / "list.yaml").write_text("- a\n- b\n")
    typo = _config(w)
    typo["trian"] = typo.pop("train")
    (w.data / "typo.yaml").write_text(yaml.safe_dump(typo, sort_keys=False))
    w.a_file.write_text("a file, not a folder\n")
    w.old_run.mkdir()
    (w.old_run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    w.read_only.mkdir()
    w.read_only.chmod(0o500)
    w.cwd.mkdir()
    return w


def _save_other_tokenizer(path: Path) -> None:
    """A tiny llama with a tokenizer that is not the teacher's: a byte-level BPE of 300 tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignkd.data.bpe import train_bpe

    tok = train_bpe([tiny.TEXT] * 4, 300)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny.config("llama", layers=1, vocab=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)


def _save_other(path: Path, config_class: str, **kw) -> None:
    """A tiny model of a family ``alignkd.testing`` does not build, with the byte tokenizer."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_class)(
        vocab_size=tiny.VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        **kw,
    )
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tiny.byte_tokenizer().save_pretrained(path)


D = World.distill  # shorthand: D(w, id, *overrides)

CASES: list[Case] = [
    # ---------------------------------------------------------------- distill: the config itself
    Case(
        "config_missing", lambda w: ["distill", str(w.data / "no_such.yaml")], ("config file not found", "no_such.yaml")
    ),
    Case("yaml_malformed", lambda w: ["distill", str(w.data / "bad.yaml")], ("bad.yaml", "not valid YAML")),
    Case("yaml_not_a_mapping", lambda w: ["distill", str(w.data / "list.yaml")], ("must be a mapping",)),
    Case(
        "key_unknown_top_level",
        lambda w: ["distill", str(w.data / "typo.yaml")],
        ("trian: unknown key", "did you mean 'train'"),
    ),
    Case(
        "key_unknown_nested",
        lambda w: D(w, "key_unknown_nested", "train.stpes=3"),
        ("train.stpes: unknown key", "did you mean 'steps'"),
    ),
    Case(
        "key_unknown_in_term",
        lambda w: D(w, "key_unknown_in_term", "losses.0.temprature=3"),
        ("losses[0].temprature: unknown key", "did you mean 'temperature'"),
    ),
    Case(
        "key_of_another_term_type",
        lambda w: D(w, "key_of_another_term_type", "losses.1.temperature=3"),
        ("losses[1]", "temperature does not apply to type 'ce'"),
    ),
    Case(
        "type_wrong_int",
        lambda w: D(w, "type_wrong_int", "train.steps=many"),
        ("train.steps: expected an integer", "'many'"),
    ),
    Case(
        "type_wrong_bool",
        lambda w: D(w, "type_wrong_bool", "train.progress=maybe"),
        ("train.progress: expected true or false",),
    ),
    Case("type_wrong_list", lambda w: D(w, "type_wrong_list", "losses=kl"), ("losses: expected a list",)),
    Case(
        "enum_misspelled",
        lambda w: D(w, "enum_misspelled", "losses.0.kind=forwrd"),
        ("losses[0].kind", "did you mean 'forward'"),
    ),
    Case(
        "term_type_unknown",
        lambda w: D(w, "term_type_unknown", "losses.0.type=kld"),
        ("losses[0].type: 'kld' is not one of",),
    ),
    Case("lr_negative", lambda w: D(w, "lr_negative", "train.lr=-1e-3"), ("train.lr: must be > 0",)),
    Case("steps_zero", lambda w: D(w, "steps_zero", "train.steps=0"), ("train.steps: must be >= 1",)),
    Case(
        "optimizer_unknown",
        lambda w: D(w, "optimizer_unknown", "train.optimizer=sgd"),
        ("train.optimizer: 'sgd' is not one of adamw, adafactor",),
    ),
    Case(
        "report_to_unknown",
        lambda w: D(w, "report_to_unknown", "train.report_to=[wandbb]"),
        ("train.report_to[0]: 'wandbb' is not one of tensorboard, wandb, mlflow", "did you mean 'wandb'"),
    ),
    Case(
        "report_to_not_installed",
        lambda w: D(w, "report_to_not_installed", "train.report_to=[aim]"),
        ("train.report_to: aim is not installed", "pip install aim", "remove it from train.report_to"),
        skip="aim is installed here" if importlib.util.find_spec("aim") else "",
    ),
    Case(
        "temperature_zero",
        lambda w: D(w, "temperature_zero", "losses.0.temperature=0"),
        ("losses[0].temperature", "> 0"),
    ),
    Case(
        "jsd_beta_one",
        lambda w: D(w, "jsd_beta_one", "losses.0.kind=jsd", "losses.0.beta=1"),
        ("losses[0].beta", "jsd"),
    ),
    Case(
        "eval_fraction_above_one",
        lambda w: D(w, "eval_fraction_above_one", "data.eval_fraction=1.5"),
        ("data.eval_fraction: 1.5", "[0, 1)"),
    ),
    Case(
        "student_two_sources",
        lambda w: D(w, "student_two_sources", f"student.path={w.teacher}"),
        ("student: set exactly one of", "path, config"),
    ),
    Case(
        "override_without_equals",
        lambda w: D(w, "override_without_equals", "train.steps"),
        ("override 'train.steps'", "key.sub=value"),
    ),
    Case(
        "override_bad_index",
        lambda w: D(w, "override_bad_index", "losses.7.weight=2"),
        ("losses.7", "not an index of a list of 3 items"),
    ),
    Case(
        "resume_and_overwrite",
        lambda w: [*D(w, "resume_and_overwrite"), "--resume", "--overwrite"],
        ("--resume and --overwrite contradict",),
    ),
    # ---------------------------------------------------------------- distill: layers
    Case(
        "layer_beyond_student",
        lambda w: D(w, "layer_beyond_student", "losses.2.layers=[[3, 1]]"),
        ("losses[2].layers", "student layer 3 does not exist", "0..0"),
    ),
    Case(
        "layer_beyond_teacher",
        lambda w: D(w, "layer_beyond_teacher", "losses.2.layers=[[0, 9]]"),
        ("losses[2].layers", "teacher layer 9 does not exist", "0..1"),
    ),
    Case(
        "from_teacher_layer_beyond",
        lambda w: D(
            w,
            "from_teacher_layer_beyond",
            "student.config=null",
            "student.from_teacher.layers=[0, 5]",
            "losses.2.layers=auto",
        ),
        ("student.from_teacher.layers: block 5 does not exist", "0..1"),
    ),
    Case(
        "projector_none_with_other_widths",
        lambda w: D(w, "projector_none_with_other_widths", "student.config.hidden_size=48", "losses.2.projector=none"),
        ("losses[2].projector: none", "48 wide", "teacher 32", "projector: linear"),
    ),
    # ---------------------------------------------------------------- distill: models
    Case(
        "teacher_path_missing",
        lambda w: D(w, "teacher_path_missing", f"teacher.path={w.root / 'no_model'}"),
        ("teacher: model folder not found", "no_model"),
    ),
    Case(
        "teacher_folder_not_a_model",
        lambda w: D(w, "teacher_folder_not_a_model", f"teacher.path={w.corpus}"),
        ("teacher:", "has no config.json", "save_pretrained"),
    ),
    Case(
        "teacher_hub_id_offline",
        lambda w: D(w, "teacher_hub_id_offline", "teacher.path=someorg/somemodel"),
        ("'someorg/somemodel' is not in the Hugging Face cache", "unset HF_HUB_OFFLINE"),
    ),
    Case(
        "student_other_tokenizer",
        lambda w: D(
            w,
            "student_other_tokenizer",
            "student.config=null",
            f"student.path={w.other_tok}",
            "losses.2.layers=[[0, 1]]",
        ),
        ("losses[0] (kl): the student's tokenizer is not the teacher's", "use span_likelihood, hybrid, span_hidden"),
    ),
    Case(
        "span_term_with_one_tokenizer",
        lambda w: D(w, "span_term_with_one_tokenizer", "losses.0={type: span_likelihood}"),
        ("losses[0] (span_likelihood): compares two tokenizations", "use kl or hidden"),
    ),
    Case(
        "student_tokenizer_on_a_copy",
        lambda w: D(
            w,
            "student_tokenizer_on_a_copy",
            "student.config=null",
            "student.from_teacher={layers: [0]}",
            f"student.tokenizer={w.other_tok}",
        ),
        ("student.tokenizer: only a student built with new weights",),
    ),
    Case(
        "peft_method_unknown",
        lambda w: D(
            w,
            "peft_method_unknown",
            "student.config=null",
            "student.from_teacher={layers: [0]}",
            "student.peft={method: lorra}",
        ),
        ("student.peft.method: 'lorra' is not one of lora, dora, rslora; did you mean 'lora'?",),
    ),  # fmt: skip
    Case(
        "peft_target_matches_nothing",
        lambda w: D(
            w,
            "peft_target_matches_nothing",
            "student.config=null",
            "student.from_teacher={layers: [0]}",
            "student.peft={target_modules: [qproj]}",
        ),
        ("student.peft.target_modules: 'qproj' matches no linear layer of the student", "q_proj"),
    ),  # fmt: skip
    Case(
        "student_tokenizer_missing",
        lambda w: D(w, "student_tokenizer_missing", f"student.tokenizer={w.root / 'no_tok'}", "losses=[{type: ce}]"),
        ("student.tokenizer: folder not found",),
    ),
    Case(
        "new_tokenizer_too_small",
        lambda w: D(w, "new_tokenizer_too_small", "student.new_tokenizer=100", "losses=[{type: ce}]"),
        ("student.new_tokenizer: 100 tokens", "use 300 or more"),
    ),
    Case(
        "new_tokenizer_with_a_token_level_term",
        lambda w: D(w, "new_tokenizer_with_a_token_level_term", "student.new_tokenizer=300"),
        ("losses[0] (kl): the student's tokenizer is not the teacher's",),
    ),
    Case(
        "new_tokenizer_for_a_classifier",
        lambda w: D(
            w, "new_tokenizer_for_a_classifier", "student.new_tokenizer=300", "losses=[{type: ce}]", config=w.clf_config
        ),
        ("student.new_tokenizer: distilling across tokenizers needs a causal LM teacher",),
    ),
    Case(
        "attention_unknown_family",
        lambda w: D(w, "attention_unknown_family", f"teacher.path={w.opt}", "losses.2={type: attention}"),
        ("model type 'opt' is not supported", "known families"),
    ),
    Case(
        "attention_layout_unknown",
        lambda w: D(w, "attention_layout_unknown", f"teacher.path={w.neox}", "losses.2={type: attention}"),
        ("GPTNeoXLayer has no 'self_attn'", "use terms that need only logits and block outputs"),
    ),
    Case(
        "relation_layout_unknown",
        lambda w: D(w, "relation_layout_unknown", f"teacher.path={w.neox}", "losses.2={type: relation}"),
        ("GPTNeoXLayer has no 'self_attn.q_proj'", "known families"),
    ),
    Case(
        "attention_term_and_empty_data",
        lambda w: D(
            w, "attention_term_and_empty_data", "losses.2={type: attention}", f"data.train={w.data / 'empty.txt'}"
        ),
        ("no text found",),
    ),
    Case(
        "seq_len_beyond_model",
        lambda w: D(w, "seq_len_beyond_model", "data.seq_len=1024"),
        ("data.seq_len 1024", "teacher's maximum of 256", "256 or less"),
    ),
    # ---------------------------------------------------------------- distill: data
    Case(
        "data_missing",
        lambda w: D(w, "data_missing", f"data.train={w.data / 'no_such' / 'train.txt'}"),
        ("data file not found", "no_such"),
    ),
    Case(
        "data_empty_file",
        lambda w: D(w, "data_empty_file", f"data.train={w.data / 'empty.txt'}"),
        ("no text found", "empty.txt"),
    ),
    Case(
        "data_empty_folder", lambda w: D(w, "data_empty_folder", f"data.train={w.data / 'empty_dir'}"), ("empty_dir",)
    ),
    Case(
        "data_binary",
        lambda w: D(w, "data_binary", f"data.train={w.data / 'binary.txt'}"),
        ("binary.txt", "not UTF-8 text"),
    ),
    Case(
        "data_nul_bytes",
        lambda w: D(w, "data_nul_bytes", f"data.train={w.data / 'nul.txt'}"),
        ("nul.txt", "NUL bytes", "binary"),
    ),
    Case(
        "data_latin1",
        lambda w: D(w, "data_latin1", f"data.train={w.data / 'latin1.txt'}"),
        ("latin1.txt", "not UTF-8 text", "convert it"),
    ),
    Case(
        "csv_without_label_column",
        lambda w: ["distill", str(w.clf_config), f"train.output_dir={w.out('csv_without_label_column')}"],
        ("nolabel.csv", "label", "data.label_field"),
    ),
    # ---------------------------------------------------------------- distill: rows the teacher labels
    Case(
        "augment_for_a_language_model",
        lambda w: D(w, "augment_for_a_language_model", "data.augment=2"),
        ("data.augment: the teacher labels these rows", "teacher.task is causal_lm"),
    ),
    Case(
        "augment_p_out_of_range",
        lambda w: D(w, "augment_p_out_of_range", "data.augment_p=1.5"),
        ("data.augment_p: 1.5 is outside (0, 1]",),
    ),
    Case(
        "augment_without_a_term_that_runs_the_teacher",
        lambda w: [
            "distill",
            str(w.clf_config),
            f"train.output_dir={w.out('augment_without_a_term_that_runs_the_teacher')}",
            "data.augment=1",
            "losses=[{type: ce}]",
        ],
        ("data.augment: the teacher labels these rows in the step", "add an output term"),
    ),
    Case(
        "unlabelled_with_a_teacher_cache",
        lambda w: [
            "distill",
            str(w.clf_config),
            f"train.output_dir={w.out('unlabelled_with_a_teacher_cache')}",
            f"data.unlabelled={w.data / 'nolabel.csv'}",
            f"teacher.cache={w.data / 'cache'}",
        ],
        ("data.unlabelled:", "teacher.cache holds its outputs on the training examples only"),
    ),
    # ---------------------------------------------------------------- distill: generated data
    Case(
        "teacher_top_k_without_a_teacher_source",
        lambda w: D(w, "teacher_top_k_without_a_teacher_source", "generation.teacher_top_k=8"),
        ("generation.teacher_top_k", "no teacher share"),
    ),
    Case(
        "generation_sources_not_summing_to_one",
        lambda w: D(w, "generation_sources_not_summing_to_one", "generation.sources={dataset: 0.5, student: 0.4}"),
        ("generation.sources", "sum to 0.9", "must sum to 1"),
    ),
    Case(
        "generation_source_unknown",
        lambda w: D(w, "generation_source_unknown", "generation.sources={studnet: 1}"),
        ("generation.sources", "'studnet' is not one of", "did you mean 'student'"),
    ),
    Case(
        "generation_prompt_as_long_as_a_block",
        lambda w: D(w, "generation_prompt_as_long_as_a_block", "generation.sources={student: 1}"),
        ("generation.prompt_tokens", "32-token prompt leaves nothing of a 32-token training block"),
    ),
    Case(
        "generation_prompts_file_missing",
        lambda w: D(
            w,
            "generation_prompts_file_missing",
            "generation.sources={student: 1}",
            f"generation.prompts={w.data / 'no_such.jsonl'}",
        ),
        ("generation.prompts: file not found", "no_such.jsonl"),
    ),
    Case(
        "generation_prompts_without_the_field",
        lambda w: D(
            w,
            "generation_prompts_without_the_field",
            "generation.sources={student: 1}",
            f"generation.prompts={w.data / 'prompts_nofield.jsonl'}",
        ),
        ("generation.prompts: row 1 has no 'prompt' text", "['text']", "generation.prompt_field"),
    ),
    Case(
        "generation_chat_template_missing",
        lambda w: D(
            w,
            "generation_chat_template_missing",
            "generation.sources={student: 1}",
            f"generation.prompts={w.data / 'prompts_chat.jsonl'}",
        ),
        ("generation.prompts: row 1 has messages", "no chat template"),
    ),
    Case(
        "generation_beyond_model_positions",
        lambda w: D(
            w,
            "generation_beyond_model_positions",
            "generation.sources={student: 1}",
            "generation.prompt_tokens=8",
            "generation.max_new_tokens=300",
        ),
        ("generation.max_new_tokens", "300 new ones", "256 positions"),
    ),
    Case(
        "generation_on_policy_from_a_teacher_cache",
        lambda w: D(
            w,
            "generation_on_policy_from_a_teacher_cache",
            "generation.sources={student: 1}",
            f"teacher.cache={w.cache}",
        ),
        ("generation.sources", "need the live teacher", "remove teacher.cache"),
    ),
    # ---------------------------------------------------------------- distill: the output folder
    Case(
        "output_dir_is_a_file",
        lambda w: ["distill", str(w.config), f"train.output_dir={w.a_file}"],
        ("train.output_dir", "is a file", "choose a folder"),
    ),
    Case(
        "output_dir_under_a_file",
        lambda w: ["distill", str(w.config), f"train.output_dir={w.a_file / 'run'}"],
        ("train.output_dir", "a_file is a file", "choose a writable folder"),
    ),
    Case(
        "output_dir_read_only",
        lambda w: ["distill", str(w.config), f"train.output_dir={w.read_only / 'run'}"],
        ("train.output_dir", "read_only is not writable", "choose a writable folder"),
        skip="running as root, chmod 0o500 does not stop writes" if os.geteuid() == 0 else "",
    ),
    Case(
        "output_dir_holds_a_run",
        lambda w: ["distill", str(w.config), f"train.output_dir={w.old_run}"],
        ("already holds a run", "--resume", "--overwrite"),
    ),
    Case(
        "resume_with_another_batch_size",
        lambda w: ["distill", str(w.config), f"train.output_dir={w.run}", "train.batch_size=2", "--resume"],
        ("--resume with a config that changes", "train.batch_size (4 -> 2)", "--overwrite"),
        needs_run=True,
    ),
    # ---------------------------------------------------------------- cache-teacher, and distill from a cache
    Case("cache_folder_unset", lambda w: ["cache-teacher", str(w.config)], ("teacher.cache: name the folder",)),
    Case(
        "cache_folder_is_a_file",
        lambda w: ["cache-teacher", str(w.config), f"teacher.cache={w.a_file}"],
        ("teacher.cache", "a_file is a file", "choose a folder"),
    ),
    Case(
        "cache_top_k_zero",
        lambda w: [
            "cache-teacher",
            str(w.config),
            f"teacher.cache={w.out('cache_top_k_zero')}",
            "teacher.cache_top_k=0",
        ],
        ("teacher.cache_top_k: must be >= 1",),
    ),
    Case(
        "cache_with_attention_term",
        lambda w: D(
            w, "cache_with_attention_term", f"teacher.cache={w.root / 'no_cache'}", "losses.2={type: attention}"
        ),
        ("losses[2]", "the attention term needs the live teacher", "remove the term or teacher.cache"),
    ),
    Case(
        "cache_missing",
        lambda w: D(w, "cache_missing", f"teacher.cache={w.root / 'no_cache'}"),
        ("no_cache holds no teacher cache", "alignkd cache-teacher CONFIG"),
    ),
    # ---------------------------------------------------------------- prune, and block selection in distill
    Case(
        "prune_student_not_from_teacher",
        lambda w: ["choose-blocks", str(w.config), f"train.output_dir={w.out('prune_student_not_from_teacher')}"],
        ("student.from_teacher: choosing blocks needs", "num_layers"),
    ),
    Case(
        "select_beside_student_config",
        lambda w: D(w, "select_beside_student_config", "student.from_teacher.select=importance"),
        ("student.from_teacher.select", "comes from student.config"),
    ),
    Case(
        "select_misspelled",
        lambda w: [
            "choose-blocks",
            str(w.config),
            "student.config=null",
            "student.from_teacher.select=importnce",
            f"train.output_dir={w.out('select_misspelled')}",
        ],
        ("did you mean 'importance'",),
    ),
    Case(
        "prune_more_blocks_than_the_teacher",
        lambda w: [
            "choose-blocks",
            str(w.config),
            "student.config=null",
            "student.from_teacher.num_layers=3",
            f"train.output_dir={w.out('prune_more_blocks_than_the_teacher')}",
        ],
        ("num_layers: must be between 1 and 2",),
    ),
    # ---------------------------------------------------------------- study
    Case(
        "study_missing",
        lambda w: ["study", str(w.data / "no_such.yaml"), "--quick", "--out", str(w.out("study_missing"))],
        ("study file not found", "no_such.yaml"),
    ),
    Case(
        "study_only_unknown",
        lambda w: ["study", str(STUDY), "--quick", "--only", "kl-evn", "--out", str(w.out("study_only_unknown"))],
        ("--only kl-evn: no such variant", "did you mean 'kl-even'"),
    ),
    Case(
        "study_out_is_a_file",
        lambda w: ["study", str(STUDY), "--quick", "--out", str(w.a_file)],
        ("--out", "a_file is a file"),
    ),
    # ---------------------------------------------------------------- finetune
    Case(
        "finetune_model_missing",
        lambda w: [
            "finetune",
            str(w.config),
            f"teacher.path={w.root / 'no_model'}",
            f"train.output_dir={w.out('finetune_model_missing')}",
        ],
        ("teacher: model folder not found", "no_model"),
    ),
    Case(
        "finetune_into_a_run",
        lambda w: ["finetune", str(w.config), f"train.output_dir={w.old_run}"],
        ("already holds a run", "--resume", "--overwrite"),
    ),
    # ---------------------------------------------------------------- eval
    Case(
        "eval_not_a_model",
        lambda w: ["eval", str(w.corpus), "--out", str(w.out("eval_not_a_model"))],
        ("has no config.json", "save_pretrained"),
    ),
    Case(
        "eval_model_missing",
        lambda w: ["eval", str(w.root / "no_model"), "--out", str(w.out("eval_model_missing"))],
        ("model folder not found", "no_model"),
    ),
    Case(
        "eval_baseline_not_name_path",
        lambda w: ["eval", str(w.teacher), "--baseline", "ce", "--out", str(w.out("eval_baseline_not_name_path"))],
        ("--baseline 'ce' is not NAME=PATH",),
    ),
    Case(
        "eval_baseline_name_taken",
        lambda w: [
            "eval",
            str(w.teacher),
            "--baseline",
            f"model={w.teacher}",
            "--out",
            str(w.out("eval_baseline_name_taken")),
        ],
        ("--baseline name 'model' is taken",),
    ),
    Case(
        "eval_window_zero",
        lambda w: ["eval", str(w.teacher), "--window", "0", "--out", str(w.out("eval_window_zero"))],
        ("window is 0",),
    ),
    Case(
        "eval_text_missing",
        lambda w: [
            "eval",
            str(w.teacher),
            "--text",
            str(w.data / "no_such.txt"),
            "--skip",
            "accuracy",
            "--out",
            str(w.out("eval_text_missing")),
        ],
        ("no_such.txt", "not found"),
    ),
    Case(
        "eval_out_is_a_file",
        lambda w: ["eval", str(w.teacher), "--out", str(w.a_file)],
        (
            "--out",
            "a_file is a file",
        ),
    ),
    Case(
        "eval_task_unknown",
        lambda w: ["eval", str(w.teacher), "--tasks", "hellaswg", "--out", str(w.out("eval_task_unknown"))],
        ("unknown lm-eval task 'hellaswg'", "close names: hellaswag", "--task-path"),
        skip="" if importlib.util.find_spec("lm_eval") else "lm-eval is not installed (pip install 'alignkd[eval]')",
    ),
    Case(
        "eval_dtype_unknown",
        lambda w: ["eval", str(w.teacher), "--dtype", "fp8"],
        ("argument --dtype", "invalid choice: 'fp8'"),
        argparse=True,
    ),
    # ---------------------------------------------------------------- report
    Case("report_not_a_run", lambda w: ["report", str(w.data / "not_a_run")], ("no metrics.jsonl", "not_a_run")),
    Case("report_missing_folder", lambda w: ["report", str(w.root / "no_run")], ("no_run", "no such folder")),
    Case(
        "report_eval_json_missing",
        lambda w: [
            "report",
            str(w.run),
            "--eval",
            str(w.data / "no_eval.json"),
            "--out",
            str(w.out("report_eval_json_missing")),
        ],
        ("no_eval.json",),
        needs_run=True,
    ),
    Case(
        "report_out_is_a_file",
        lambda w: ["report", str(w.run), "--out", str(w.a_file)],
        ("--out", "a_file is a file"),
        needs_run=True,
    ),
    Case(
        "report_baseline_not_name_dir",
        lambda w: ["report", str(w.run), "--baseline-run", "ce=", "--out", str(w.out("report_baseline_not_name_dir"))],
        ("--baseline-run expects NAME=DIR",),
        needs_run=True,
    ),
    # ---------------------------------------------------------------- export
    Case(
        "export_gguf_family_unsupported",
        lambda w: ["export", str(w.neox), "--gguf", str(w.root / "neox.gguf")],
        ("is a gpt_neox model", "GGUF export supports llama students", "distil into a llama student"),
    ),
    Case(
        "export_student_missing",
        lambda w: ["export", str(w.root / "no_student"), "--gguf", str(w.out("export_student_missing") / "s.gguf")],
        ("student folder not found", "no_student"),
    ),
    Case(
        "export_out_not_gguf",
        lambda w: ["export", str(w.teacher), "--gguf", str(w.out("export_out_not_gguf") / "student.bin")],
        ("student.bin does not end in .gguf",),
    ),
    Case(
        "export_out_folder_missing",
        lambda w: ["export", str(w.teacher), "--gguf", str(w.out("export_out_folder_missing") / "student.gguf")],
        ("export_out_folder_missing does not exist", "create it or write elsewhere"),
    ),
    Case(
        "export_gguf_flag_missing",
        lambda w: ["export", str(w.teacher)],
        ("the following arguments are required: --gguf",),
        argparse=True,
    ),
    # ---------------------------------------------------------------- assets
    Case(
        "assets_only_unknown",
        lambda w: ["assets", "--only", "weights"],
        ("argument --only", "invalid choice: 'weights'"),
        argparse=True,
    ),
    Case(
        "assets_cache_is_a_file",
        lambda w: ["assets", "--cache", str(w.a_file)],
        ("cache:", "a_file is a file", "--cache DIR"),
    ),
    # ---------------------------------------------------------------- demo
    Case(
        "demo_steps_zero",
        lambda w: ["demo", "--steps", "0", "--out", str(w.out("demo_steps_zero"))],
        ("--steps 0", "at least 1 step"),
    ),
    Case(
        "demo_minutes_negative",
        lambda w: ["demo", "--minutes", "-2", "--out", str(w.out("demo_minutes_negative"))],
        ("--minutes -2", "> 0"),
    ),
    Case(
        "demo_out_is_a_file", lambda w: ["demo", "--steps", "1", "--out", str(w.a_file)], ("--out", "a_file is a file")
    ),
    # ---------------------------------------------------------------- the command line itself
    Case("command_unknown", lambda w: ["distil", str(w.config)], ("invalid choice: 'distil'",), argparse=True),
    Case(
        "type_wrong_flag",
        lambda w: ["eval", str(w.teacher), "--window", "wide"],
        ("argument --window", "invalid int value: 'wide'"),
        argparse=True,
    ),
    Case(
        "flag_unknown",
        lambda w: ["report", str(w.run), "--fast"],
        ("unrecognized arguments: --fast",),
        argparse=True,
        needs_run=True,
    ),
]


ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "OMP_NUM_THREADS": "1",  # width-32 models: threads only add spin-waits
}

# A case in a fresh interpreter spends ~3 s of CPU importing torch and
# transformers before it fails in ~0.1 s: 57 cases took 200 s, four at a time,
# on a 2-core machine. So one interpreter imports once and forks a process per
# case, which runs ``alignkd.cli.main`` as ``python -m alignkd.cli`` would (its
# own cwd, stdout and stderr, the exit code of the process); the whole file
# then takes ~20 s there. The ``FRESH`` cases, one per command, also run in a
# new interpreter and must print the same.
FORK_SERVER = r"""
import json, os, sys, time, traceback

import alignkd.cli
# what the commands import
import alignkd.assets, alignkd.config, alignkd.demo, alignkd.engine.run, alignkd.evaluate, alignkd.report
import transformers.models.llama.modeling_llama  # the tiny models' family, imported lazily by transformers

def child(job):
    os.chdir(job["cwd"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    try:
        code = alignkd.cli.main(job["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

phases, workers = json.load(open(sys.argv[1])), int(sys.argv[2])
results = {}
for phase in phases:  # a phase starts when the one before it has finished
    pending, running = list(phase), {}
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                child(job)
            running[pid] = (job["id"], time.perf_counter(), time.time())
        pid, status = os.wait()
        name, t0, started = running.pop(pid)
        rc = os.waitstatus_to_exitcode(status)
        results[name] = {"rc": rc, "seconds": time.perf_counter() - t0, "started": started}
print(json.dumps(results))
"""
FRESH = (
    "teacher_hub_id_offline",
    "eval_not_a_model",
    "report_missing_folder",
    "assets_cache_is_a_file",
    "demo_steps_zero",
)
PREP = "_prepare_run"
BY_ID = {c.id: c for c in CASES}


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    started: float = 0.0
    """Wall-clock time (``time.time()``) the process started."""


def run_cases(w: World, jobs_dir: Path) -> dict[str, Result]:
    """Every case (and first the run that ``needs_run`` cases read) through the fork server."""
    env = {**ENV, "ALIGNKD_CACHE": str(w.cache)}

    def job(name: str, argv: list[str]) -> dict:
        return {
            "id": name,
            "argv": argv,
            "cwd": str(w.cwd),
            "stdout": str(jobs_dir / f"{name}.out"),
            "stderr": str(jobs_dir / f"{name}.err"),
        }

    prepare = job(PREP, ["distill", str(w.config), f"train.output_dir={w.run}"])
    phases = [
        [prepare] + [job(c.id, c.argv(w)) for c in CASES if not c.needs_run and not c.skip],
        [job(c.id, c.argv(w)) for c in CASES if c.needs_run and not c.skip],
    ]
    (jobs_dir / "jobs.json").write_text(json.dumps(phases))
    workers = str(min(8, max(2, os.cpu_count() or 2)))
    done = subprocess.run(
        [sys.executable, "-c", FORK_SERVER, str(jobs_dir / "jobs.json"), workers],
        cwd=w.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        name: Result(
            r["rc"],
            (jobs_dir / f"{name}.out").read_text(),
            (jobs_dir / f"{name}.err").read_text(),
            r["seconds"],
            r["started"],
        )
        for name, r in json.loads(done.stdout.splitlines()[-1]).items()
    }


def run_fresh(w: World, case: Case) -> Result:
    """``python -m alignkd.cli ...`` in a new interpreter, as a user runs it."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "alignkd.cli", *case.argv(w)],
        cwd=w.cwd,
        env={**ENV, "ALIGNKD_CACHE": str(w.cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: relative path -> (size, mtime_ns)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in root.rglob("*")
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    w = build_world(tmp_path_factory.mktemp("bad_input"))
    yield w
    w.read_only.chmod(0o700)  # so that pytest can remove it


@pytest.fixture(scope="module")
def results(world, tmp_path_factory):
    """Every case through the fork server, the ``FRESH`` ones in new interpreters beside it, and the snapshots."""
    w = world
    before = snapshot(w.root)
    with ThreadPoolExecutor(max_workers=len(FRESH) + 1) as pool:
        forked = pool.submit(run_cases, w, tmp_path_factory.mktemp("bad_input_jobs"))
        fresh = {name: pool.submit(run_fresh, w, BY_ID[name]) for name in FRESH}
        done = forked.result()
        fresh = {name: f.result() for name, f in fresh.items()}
    prep = done.pop(PREP)
    assert prep.rc == 0, f"the run that cases resume and report on failed:\n{prep.stderr[-3000:]}"
    return done, fresh, before, snapshot(w.root)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, world, results):
    if case.skip:
        pytest.skip(case.skip)
    done, *_ = results
    r = done[case.id]
    assert r.rc == 2, f"exit {r.rc}; stderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r.stderr[-3000:]}"
    command = "alignkd" if case.id == "command_unknown" else f"alignkd {case.argv(world)[0]}"
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    for fragment in case.expect:
        assert fragment in lines[0], f"{fragment!r} not in: {lines[0]}"
    if case.argparse:
        assert lines[0].endswith(f"; see {command} --help"), lines[0]
    assert r.stdout == "", r.stdout
    assert not world.out(case.id).exists(), f"{world.out(case.id)} was created"
    if case.id == "teacher_hub_id_offline":
        assert r.seconds < HUB_TIMEOUT_S, f"an uncached hub id took {r.seconds:.1f}s to fail"


@pytest.mark.slow
@pytest.mark.parametrize("name", FRESH)
def test_a_fresh_interpreter_prints_the_same(name, results):
    done, fresh, *_ = results
    assert (fresh[name].rc, fresh[name].stderr, fresh[name].stdout) == (
        done[name].rc,
        done[name].stderr,
        done[name].stdout,
    )


@pytest.mark.slow
def test_bad_input_changed_no_file(world, results):
    """No case created, changed or removed a file or folder of the shared fixtures."""
    *_, before, after = results
    after = {k: v for k, v in after.items() if k != "run" and not k.startswith("run/")}  # the prepared run
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not created and not removed and not changed, f"created {created}, removed {removed}, changed {changed}"


@pytest.mark.slow
def test_the_finished_run_is_left_as_it_was(world, results):
    """The cases that read the prepared run (resume, report) started after its last write and changed nothing."""
    done, *_ = results
    first = min(done[c.id].started for c in CASES if c.needs_run and not c.skip)
    written = max(p.stat().st_mtime for p in [world.run, *world.run.rglob("*")])
    assert written < first, "a case wrote into the finished run"


def test_the_table_covers_every_command(world):
    from alignkd.cli import COMMANDS

    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
    assert {c.argv(world)[0] for c in CASES} >= set(COMMANDS)


def test_the_docs_list_every_case():
    text = BAD_INPUT_PAGE.read_text()
    missing = [c.id for c in CASES if f"| `{c.id}`" not in text]
    assert not missing, f"add these cases to the table in docs/bad-input.md: {missing}"
