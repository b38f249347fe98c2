"""The run config: typed dataclasses, one per section, a docstring under every field.

Loss terms are the dataclasses of ``alignkd.terms`` (one per type). A ``Config``
validates itself when built, whatever builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignkd.terms import ScheduleConfig, TermConfig


@dataclass
class ModelConfig:
    """The teacher model."""

    path: str = ""
    """Local directory or hub id of a Hugging Face model."""
    dtype: str = "auto"
    """Weights dtype: auto (bfloat16 where it is fast: CUDA with bf16, CPUs with AVX512-BF16/AMX; else float32),
    float32, bfloat16 or float16."""
    task: str = "causal_lm"
    """Model head: causal_lm, sequence_classification or masked_lm."""
    placement: str = "replicate"
    """With several processes: replicate (a whole copy on each, in ``dtype``) or shard (its blocks split over the
    processes: FSDP2, or ZeRO-3 under DeepSpeed)."""
    trust_remote_code: bool = False
    """Allow model code shipped with a hub repository."""
    cache: str | None = None
    """Folder of a teacher cache (``alignkd cache-teacher`` writes it): training then reads the teacher's top-k
    log-probabilities and states from it and never runs the teacher (causal LM; kl, ce, hidden, relation, contrastive
    terms)."""
    cache_top_k: int = 64
    """Teacher cache: log-probabilities kept per position (the rest is one tail bucket)."""
    cache_dtype: str = "bfloat16"
    """Teacher cache: dtype of the stored hidden states and q/k/v projections: bfloat16, float16 or float32."""


@dataclass
class FromTeacherConfig:
    """A student made by copying some of the teacher's blocks (depth pruning)."""

    layers: list[int] | None = None
    """Teacher block indices to keep, in order; None lets ``select`` choose ``num_layers`` blocks (a run then writes its
    choice here, in config.yaml)."""
    num_layers: int | None = None
    """How many blocks to keep when ``layers`` is None (default: a quarter of the teacher's, at least 1)."""
    select: str = "even"
    """How blocks are chosen when ``layers`` is None: even (spread evenly), importance (highest Block Influence,
    1 - cos(block input, output), on calibration text), perplexity (those whose removal raises the teacher's
    calibration loss most) or search (a short distillation probe of each candidate set the other rules give; the best is
    kept)."""
    contiguous: bool = False
    """importance, perplexity: remove one contiguous span of blocks instead (the span whose input and output are closest
    by angular distance, or whose removal costs least loss)."""
    calibration_sequences: int = 64
    """Training blocks the scores are measured on (cost: one teacher forward over them; perplexity: one per block or
    span)."""
    search_candidates: int = 4
    """search: candidate sets probed, in order: importance, importance_span, perplexity, even, perplexity_span (a set
    given twice is probed once)."""
    search_probe_steps: int = 20
    """search: optimizer steps of each candidate's probe, scored by the held-out loss after it."""


@dataclass
class PeftSettings:
    """Low-rank adapters trained in place of the student's weights (the ``peft`` library)."""

    method: str = "lora"
    """lora, dora (LoRA with a learned magnitude per output row) or rslora (LoRA scaled by alpha / sqrt(r))."""
    r: int = 8
    """Rank of each adapter."""
    alpha: float = 16.0
    """Scale of the update: ``alpha / r`` times ``B @ A`` (rslora: ``alpha / sqrt(r)``)."""
    dropout: float = 0.0
    """Dropout on each adapter's input while training. Above 0 on ``lm_head``, the LM head cannot run fused
    (its logits are then made by the adapted head)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Linear layers that get an adapter: names or name endings (``q_proj``, ``model.layers.0.mlp.up_proj``),
    or all-linear (every linear layer but the output head; add ``lm_head`` to adapt it too). One that matches
    nothing is an error."""
    merge: bool = True
    """Export: true writes ``student/`` as an ordinary model with the adapters folded in; false writes the adapter
    folder that ``PeftModel.from_pretrained`` loads (with the base beside it in ``student/base/`` when the
    student was built here rather than read from ``student.path``)."""


