"""Tests of alignkd.config and the CLI around it: shipped configs, field docs, errors, overrides.

A config error must name the field and the fix in one line; every name the
config accepts must resolve to code (terms, metrics, weighting strategies).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import alignkd
from alignkd import cli
from alignkd.align.weighting import GradNorm, Uncertainty, Weighting, build_weighting
from alignkd.config import (
    Config,
    ConfigError,
    DataConfig,
    FromTeacherConfig,
    GenerationConfig,
    ModelConfig,
    PeftSettings,
    ScheduleConfig,
    StudentConfig,
    TrainConfig,
    WeightingConfig,
    field_docs,
    load_config,
)
from alignkd.losses import KL_KINDS
from alignkd.terms import HIDDEN_METRICS, TERM_TYPES, TermConfig
from alignkd.terms.base import Layered, Tempered

ROOT = Path(__file__).resolve().parents[1]
# alignkd run configs: configs/*.yaml and the recipes. configs/accelerate/ holds `accelerate launch` configs.
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))

# Depths of the models the shipped configs name (checked against their model cards),
# so explicit layer indices in those configs can be checked without downloading them.
TEACHER_BLOCKS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": 30,
    "textattack/bert-base-uncased-SST-2": 12,
    "meta-llama/Llama-2-7b-hf": 32,
}
STUDENT_BLOCKS = {"TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": 22}


def minimal(**extra) -> dict:
    """The smallest valid config as a raw dict; ``extra`` replaces top-level sections."""
    data = {
        "teacher": {"path": "teacher"},
        "student": {"from_teacher": {"num_layers": 2}},
        "data": {"train": "train.txt"},
        "losses": [{"type": "kl"}],
    }
    data.update(extra)
    return data


def config_error(data: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(data=data, overrides=list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, f"config errors are one line, got {msg!r}"
    return msg


def losses_of(*terms: dict) -> list[TermConfig]:
    return load_config(data=minimal(losses=list(terms))).losses


# ---------------------------------------------------------------- shipped configs


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 3, f"expected the shipped configs under {ROOT / 'configs'}"


def _student_depth(cfg: Config, teacher_blocks: int) -> int:
    s = cfg.student
    if s.from_teacher is not None:
        if s.from_teacher.layers is not None:
            return len(s.from_teacher.layers)
        return s.from_teacher.num_layers or max(1, teacher_blocks // 4)
    if s.config is not None:
        return s.config.get("num_hidden_layers", teacher_blocks)
    assert s.path in STUDENT_BLOCKS, f"add the depth of {s.path} to STUDENT_BLOCKS"
    return STUDENT_BLOCKS[s.path]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses_and_is_sensible(path):
    cfg = load_config(path)
    assert cfg.teacher.path
    assert cfg.teacher.path in TEACHER_BLOCKS, f"{path.name}: add the depth of {cfg.teacher.path} to TEACHER_BLOCKS"
    lt = TEACHER_BLOCKS[cfg.teacher.path]
    chosen = [k for k in ("path", "from_teacher", "config") if getattr(cfg.student, k) is not None]
    assert len(chosen) == 1
    if cfg.student.from_teacher is not None and cfg.student.from_teacher.layers is not None:
        kept = cfg.student.from_teacher.layers
        assert all(0 <= i < lt for i in kept) and len(set(kept)) == len(kept) and kept == sorted(kept)
    ls = _student_depth(cfg, lt)
    assert 1 <= ls <= lt
    assert cfg.losses, "a config needs at least one loss term"
    names = [loss.name for loss in cfg.losses]
    assert len(set(names)) == len(names)
    for loss in cfg.losses:
        assert isinstance(loss, TERM_TYPES[loss.type].config) and loss.weight >= 0
        if isinstance(getattr(loss, "layers", None), list):
            for s, t in loss.layers:
                assert -ls <= s < ls and -lt <= t < lt, (
                    f"{path.name}: {loss.name} pair {[s, t]} does not fit {ls} / {lt} blocks"
                )
        if loss.type in ("dkd", "ce") and cfg.teacher.task == "sequence_classification":
            assert cfg.data.label_field
    assert any(loss.weight > 0 for loss in cfg.losses)
    assert cfg.train.steps >= 1 and cfg.train.lr > 0 and cfg.train.output_dir


def test_recipes_and_accelerate_configs_are_shipped():
    assert any(p.parent.name == "recipes" for p in CONFIGS) and ACCELERATE_CONFIGS


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_shipped_accelerate_config_loads_and_launches_several_processes(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))
    # A MULTI_CPU config starts one process unless under mpirun; alignkd turns a MULTI_GPU
    # launch on CPUs into a gloo group.
    want = {"fsdp.yaml": DistributedType.FSDP, "deepspeed.yaml": DistributedType.DEEPSPEED}.get(
        path.name, DistributedType.MULTI_GPU
    )
    assert cfg.distributed_type == want and cfg.num_processes > 1
    assert cfg.mixed_precision == "no"  # alignkd passes train.mixed_precision itself
    assert f"--config_file configs/accelerate/{path.name}" in path.read_text()


# ---------------------------------------------------------------- field docs

DATACLASSES = [
    Config,
    ModelConfig,
    FromTeacherConfig,
    PeftSettings,
    StudentConfig,
    DataConfig,
    ScheduleConfig,
    WeightingConfig,
    GenerationConfig,
    TrainConfig,
] + [t.config for t in TERM_TYPES.values()]


@pytest.mark.parametrize("cls", DATACLASSES, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [f for f in fields if not docs.get(f, "").strip()]
    assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"
    assert set(docs) == set(fields)


def test_field_docs_reads_the_string_below_each_field():
    assert field_docs(TrainConfig)["steps"] == "Optimizer steps (the most, when ``max_minutes`` is set)."
    assert "forward" in field_docs(TERM_TYPES["kl"].config)["kind"]
    # A type's own docstring wins over its base's: dkd's alpha is not kl's.
    assert (
        "target" in field_docs(TERM_TYPES["dkd"].config)["alpha"]
        and "skew" in field_docs(TERM_TYPES["kl"].config)["alpha"]
    )


def test_nested_dataclasses_are_all_listed():
    # A new nested section must get its own docstring test.
    def nested(tp):
        if tp is TermConfig:  # a loss term is the config of its type
            yield from (t.config for t in TERM_TYPES.values())
        elif dataclasses.is_dataclass(tp):
            yield tp
        for arg in typing.get_args(tp):
            yield from nested(arg)

    found, todo = set(), [Config]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(t for hint in typing.get_type_hints(cls).values() for t in nested(hint) if t not in found)
    assert found == set(DATACLASSES)


# ---------------------------------------------------------------- errors


def test_minimal_config_loads():
    cfg = load_config(data=minimal())
    assert cfg.teacher.path == "teacher" and cfg.student.from_teacher.num_layers == 2
    assert cfg.losses[0].type == "kl" and cfg.losses[0].name == "kl"


def test_unknown_key_names_the_path_and_suggests():
    msg = config_error(minimal(train={"stpes": 5}))
    assert "train.stpes" in msg and "did you mean 'steps'" in msg
    msg = config_error(minimal(losses=[{"type": "kl", "temprature": 2.0}]))
    assert "losses[0].temprature" in msg and "did you mean 'temperature'" in msg
    msg = config_error({**minimal(), "teachr": {"path": "x"}})
    assert "teachr" in msg and "did you mean 'teacher'" in msg


def test_unknown_key_deep_in_a_nested_section():
    msg = config_error(minimal(student={"from_teacher": {"num_layer": 2}}))
    assert "student.from_teacher.num_layer" in msg and "did you mean 'num_layers'" in msg


@pytest.mark.parametrize(
    ("section", "where", "expect"),
    [
        ({"train": {"steps": "five"}}, "train.steps", "integer"),
        ({"train": {"steps": True}}, "train.steps", "integer"),
        ({"train": {"lr": "fast"}}, "train.lr", "number"),
        ({"train": {"progress": "yes"}}, "train.progress", "true or false"),
        ({"data": {"train": "t", "seq_len": 2.5}}, "data.seq_len", "integer"),
        ({"teacher": {"path": 3}}, "teacher.path", "string"),
        ({"losses": {"type": "kl"}}, "losses", "list"),
        ({"student": {"config": [1, 2]}}, "student.config", "mapping"),
    ],
)
def test_wrong_types_name_the_field(section, where, expect):
    msg = config_error(minimal(**section))
    assert msg.startswith(where) and expect in msg


def test_float_fields_accept_yaml_exponent_strings():
    # YAML 1.1 reads 3e-4 (no dot) as a string.
    assert yaml.safe_load("lr: 3e-4")["lr"] == "3e-4"
    cfg = load_config(data=minimal(train={"lr": "3e-4", "steps": 10.0}))
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 10 and isinstance(cfg.train.steps, int)


@pytest.mark.parametrize(
    ("data", "where", "near"),
    [
        (minimal(teacher={"path": "t", "dtype": "bfloat"}), "teacher.dtype", "bfloat16"),
        (minimal(teacher={"path": "t", "task": "causal"}), "teacher.task", "causal_lm"),
        (minimal(teacher={"path": "t", "placement": "sharded"}), "teacher.placement", "shard"),
        (minimal(losses=[{"type": "kl", "kind": "revers"}]), "losses[0].kind", "reverse"),
        (minimal(losses=[{"type": "hiden"}]), "losses[0].type", "hidden"),
        (minimal(losses=[{"type": "hidden", "metric": "cosin"}]), "losses[0].metric", "cosine"),
        (minimal(losses=[{"type": "hidden", "projector": "linear_nrm"}]), "losses[0].projector", "linear_norm"),
        (minimal(losses=[{"type": "hidden", "layers": "lats"}]), "losses[0].layers", "last"),
        (minimal(weighting={"strategy": "gradnrom"}), "weighting.strategy", "gradnorm"),
        (minimal(train={"mixed_precision": "bf61"}), "train.mixed_precision", "bf16"),
        (
            minimal(losses=[{"type": "kl", "weight_schedule": {"kind": "cosin"}}]),
            "losses[0].weight_schedule.kind",
            "cosine",
        ),
    ],
)
def test_bad_enum_values_suggest_the_closest(data, where, near):
    msg = config_error(data)
    assert msg.startswith(where), msg
    assert f"did you mean '{near}'" in msg


@pytest.mark.parametrize(
    ("term", "field"),
    [
        ({"type": "hidden", "kind": "reverse"}, "kind"),
        ({"type": "ce", "temperature": 2.0}, "temperature"),
        ({"type": "kl", "metric": "mse"}, "metric"),
        ({"type": "attention", "projector": "linear"}, "projector"),
        ({"type": "dkd", "layers": "last"}, "layers"),
    ],
)
def test_fields_that_do_not_apply_to_a_loss_type_are_rejected(term, field):
    msg = config_error(minimal(losses=[{"type": "kl"}, term]))
    assert msg.startswith("losses[1]") and field in msg and f"type '{term['type']}'" in msg


def test_per_type_defaults_are_filled():
    kl, dkd, con, rel, hid, att, blk, ce = losses_of(
        {"type": "kl"},
        {"type": "dkd"},
        {"type": "contrastive"},
        {"type": "relation"},
        {"type": "hidden"},
        {"type": "attention"},
        {"type": "blockwise"},
        {"type": "ce"},
    )
    assert (kl.temperature, kl.beta, kl.alpha) == (1.0, 0.5, 0.1)
    assert (dkd.temperature, dkd.beta, dkd.alpha) == (4.0, 8.0, 1.0)
    assert con.temperature == 0.1 and con.layers == "last"
    assert rel.temperature == 1.0 and rel.layers == "last" and rel.of == ["q", "k", "v"]
    assert hid.layers == "auto" and hid.metric == "mse"
    assert att.layers == "last"
    assert blk.layers == "auto" and blk.temperature == 1.0
    assert not hasattr(ce, "temperature") and not hasattr(ce, "layers")


def test_explicit_values_win_over_defaults():
    (dkd, rel) = losses_of({"type": "dkd", "temperature": 2.0, "beta": 1.0}, {"type": "relation", "layers": [[0, 1]]})
    assert dkd.temperature == 2.0 and dkd.beta == 1.0 and dkd.alpha == 1.0
    assert rel.layers == [[0, 1]]


def test_repeated_types_get_suffixed_names():
    names = [loss.name for loss in losses_of({"type": "kl"}, {"type": "ce"}, {"type": "kl"}, {"type": "kl"})]
    assert names == ["kl", "ce", "kl_2", "kl_3"]


def test_explicit_duplicate_names_are_rejected():
    msg = config_error(minimal(losses=[{"type": "kl", "name": "a"}, {"type": "hidden", "name": "a"}]))
    assert "losses[1].name" in msg and "unique" in msg


@pytest.mark.parametrize(
    "terms",
    [
        [{"type": "kl"}, {"type": "kl"}, {"type": "kl", "name": "kl_2"}],
        [{"type": "kl", "name": "kl_2"}, {"type": "kl"}, {"type": "kl"}],
    ],
    ids=["explicit-after-auto", "explicit-before-auto"],
)
def test_names_stay_unique_when_an_explicit_name_equals_a_generated_one(terms):
    # Either reject the clash or pick another suffix; two terms with one name
    # would share one metric key and one weight.
    try:
        names = [loss.name for loss in losses_of(*terms)]
    except ConfigError as e:
        assert "name" in str(e)
        return
    assert len(set(names)) == len(names), f"duplicate term names {names}"


@pytest.mark.parametrize(
    ("student", "expect"),
    [
        ({}, "exactly one"),
        ({"path": "s", "config": {"hidden_size": 8}}, "got path, config"),
        ({"path": "s", "from_teacher": {"num_layers": 1}, "config": {}}, "got path, from_teacher, config"),
    ],
)
def test_student_needs_exactly_one_source(student, expect):
    msg = config_error(minimal(student=student))
    assert msg.startswith("student") and expect in msg


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (minimal(teacher={}), "teacher.path"),
        (minimal(data={"train": ""}), "data.train"),
        (minimal(losses=[]), "losses"),
        (minimal(losses=[{"type": "kl", "weight": -1}]), "losses[0].weight"),
        (minimal(losses=[{"type": "kl", "temperature": 0}]), "losses[0].temperature"),
        (minimal(losses=[{"type": "kl", "kind": "jsd", "beta": 1.0}]), "losses[0].beta"),
        (minimal(train={"steps": 0}), "train.steps"),
        (minimal(train={"lr": 0}), "train.lr"),
        (minimal(weighting={"every": 0}), "weighting.every"),
        (minimal(data={"train": "t", "seq_len": 1}), "data.seq_len"),
    ],
)
def test_bad_values_name_the_field(data, where):
    assert config_error(data).startswith(where)


@pytest.mark.parametrize(
    ("term", "where"),
    [
        ({"type": "relation", "num_relation_heads": 0}, "losses[0].num_relation_heads"),
        ({"type": "relation", "num_relation_heads": -2}, "losses[0].num_relation_heads"),
        ({"type": "contrastive", "max_tokens": 0}, "losses[0].max_tokens"),
        (
            {"type": "kl", "temperature_schedule": {"kind": "linear", "start": 2.0, "end": 0.0}},
            "losses[0].temperature_schedule",
        ),
        (
            {"type": "dkd", "temperature_schedule": {"kind": "cosine", "start": -1.0, "end": 1.0}},
            "losses[0].temperature_schedule",
        ),
        ({"type": "kl", "temperature_schedule": {"kind": "warmup", "start": 2.0}}, "losses[0].temperature_schedule"),
    ],
    ids=[
        "relation-heads-0",
        "relation-heads-negative",
        "max-tokens-0",
        "temperature-to-0",
        "temperature-from-negative",
        "temperature-warmup-from-0",
    ],
)
def test_values_the_losses_cannot_take_are_rejected_up_front(term, where):
    # Each of these passes validation today and then fails inside the run
    # (ZeroDivisionError in the plan, ValueError from the loss at the step the
    # temperature reaches 0, or a silent negative head count).
    assert config_error(minimal(losses=[term])).startswith(where)


# ---------------------------------------------------------------- overrides


def test_dotted_overrides():
    cfg = load_config(
        data=minimal(losses=[{"type": "kl"}, {"type": "ce"}]),
        overrides=["train.steps=5", "losses.0.weight=2", "losses.-1.weight=0.25", "train.lr=3e-4", "data.eval="],
    )
    assert cfg.train.steps == 5
    assert cfg.losses[0].weight == 2.0 and cfg.losses[1].weight == 0.25
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.eval is None


def test_override_creates_missing_nested_sections():
    data = minimal()
    assert "weighting" not in data
    cfg = load_config(
        data=data,
        overrides=[
            "weighting.strategy=gradnorm",
            "losses.0.weight_schedule.kind=linear",
            "losses.0.weight_schedule.end=0.5",
        ],
    )
    assert cfg.weighting.strategy == "gradnorm"
    assert cfg.losses[0].weight_schedule == ScheduleConfig(kind="linear", start=1.0, end=0.5, steps=None)


def test_override_values_are_yaml():
    cfg = load_config(data=minimal(), overrides=["student.from_teacher={layers: [0, 3]}", "losses.0.kind=reverse"])
    assert cfg.student.from_teacher.layers == [0, 3] and cfg.student.from_teacher.num_layers is None
    assert cfg.losses[0].kind == "reverse"


def test_override_of_an_unknown_key_is_a_config_error():
    msg = config_error(minimal(), ["train.stpes=5"])
    assert "train.stpes" in msg and "did you mean 'steps'" in msg


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("losses.3.weight=1", "losses.3"),
        ("losses.-2.weight=1", "losses.-2"),
        ("losses.x.weight=1", "losses.x"),
        ("losses.5=1", "losses.5"),
    ],
)
def test_override_with_a_bad_list_index(override, expect):
    msg = config_error(minimal(), [override])
    assert expect in msg and "index" in msg and "1 items" in msg


def test_override_without_equals_sign():
    assert "key.sub=value" in config_error(minimal(), ["train.steps"])


@pytest.mark.parametrize("override", ["train.steps.a=1", "train.steps.a.b=1", "losses.0.type.x.y=1"])
def test_override_through_a_scalar_is_a_config_error(override):
    # Going below a value that is not a mapping must say so, not crash with AttributeError.
    config_error(minimal(train={"steps": 5}), [override])


# ---------------------------------------------------------------- layer pairs


@pytest.mark.parametrize(
    "layers",
    [[[0, 1, 2]], [0, 1], [], [[0, "a"]], [[0.5, 1]], "first", [[0, 1], [2]], {"0": 1}],
    ids=["triple", "flat", "empty", "string-index", "float-index", "unknown-word", "ragged", "mapping"],
)
def test_explicit_layer_pairs_are_checked_in_shape(layers):
    msg = config_error(minimal(losses=[{"type": "hidden", "layers": layers}]))
    assert msg.startswith("losses[0].layers")


def test_explicit_layer_pairs_accepted():
    (hid,) = losses_of({"type": "hidden", "layers": [[0, 3], [-1, -1]]})
    assert hid.layers == [[0, 3], [-1, -1]]


@pytest.mark.parametrize("kind", ["attention", "relation", "contrastive", "blockwise"])
def test_adaptive_is_only_for_hidden(kind):
    msg = config_error(minimal(losses=[{"type": kind, "layers": "adaptive"}]))
    assert msg.startswith("losses[0].layers") and "hidden" in msg
    assert losses_of({"type": "hidden", "layers": "adaptive"})[0].layers == "adaptive"


# ---------------------------------------------------------------- names resolve to code


@pytest.mark.parametrize("name", sorted(TERM_TYPES))
def test_every_term_type_is_complete(name):
    kind = TERM_TYPES[name]
    assert callable(kind.compute), name
    assert issubclass(kind.config, TermConfig) and kind.config().type == name  # the map key is the type's own
    assert kind.matches, f"{name}: the docs' loss table needs what it matches"
    # Captures and projectors only for terms that map layers; a projector needs a projector field.
    assert (kind.needs is not None) == kind.layered, name
    assert kind.projected == ("projector" in kind.fields()), name
    if kind.tempered:
        assert kind.config().temperature > 0
    assert issubclass(kind.config, Layered) == ("layers" in kind.fields())
    assert issubclass(kind.config, Tempered) == ("temperature_schedule" in kind.fields())


@pytest.mark.parametrize("loss_type", sorted(TERM_TYPES))
def test_every_loss_type_loads(loss_type):
    (loss,) = losses_of({"type": loss_type})
    assert loss.type == loss_type and loss.name == loss_type


def test_hidden_metrics_resolve():
    import torch

    assert set(HIDDEN_METRICS) == {"mse", "cosine", "standardized"}
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for name, fn in HIDDEN_METRICS.items():
        assert callable(fn)
        assert losses_of({"type": "hidden", "metric": name})[0].metric == name
        assert fn(a, a, mask).abs().item() < 1e-5, name
        assert fn(a, b, mask).item() > 1e-3, name


@pytest.mark.parametrize("kind", KL_KINDS)
def test_every_kl_kind_loads(kind):
    assert losses_of({"type": "kl", "kind": kind})[0].kind == kind


@pytest.mark.parametrize(
    ("strategy", "cls"), [("static", Weighting), ("gradnorm", GradNorm), ("uncertainty", Uncertainty)]
)
def test_every_weighting_strategy_builds(strategy, cls):
    cfg = load_config(
        data=minimal(weighting={"strategy": strategy}, losses=[{"type": "kl"}, {"type": "ce", "weight": 0.5}])
    )
    w = build_weighting(
        cfg.weighting.strategy,
        [loss.name for loss in cfg.losses],
        [loss.weight for loss in cfg.losses],
        alpha=cfg.weighting.alpha,
        lr=cfg.weighting.lr,
    )
    assert type(w) is cls
    assert w.weights().shape == (2,) and (w.weights() > 0).all()


# ---------------------------------------------------------------- CLI


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            minimal(
                losses=[
                    {"type": "kl", "temperature": 2.0},
                    {"type": "ce", "weight": 0.5},
                    {"type": "hidden", "layers": [[0, 1]]},
                ]
            )
        )
    )
    return path


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"alignkd {alignkd.__version__}"


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: alignkd" in out and "distill" in out


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "distill" in capsys.readouterr().out


def test_cli_distill_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "--print-config" in out and "--resume" in out and "key.sub=value" in out


def test_cli_print_config_round_trips(config_file, capsys):
    assert cli.main(["distill", str(config_file), "train.steps=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed["train"]["steps"] == 7
    expected = load_config(config_file, ["train.steps=7"])
    assert load_config(data=printed) == expected


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_print_config_of_shipped_configs_round_trips(path, capsys):
    assert cli.main(["distill", str(path), "--print-config"]) == 0
    assert load_config(data=yaml.safe_load(capsys.readouterr().out)) == load_config(path)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["train.stpes=5"], "did you mean 'steps'"),
        (["losses.9.weight=1"], "losses.9"),
        (["weighting.strategy=gradnrom"], "did you mean 'gradnorm'"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(config_file, capsys, args, expect):
    assert cli.main(["distill", str(config_file), *args, "--print-config"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("alignkd distill: error:") and expect in lines[0]
    assert captured.out == ""


def test_cli_flags_may_come_before_the_overrides(config_file, capsys):
    # `alignkd distill run.yaml --resume train.steps=600` is the natural way to
    # extend a run; argparse's plain parse_args rejects positionals after a flag.
    assert cli.main(["distill", str(config_file), "--print-config", "train.steps=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["steps"] == 7


def test_cli_missing_config_file(tmp_path, capsys):
    assert cli.main(["distill", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]


def test_cli_invalid_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    assert cli.main(["distill", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid YAML" in err[0]


@pytest.mark.slow
def test_installed_console_script_version():
    exe = Path(sys.executable).with_name("alignkd")
    assert exe.exists(), f"console script not installed next to {sys.executable}"
    done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"alignkd {alignkd.__version__}"


def test_paths_with_a_leading_tilde_are_expanded(tmp_path):
    import os

    from alignkd.config import load_config

    cfg = load_config(
        data={
            "teacher": {"path": "~/t"},
            "student": {"from_teacher": {}},
            "data": {"train": "~/d"},
            "losses": [{"type": "kl"}],
        },
        overrides=["train.output_dir=~/runs/x"],
    )
    home = os.path.expanduser("~")
    assert (
        cfg.teacher.path == f"{home}/t" and cfg.data.train == f"{home}/d" and cfg.train.output_dir == f"{home}/runs/x"
    )


def _docs_hooks():
    """``docs/hooks.py``, the mkdocs hook that generates the configuration reference at build time."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("alignkd_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataclass_keys(cls, prefix: str, seen: set):
    """(dotted key, docstring) of every field of ``cls`` and of the dataclasses nested in it; a dataclass in
    ``seen`` (listed under an earlier key, which the reference links to) is not walked again."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        yield key, docs[f.name]
        nested = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
        for inner in nested:
            if inner not in seen:
                seen.add(inner)
                yield from _dataclass_keys(inner, key, seen)


def test_the_generated_configuration_reference_lists_every_section_field_and_term():
    hooks = _docs_hooks()
    page = hooks.on_page_markdown(
        (ROOT / "docs" / "configuration.md").read_text(),
        SimpleNamespace(file=SimpleNamespace(src_uri="configuration.md")),
        config=None,
        files=None,
    )
    assert "<!-- alignkd:" not in page, "a placeholder was left in the page"
    rows = {
        line.split("|")[1].strip(): line.replace("\\|", "|") for line in page.splitlines() if line.startswith("| `")
    }

    def listed(key: str, doc: str) -> None:
        assert f"`{key}`" in rows, f"the configuration reference lacks {key}"
        assert doc in rows[f"`{key}`"], f"{key}: its row lacks the field's docstring"

    hints = typing.get_type_hints(Config)
    seen: set = set()
    for f in dataclasses.fields(Config):
        assert f"{{#{f.name}}}" in page, f"no section for {f.name}"
        hint = hints[f.name]
        if typing.get_origin(hint) is list:  # the loss terms: common fields, then each type's own
            for key, doc in _dataclass_keys(TermConfig, f"{f.name}[i]", seen):
                listed(key, doc)
            continue
        for key, doc in _dataclass_keys(hint, f.name, seen):
            listed(key, doc)
    common = {f.name for f in dataclasses.fields(TermConfig)}
    for name, kind in TERM_TYPES.items():
        start = page.index(f"{{#term-{name}}}")
        section = page[start : page.find("\n### Term type", start + 1)]
        assert kind.matches in section, name
        docs = field_docs(kind.config)
        for f in dataclasses.fields(kind.config):
            if f.name not in common:
                assert f"| `losses[i].{f.name}` |" in section, f"the reference's {name} section lacks {f.name}"
                assert docs[f.name] in section.replace("\\|", "|"), f"{name}.{f.name}: no docstring in the reference"


def test_the_generated_loss_table_lists_every_term_type():
    table = _docs_hooks().loss_terms_table()
    for name, kind in TERM_TYPES.items():
        row = next((line for line in table.splitlines() if f"[`{name}`]" in line), "")
        assert kind.matches in row, f"the loss table lacks {name}"
        for f in dataclasses.fields(kind.config):
            if f.name not in {g.name for g in dataclasses.fields(TermConfig)} | {"temperature_schedule"}:
                assert f"`{f.name}`" in row, f"{name}: the loss table lacks {f.name}"
    assert "<!-- alignkd:loss-terms -->" in (ROOT / "docs" / "losses.md").read_text()


def test_a_config_built_in_python_is_validated_and_named():
    from alignkd.terms.features import HiddenConfig
    from alignkd.terms.outputs import KLConfig

    cfg = Config(
        teacher=ModelConfig(path="t"),
        student=StudentConfig(from_teacher=FromTeacherConfig(num_layers=1)),
        data=DataConfig(train="x.txt"),
        losses=[KLConfig(), KLConfig(temperature=2.0), HiddenConfig()],
    )
    assert [loss.name for loss in cfg.losses] == ["kl", "kl_2", "hidden"]
    assert cfg.losses[0].temperature == 1.0 and cfg.losses[2].layers == "auto"
    with pytest.raises(ConfigError, match=r"^losses\[0\]\.temperature: must be > 0"):
        Config(
            teacher=ModelConfig(path="t"),
            student=StudentConfig(from_teacher=FromTeacherConfig(num_layers=1)),
            data=DataConfig(train="x.txt"),
            losses=[KLConfig(temperature=0.0)],
        )
    with pytest.raises(ConfigError, match="^teacher.path: required"):
        Config(losses=[KLConfig()])
    # Changed after it was built: distill() checks it again before touching anything.
    cfg.train.steps = 0
    with pytest.raises(ConfigError, match="^train.steps: must be >= 1"):
        alignkd.distill(cfg)
