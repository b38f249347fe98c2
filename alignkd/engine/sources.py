"""Where each micro-batch comes from: the training data, the student's own samples (on-policy) or the teacher's
(sequence-level), as ``generation.sources`` says.

Everything random here is a function of the seed, the step and the row: which
source a micro-batch takes (the same on every process), and the seed each
sampled row is drawn with. A resumed run, or one split over processes, draws
what the uninterrupted single-process run does; only the prompt order of a
prompts file is state (a ``BlockSampler``, saved with the checkpoint).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkd.align.tasks import Batch
from alignkd.align.weighting import schedule_value
from alignkd.config import SOURCES
from alignkd.data import BlockSampler, resolve_bos
from alignkd.data.prompts import load_prompts
from alignkd.data.tokens import cache_folder
from alignkd.errors import ConfigError
from alignkd.models.capture import Record
from alignkd.models.generate import Generated, Sampling, TopK, generate, join, left_pad
from alignkd.models.loading import max_positions
from alignkd.teacher.cache_format import data_hash, teacher_fingerprint
from alignkd.teacher.samples import TeacherSamples, sample_seed, store_key

SAMPLES_FOLDER = ".alignkd-samples"


@dataclass
class Drawn:
    """A micro-batch and what making it cost."""

    batch: Batch
    source: str
    gen_seconds: float = 0.0
    """Time spent sampling continuations (or reading stored ones)."""
    new_tokens: int = 0
    """Continuation tokens in the batch."""


def _eos_ids(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def any_running(acc):
    """``generate``'s ``any_running`` for this launch: None on one process; else a collective, since a model sharded
    over the processes runs each forward on all of them, so every process steps until all are done."""
    if acc.num_processes == 1:
        return None

    def any_of(mine: bool) -> bool:
        return acc.reduce(torch.tensor(float(mine), device=acc.device), "sum").item() > 0

    return any_of


class Sources:
    """Draws each micro-batch from the configured source."""

    def __init__(self, cfg, tokenizer, train_data: dict, student, teacher, *, rank: int, world: int, say=print):
        g = cfg.generation
        self.cfg, self.g = cfg, g
        self.rank, self.world = rank, world
        self.sampling = Sampling(g.max_new_tokens, g.temperature, g.top_p)
        self.prompts: list[torch.Tensor] | None = None
        self.prompt_sampler: BlockSampler | None = None
        self.store: TeacherSamples | None = None
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.eos_ids = _eos_ids(tokenizer, teacher.model)
        if not g.generates and not g.eval_prompts:
            return
        bos_id = resolve_bos(cfg.data.bos, tokenizer)
        if g.prompts and g.generates:
            self.prompts = load_prompts(
                g.prompts, tokenizer, field=g.prompt_field, max_tokens=g.prompt_tokens, bos_id=bos_id
            )
            self.prompt_sampler = BlockSampler(
                len(self.prompts), cfg.train.batch_size, cfg.train.seed, rank=rank, world_size=world
            )
            longest = max(len(p) for p in self.prompts)
        else:
            longest = g.prompt_tokens
        for name, model in (("student", student), ("teacher", teacher.model)):
            most = max_positions(model)
            if most is not None and longest + g.max_new_tokens > most:
                raise ConfigError(
                    f"generation.max_new_tokens: prompts of up to {longest} tokens plus {g.max_new_tokens} new ones "
                    f"exceed the {name}'s {most} positions; lower max_new_tokens or prompt_tokens"
                )
        if g.sources.get("teacher", 0.0) > 0:
            self.store = self._open_store(cfg, train_data, teacher, say)

    def _open_store(self, cfg, train_data: dict, teacher, say) -> TeacherSamples:
        g = self.g
        if g.prompts:
            lengths = torch.tensor([len(p) for p in self.prompts])[None]  # where one prompt ends and the next begins
            prompts = {"file": data_hash(torch.cat(self.prompts)[None], lengths)}
            beside = g.prompts
        else:
            prompts = {"blocks": data_hash(_Prefix(train_data["input_ids"], g.prompt_tokens))}
            beside = cfg.data.train
        meta = {
            "teacher": teacher_fingerprint(cfg.teacher.path),
            "teacher_dtype": cfg.teacher.dtype,
            "prompts": prompts,
            "max_new_tokens": g.max_new_tokens,
            "temperature": g.temperature,
            "top_p": g.top_p,
            "seed": cfg.train.seed,
        }
        if g.teacher_top_k:  # a store without the top-k cannot serve a run that trains on it (and vice versa: a key)
            meta["top_k"] = g.teacher_top_k
        local = Path(beside).exists()
        root = cache_folder(
            beside if local else ".",
            g.samples,
            say,
            folder=SAMPLES_FOLDER,
            fallback="samples",
            key="generation.samples",
            label="teacher samples",
            choices="auto",
            beside=local,
        )
        store = TeacherSamples(root / store_key(**meta), meta)
        if len(store):
            say(f"teacher samples: reusing {len(store):,} stored in {store.folder}")
        else:
            say(f"teacher samples: none stored yet; each is made when a step first needs it, into {store.folder}")
        return store

    # ------------------------------------------------------------------ which source

    def probabilities(self, step: int, total: int) -> dict[str, float]:
        """Each source's probability at ``step``."""
        p = {k: float(self.g.sources.get(k, 0.0)) for k in SOURCES}
        s = self.g.student_schedule
        if s is None:
            return p
        student = schedule_value(s, step, total, p["student"])
        others = {k: v for k, v in p.items() if k != "student"}
        rest = sum(others.values())
        shares = {k: v / rest for k, v in others.items()} if rest > 0 else {"dataset": 1.0, "teacher": 0.0}
        return {"student": student, **{k: (1 - student) * shares.get(k, 0.0) for k in others}}

    def source(self, step: int, k: int, total: int) -> str:
        """The source of micro-batch ``k`` of ``step``: a draw from the seed, the same on every process."""
        p = self.probabilities(step, total)
        if not self.g.generates:
            return "dataset"
        u = random.Random(f"source:{self.cfg.train.seed}:{step}:{k}").random()  # a string seed is hashed (sha512)
        edge = 0.0
        for name in SOURCES:
            edge += p[name]
            if u < edge:
                return name
        return max(p, key=p.get)  # u within rounding of 1

    # ------------------------------------------------------------------ a micro-batch

    def draw(self, run, step: int, k: int, seed: int) -> Drawn:
        """Micro-batch ``k`` of ``step`` on this process (``seed``: the data's masking seed)."""
        source = self.source(step, k, run.horizon.total)
        if source == "dataset":
            return Drawn(
                run.task.make_batch(run.train_data, run.sampler.next_indices(), run.tokenizer, seed=seed), source
            )
        t0 = time.perf_counter()
        index, prompts = self._prompts(run)
        device = run.accelerator.device
        prompts = [p.to(device) for p in prompts]
        if source == "student":
            b = self.cfg.train.batch_size
            seeds = [
                sample_seed(self.cfg.train.seed + 1 + step * 64 + k, self.rank * b + i) for i in range(len(prompts))
            ]
            side = run.unwrapped
            with side.capture.paused(), run.accelerator.autocast():
                gen = self._generate(run, side.student, prompts, seeds)
        else:
            gen = self._teacher_samples(run, index, prompts)
        # The source is the same on every process, so every process waits here alike.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        teacher = None
        if gen.top is not None:  # the teacher's top-k behind its own samples: the step reads it instead of the teacher
            teacher = Record(topk_ids=gen.top.ids, topk_logprobs=gen.top.logprobs, tail=gen.top.tail)
        batch = Batch(gen.input_ids, gen.mask, None, None, gen.scored(), teacher)
        return Drawn(batch, source, time.perf_counter() - t0, gen.new_tokens)

    def _prompts(self, run) -> tuple[list[int], list[torch.Tensor]]:
        """This process's prompts of a micro-batch, and their indices (of the prompts file, or of training blocks)."""
        if self.prompt_sampler is not None:
            idx = self.prompt_sampler.next_indices().tolist()
            return idx, [self.prompts[i] for i in idx]
        idx = run.sampler.next_indices()
        blocks = torch.as_tensor(run.train_data["input_ids"][idx])
        return idx.tolist(), [row[: self.g.prompt_tokens].long() for row in blocks]

    def _generate(self, run, model, prompts: list[torch.Tensor], seeds: list[int], top_k: int = 0) -> Generated:
        ids, mask = left_pad(prompts, self.pad_id)
        acc = run.accelerator
        return generate(
            model,
            ids.to(acc.device),
            mask.to(acc.device),
            self.sampling,
            seeds,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            vocab=run.vocab,
            any_running=any_running(acc),
            top_k=top_k,
        )

    def _teacher_samples(self, run, index: list[int], prompts: list[torch.Tensor]) -> Generated:
        """The teacher's stored continuations of ``prompts``; those not stored yet are generated and stored."""
        acc, store = run.accelerator, self.store
        missing = len(store.missing(index))
        if acc.num_processes > 1:  # generation is then a collective: all generate when any must
            missing = int(acc.reduce(torch.tensor(float(missing), device=acc.device), "sum").item())
        if missing:
            seeds = [sample_seed(self.cfg.train.seed, i) for i in index]
            k = self.g.teacher_top_k
            with run.teacher.capture.paused():
                gen = self._generate(run, run.teacher.model, prompts, seeds, top_k=k)
            top = None
            if k:  # each row's top-k behind its continuation: the positions before its sampled tokens
                at = [gen.generated[i].nonzero().flatten() - 1 for i in range(len(index))]
                top = [TopK(gen.top.ids[i][a], gen.top.logprobs[i][a], gen.top.tail[i][a]) for i, a in enumerate(at)]
            store.put(index, [gen.input_ids[i][gen.generated[i]] for i in range(len(index))], top)
        top = store.get_top(index) if self.g.teacher_top_k else None
        return join(prompts, [c.to(acc.device) for c in store.get(index)], self.pad_id, top)

    def state_dict(self) -> dict:
        return {"prompts": self.prompt_sampler.state_dict()} if self.prompt_sampler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.prompt_sampler is not None and "prompts" in state:
            self.prompt_sampler.load_state_dict(state["prompts"])


class _Prefix:
    """The first ``n`` tokens of each training block, sliceable like the blocks (what ``data_hash`` reads)."""

    def __init__(self, blocks, n: int):
        self.blocks, self.n = blocks, n
        self.shape = (blocks.shape[0], n)

    def __getitem__(self, key):
        return torch.as_tensor(self.blocks[key])[:, : self.n]