@dataclass
class StudentConfig:
    """The student: exactly one of ``path``, ``from_teacher`` or ``config``."""

    path: str | None = None
    """Local directory or hub id of a Hugging Face model to train as the student."""
    from_teacher: FromTeacherConfig | None = None
    """Copy embeddings, chosen blocks, final norm and head from the teacher."""
    config: dict[str, Any] | None = None
    """Overrides of the teacher's config (e.g. num_hidden_layers, hidden_size) for a new student of its architecture."""
    init: str = "random"
    """For a ``config`` student: random (fresh weights) or prune (a width-pruned copy of the teacher's most important
    channels, ranked by ``importance``)."""
    importance: str = "activation"
    """For ``init: prune``: how the teacher's channels are ranked: activation (mean activation magnitudes on 64 training
    blocks, as in Minitron) or weight (weight norms; no data)."""
    dtype: str = "auto"
    """Student weights dtype while training: auto (float32, the optimizer's master weights; bf16 compute comes from
    train.mixed_precision), float32, bfloat16 or float16."""
    tokenizer: str | None = None
    """The student's own tokenizer (a folder or hub id) for a ``config`` student with ``init: random``: its
    vocab_size and BOS, EOS and pad ids follow it. A ``path`` student reads its own folder's. When the student's
    tokenizer is not the teacher's, both models read the same text in their own tokens, compared span by span:
    only ce and the span terms (span_likelihood, hybrid, span_hidden) apply. None: the teacher's."""
    new_tokenizer: int | None = None
    """Like ``tokenizer``, with a byte-level BPE tokenizer of this many tokens trained on ``data.train`` (once,
    kept beside it in ``.alignkd-tokenizers/``): a student that reads the training text in a vocabulary fitted to
    it. None: none."""
    freeze: list[str] = field(default_factory=list)
    """Parameters not trained: glob patterns over the student's parameter or module names (``model.embed_tokens``,
    ``*.embed_tokens*``, ``model.layers.0``). They stay bit-identical, get no gradient and no optimizer state (for a
    large vocabulary, the embedding copied from the teacher then costs no AdamW memory); a tied head is frozen with
    its embedding. A pattern that matches nothing is an error."""
    peft: PeftSettings | None = None
    """Train low-rank adapters (LoRA and kin) instead of the student's weights: only the adapters and the
    projectors are trained and held by the optimizer. One process or DDP. None: the whole student trains."""


@dataclass
class DataConfig:
    """Training and evaluation text."""

    train: str = ""
    """Text file, folder, JSONL, CSV, ``load_from_disk`` folder or ``datasets`` name."""
    eval: str | None = None
    """Held-out set in any of the same forms; None splits ``eval_fraction`` off the training blocks."""
    seq_len: int = 256
    """Tokens per packed training block."""
    text_field: str = "text"
    """JSONL field / CSV column holding the text."""
    label_field: str = "label"
    """JSONL field / CSV column holding the class label (classification models)."""
    eval_fraction: float = 0.05
    """Share of the training blocks held out when no eval set is named."""
    max_train_tokens: int | None = None
    """Cap on training tokens read (None reads everything)."""
    bos: str = "auto"
    """BOS at the head of every packed causal-LM block: auto (when the tokenizer adds one itself, as Llama's and Gemma's
    do), always or never; a run records what auto chose."""
    augment: int = 0
    """Classification: variants of each training example to add, each with ``augment_p`` of its tokens replaced by one
    of ``augment_lm``'s ``augment_k`` likeliest tokens there, as TinyBERT augments; made once and kept beside the data.
    The step labels them with the teacher's class distribution (a ``ce`` term: its most likely class; the gold label
    does not hold for changed text), so the run needs a term that runs the teacher. 0: none."""
    augment_lm: str | None = None
    """The language model proposing replacements (causal or masked, with the teacher's tokenizer); None uses the
    teacher's own body with its tied input embedding as the output head, which fine-tuning has moved away from
    language modelling: the model the teacher was fine-tuned from proposes better words."""
    augment_p: float = 0.4
    """Share of a variant's tokens replaced (TinyBERT: 0.4)."""
    augment_k: int = 15
    """Candidates per replaced token: one of the proposing model's ``augment_k`` likeliest, the original excluded
    (TinyBERT: 15)."""
    unlabelled: str | None = None
    """Classification: text (any source ``train`` takes) cut into ``seq_len``-token snippets and added to the training
    rows, which the step labels with the teacher's classes as for ``augment``; made once and kept beside it."""
    unlabelled_rows: int | None = None
    """The most snippets taken from ``unlabelled``, in order (None: all)."""
    token_cache: str = "auto"
    """Language-model text: auto tokenises a local source of 16 MiB or more once into an int32 token file beside it (in
    .alignkd-tokens/, or $ALIGNKD_CACHE/tokens when that folder is read-only), memory-mapped and reused while the
    tokenizer and files are unchanged; off tokenises in memory every run; a folder path caches there whatever the size.
    The blocks are the same either way."""


