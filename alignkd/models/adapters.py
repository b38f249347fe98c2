"""PEFT students: low-rank adapters injected into the student (``student.peft``), their fused head, their export.

The adapters are put into the student in place (``peft.get_peft_model`` wraps the
model, and alignkd keeps training the model inside the wrapper): module paths stay
those of the family, so captures, block maps and heads find what they always find;
only the adapted ``nn.Linear`` layers become peft's ``lora.Linear`` (base layer plus
``lora_A`` / ``lora_B``). The base weights are frozen; the optimizer sees the adapters.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from alignkd.errors import ConfigError, ModelError

PEFT_METHODS = {
    "lora": {},
    "dora": {"use_dora": True},  # weight-decomposed LoRA: a learned magnitude per output row
    "rslora": {"use_rslora": True},  # LoRA scaled by alpha / sqrt(r) instead of alpha / r
}
"""Values of ``student.peft.method``: each is a ``peft.LoraConfig`` with these settings."""

ADAPTER = "default"
"""peft's name for the one adapter a student carries."""

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the model's ``nn.Linear`` layers (what ``target_modules`` may name)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _matches(target: str, names: list[str]) -> bool:
    """peft's rule for a list of targets: a full name, or a name ending in ``.target`` (no regex); ``all-linear``
    matches when there is a linear layer."""
    if target == "all-linear":
        return bool(names)
    return any(n == target or n.endswith("." + target) for n in names)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Refuse ``target_modules`` entries that adapt nothing, naming the layers there are."""
    names = linear_names(model)
    missing = [t for t in targets if not _matches(t, names)]
    if missing:
        leaves = sorted({n.rpartition(".")[2] for n in names})
        raise ConfigError(
            f"student.peft.target_modules: {', '.join(map(repr, missing))} "
            f"{'matches' if len(missing) == 1 else 'match'} no linear layer of the student; "
            f"its linear layers are named {', '.join(leaves)} (or use all-linear)"
        )


def add_adapters(student: nn.Module, peft_cfg) -> nn.Module:
    """Inject ``peft_cfg``'s adapters into ``student`` (in place) and freeze everything else; returns the student.

    ``peft_cfg``: a ``PeftSettings`` (method, r, alpha, dropout, target_modules).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("student.peft: needs the peft package; pip install peft") from None
    targets = list(peft_cfg.target_modules)
    check_targets(student, targets)
    lora = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=_peft_targets(student, targets),
        task_type="CAUSAL_LM",
        **PEFT_METHODS[peft_cfg.method],
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
        warnings.simplefilter("ignore", FutureWarning)
        # A tied head with an adapter: alignkd unties it where it must (plain_copy, merge_adapter_folder).
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*", category=UserWarning)
        wrapped = get_peft_model(student, lora)  # freezes the base, leaves the adapters trainable
    inner = wrapped.base_model.model
    assert inner is student  # the wrapper is not kept: the student itself carries the adapters
    return student


def _peft_targets(student: nn.Module, targets: list[str]) -> str | list[str]:
    """``target_modules`` as peft takes them. peft knows ``all-linear`` only as the whole setting, so beside other
    names (``[all-linear, lm_head]``) it is spelled out: every linear layer but the output head."""
    if "all-linear" not in targets:
        return targets
    if targets == ["all-linear"]:
        return "all-linear"
    head = student.get_output_embeddings()
    body = [n for n, m in student.named_modules() if isinstance(m, nn.Linear) and m is not head]
    return [*body, *(t for t in targets if t != "all-linear")]


def has_adapters(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and any(_is_lora(m) for m in model.modules())


def adapter_count(model: nn.Module) -> int:
    """Values in the model's adapters (0 without)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


def untied_head_count(model: nn.Module) -> int:
    """Values the merged model adds by untying its head (see ``plain_copy``): the head's, when a tied head carries an
    adapter; else 0."""
    head = model.get_output_embeddings()
    return head.base_layer.weight.numel() if head is not None and _is_lora(head) and _tied(model) else 0


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def lora_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(A [r, in], B [out, r], scaling)`` of a plain LoRA layer, whose output is ``base(x) + scaling * x A^T
    B^T``; None when it is not that (DoRA's magnitude, dropout on the input while training, several or no
    active adapters)."""
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or getattr(module, "merged", False):
        return None
    a = active[0]
    if module.use_dora.get(a, False):
        return None
    drop = module.lora_dropout[a]
    if module.training and isinstance(drop, nn.Dropout) and drop.p > 0:
        return None
    return module.lora_A[a].weight, module.lora_B[a].weight, float(module.scaling[a])


def head_parts(head: nn.Module) -> tuple[nn.Linear, nn.Module | None] | None:
    """The output head's base ``nn.Linear`` and its LoRA layer (None when plain); None when it is neither."""
    if isinstance(head, nn.Linear):
        return head, None
    if _is_lora(head) and isinstance(head.base_layer, nn.Linear) and lora_parts(head) is not None:
        return head.base_layer, head
    return None


def merged_state(student: nn.Module, fold: bool = True) -> dict[str, torch.Tensor]:
    """The student's weights with every adapter folded into its base weight (``fold``; else the base weights
    alone), under the family's own names: what ``save_pretrained`` of the model without adapters would write."""
    state = {}
    lora_layers = {n: m for n, m in student.named_modules() if _is_lora(m)}
    for name, value in student.state_dict().items():
        if ".lora_" in name or ".lora_magnitude_vector" in name:
            continue
        owner = name.rpartition(".base_layer.")[0]
        if owner in lora_layers:
            kind = name.rpartition(".")[2]  # weight or bias
            value = _folded(lora_layers[owner]) if kind == "weight" and fold else value
            name = f"{owner}.{kind}"
        state[name] = value.detach()
    return state


@torch.no_grad()
def _folded(layer: nn.Module) -> torch.Tensor:
    """The base weight plus the adapter's update, as peft's own merge computes it (DoRA included)."""
    return layer.base_layer.weight + layer.get_delta_weight(ADAPTER) if not _dora(layer) else _dora_folded(layer)


def _dora(layer: nn.Module) -> bool:
    return bool(layer.use_dora.get(ADAPTER, False))


def _dora_folded(layer: nn.Module) -> torch.Tensor:
    base = layer.base_layer.weight
    combined = base + layer.get_delta_weight(ADAPTER)
    norm = layer.lora_magnitude_vector[ADAPTER].get_weight_norm(base, layer.get_delta_weight(ADAPTER), scaling=1)
    magnitude = layer.lora_magnitude_vector[ADAPTER].weight
    return (magnitude / norm).view(-1, 1) * combined


def plain_copy(student: nn.Module, fold: bool = True) -> nn.Module:
    """A new model of the student's class and config without adapters, holding ``merged_state`` (sharing its
    tensors): what ``save_pretrained`` writes as an ordinary model folder.

    A head tied to the input embedding that carries an adapter is untied (``tie_word_embeddings: false``, both
    matrices saved): folded into the shared matrix, the head's update would change the embedding too, and kept
    tied, the saved head would be the embedding without the update."""
    config = copy.deepcopy(student.config)
    untie = fold and _tied(student) and _is_lora(student.get_output_embeddings())
    if untie:
        config.tie_word_embeddings = False
    with torch.device("meta"):
        plain = type(student)(config)
    plain.load_state_dict(merged_state(student, fold), strict=False, assign=True)
    if not untie:
        plain.tie_weights()
    return plain


def _tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None:
        return False
    weight = head.base_layer.weight if _is_lora(head) else head.weight
    return weight is emb.weight


def save_adapter(student: nn.Module, folder: Path, base: str) -> None:
    """The adapter folder ``PeftModel.from_pretrained(base_model, folder)`` loads: ``adapter_config.json`` (naming
    ``base``) and ``adapter_model.safetensors``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    # PeftModel names the student's weights from its own root: base_model.model.<the student's names>.
    # The base is the frozen one the config names: no embedding or head is saved again beside the adapters.
    state = get_peft_model_state_dict(student, adapter_name=ADAPTER, save_embedding_layers=False)
    save_file(
        {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}, folder / ADAPTER_FILES[1]
    )
    config = student.peft_config[ADAPTER]
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))


def is_adapter_folder(path: str) -> bool:
    p = Path(path).expanduser()
    return (p / ADAPTER_FILES[0]).is_file() and not (p / "config.json").is_file()


def adapter_base(path: str) -> str:
    """The base model an adapter folder names: that folder (absolute, or relative to the adapter's); else its
    ``base/`` (where alignkd saves a base it built, named by its absolute path, which moves with a copied run
    folder); else as written (a hub id)."""
    p = Path(path).expanduser()
    base = json.loads((p / ADAPTER_FILES[0]).read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{path}: adapter_config.json names no base_model_name_or_path; set it to the base model")
    for candidate in (p / base, p / "base"):  # p / an absolute path is that path
        if (candidate / "config.json").is_file():
            return str(candidate)
    return base


def merge_adapter_folder(base_model: nn.Module, path: str) -> nn.Module:
    """``base_model`` with the adapter folder's update folded in (a plain model of its family)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError(
            f"{path} is a PEFT adapter folder; loading it needs the peft package: pip install peft"
        ) from None
    if _tied(base_model) and _adapts_head(base_model, path):  # see plain_copy: the head gets a matrix of its own
        head = base_model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        base_model.config.tie_word_embeddings = False
    return PeftModel.from_pretrained(base_model, path).merge_and_unload()


def _adapts_head(model: nn.Module, path: str) -> bool:
    """Whether the adapter folder holds an adapter for the model's output head."""
    from safetensors import safe_open

    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    with safe_open(str(Path(path).expanduser() / ADAPTER_FILES[1]), "pt") as f:
        keys = list(f.keys())
    return any(f".{name}.lora_" in k or k.startswith(f"{name}.lora_") for k in keys)