@dataclass
class GenerationConfig:
    """Training on generated text: where each micro-batch comes from, and how continuations are sampled (causal LM)."""

    sources: dict[str, float] = field(default_factory=lambda: {"dataset": 1.0})
    """Probability of each source per micro-batch, summing to 1: dataset (the training blocks as they are), student
    (on-policy: the student continues a prompt and the teacher scores every sampled token) and teacher (sequence-level:
    the teacher's continuations, generated once and stored for later runs). Every process draws the same source."""
    student_schedule: ScheduleConfig | None = None
    """The student source's probability over training instead of its fixed one (GKD's lambda), e.g.
    {kind: linear, start: 0, end: 1}; the other sources share the rest in their configured proportions."""
    prompts: str | None = None
    """JSONL file of prompts, each row a ``prompt_field`` string or a ``messages`` list (rendered with the tokenizer's
    chat template, as instruct models expect); None takes the first ``prompt_tokens`` of each training block."""
    prompt_field: str = "prompt"
    """The JSONL field holding a prompt's text."""
    prompt_tokens: int = 32
    """Prompt length cut from training blocks; a longer prompt from the file keeps its last this many tokens."""
    max_new_tokens: int = 64
    """Most tokens sampled per prompt (a continuation also stops at EOS)."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches this."""
    eval_prompts: int = 0
    """Held-out prompts (the first ``prompt_tokens`` of eval blocks) the last evaluation continues, to log gen_rougeL
    (ROUGE-L of the student's greedy continuation against the teacher's), gen_teacher_nll (the teacher's NLL per token
    of the student's samples) and gen_distinct2 (distinct bigrams of those samples); 0 skips it. Works whatever the
    sources, so a run on the data alone can be compared."""
    samples: str = "auto"
    """Where the teacher's samples are stored: auto (beside the training data in .alignkd-samples/, or under
    $ALIGNKD_CACHE/samples when that folder is read-only) or a folder."""
    teacher_top_k: int = 0
    """Sequence-level KD: keep the teacher's top-k log-probabilities behind every token it samples, with the samples,
    and train on those instead of running the teacher again on its own text (the rest of its distribution is one tail
    bucket, as in a teacher cache). Only terms that read a teacher cache (kl, ce) then apply. 0: run the teacher."""

    @property
    def generates(self) -> bool:
        """Whether any micro-batch can be generated."""
        return any(p > 0 for k, p in self.sources.items() if k != "dataset") or self.student_schedule is not None


@dataclass
class WeightingConfig:
    """How the loss terms are combined."""

    strategy: str = "static"
    """static (fixed weights), gradnorm (Chen et al. 2018), uncertainty (Kendall et al. 2018) or ratio (Minitron: every
    step each feature term's weight is its configured weight times L_kl / L_term, L_kl being the first kl or dkd term,
    which ratio requires)."""
    alpha: float = 1.5
    """gradnorm: asymmetry; larger pulls harder on terms that train slowly."""
    lr: float = 0.025
    """gradnorm: learning rate of the weights."""
    every: int = 1
    """gradnorm: update the weights every this many optimizer steps (each update costs one backward per term)."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 300
    """Optimizer steps (the most, when ``max_minutes`` is set)."""
    max_minutes: float | None = None
    """Stop after this many minutes of training, evaluations included (None: run all ``steps``); the schedules then end
    at the projected last step."""
    batch_size: int = 8
    """Blocks per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    optimizer: str = "adamw"
    """adamw (betas 0.9, 0.95), or adafactor (``torch.optim.Adafactor``: second moments factored into a row and a
    column vector per matrix and no momentum, so a large embedding's state is its V + D values instead of AdamW's
    2 V D; its ``lr`` caps each step relative to the parameter's RMS, try 1e-2). DeepSpeed launches use adamw."""
    lr: float = 3e-4
    """Peak learning rate (student and projectors)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to norms, biases and weighting parameters)."""
    warmup: int = 30
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    fused_head: bool = True
    """Causal LMs: kl and ce terms run through the output heads in chunks, never building [tokens, V] logits (when every
    term allows it and the family's logits are a plain head; under autocast only with one logit-reading term, the head
    matmuls then in its dtype)."""
    max_bad_steps: int = 5
    """A step with a non-finite loss or gradient is skipped; this many in a row stop the run."""
    mixed_precision: str = "auto"
    """auto (bf16 autocast where bf16 is fast: CUDA with bf16, CPUs with AVX512-BF16/AMX; else none), no, bf16 or
    fp16."""
    seed: int = 0
    """Seed for weights, data order and sampling."""
    output_dir: str = "runs/distill"
    """Where metrics, checkpoints and the student go."""
    log_every: int = 1
    """Write a metrics.jsonl record every this many steps."""
    eval_every: int = 100
    """Held-out evaluation every this many steps (0: only at the end)."""
    eval_batches: int = 8
    """Micro-batches of held-out data per evaluation."""
    save_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    progress: bool = True
    """Show the rich progress bar."""
    report_to: list[str] | str | None = None
    """Experiment trackers that get the config, the resolved precision and every metrics.jsonl record (its numbers, as
    train/<key> and eval/<key>), through Accelerate, beside metrics.jsonl: tensorboard, wandb, mlflow or any other
    tracker Accelerate knows; [] or none: metrics.jsonl alone. None: tensorboard when it is installed (under
    OUTPUT_DIR/tensorboard), else metrics.jsonl alone. A tracker named here that is not installed stops the run before
    it starts."""
    project: str = "alignkd"
    """The trackers' project: the wandb project, the MLflow experiment, the TensorBoard subfolder."""
    run_name: str | None = None
    """The trackers' run name (None: the output folder's name). ``--resume`` continues the same wandb or MLflow run."""


@dataclass
class Config:
    """A whole distillation run."""

    teacher: ModelConfig = field(default_factory=ModelConfig)
    """The frozen teacher."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    losses: list[TermConfig] = field(default_factory=list)
    """The loss terms (at least one)."""
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    """How the terms are weighted."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Where each micro-batch comes from: the data, or text the student or teacher generates."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and output."""

    def __post_init__(self):
        # Whatever builds a Config (YAML, a dict, Python), its defaults are filled and it is checked.
        from alignkd.config.resolve import resolved

        resolved(self)
