"""How the student generates, judged beside its teacher on held-out prompts.

Three numbers, because each alone can be gamed:

- ``gen_rougeL``: ROUGE-L F1 (longest common subsequence of token ids) of the
  student's greedy continuation against the teacher's;
- ``gen_teacher_nll``: the teacher's mean negative log-likelihood per token of the
  student's sampled continuations (lower: text the teacher finds likely);
- ``gen_distinct2``: distinct token bigrams over all bigrams of those samples. A
  student that repeats itself can score well on teacher NLL alone; distinct-2 shows it.
"""

from __future__ import annotations

import torch
from torch import nn

from alignkd.models.generate import Generated, Sampling, generate, left_pad

JUDGE_KEYS = ("gen_rougeL", "gen_teacher_nll", "gen_distinct2")
"""What :func:`judge` adds to an evaluation record."""


def lcs(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence of two id lists."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l(prediction: list[int], reference: list[int]) -> float:
    """ROUGE-L F1 of two id lists (0 when either is empty)."""
    n = lcs(prediction, reference)
    if n == 0:
        return 0.0
    p, r = n / len(prediction), n / len(reference)
    return 2 * p * r / (p + r)


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of ``sequences`` (NaN when none has ``n`` tokens)."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


@torch.no_grad()
def teacher_nll(teacher: nn.Module, gen: Generated, vocab: int) -> tuple[float, int]:
    """The teacher's summed NLL of the sampled tokens of ``gen`` (over its first ``vocab`` ids) and their count."""
    logits = teacher(input_ids=gen.input_ids, attention_mask=gen.mask.long()).logits[..., :vocab].float()
    scored = gen.scored()
    rows, cols = scored.nonzero(as_tuple=True)
    logp = logits[rows, cols].log_softmax(-1)
    nll = -logp.gather(-1, gen.input_ids[rows, cols + 1][:, None]).sum()
    return float(nll), len(rows)


def _continuations(gen: Generated) -> list[list[int]]:
    return [gen.input_ids[i][gen.generated[i]].tolist() for i in range(gen.input_ids.shape[0])]


def judge(
    student: nn.Module,
    teacher: nn.Module,
    prompts: list[torch.Tensor],
    sampling: Sampling,
    *,
    seed: int,
    eos_ids: list[int],
    pad_id: int,
    vocab: int,
    autocast,
    batch: int = 16,
    any_running=None,
) -> dict:
    """The three numbers of the module docstring on ``prompts`` (``[n]`` ids each, on the models' device).

    ``sampling``: how the student's samples are drawn (its greedy and the
    teacher's greedy continuations have the same length limit). ``autocast``: the
    student's autocast context (the teacher runs in its own dtype).
    """
    greedy = Sampling(sampling.max_new_tokens, temperature=0.0)
    kw = {"eos_ids": eos_ids, "pad_id": pad_id, "vocab": vocab, "any_running": any_running}
    rouge, samples, nll, count = [], [], 0.0, 0
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        ids, mask = left_pad(part, pad_id)
        ids, mask = ids.to(part[0].device), mask.to(part[0].device)
        seeds = [seed + start + i for i in range(len(part))]
        with autocast():
            s_greedy = generate(student, ids, mask, greedy, seeds, **kw)
            s_sampled = generate(student, ids, mask, sampling, seeds, **kw)
        t_greedy = generate(teacher, ids, mask, greedy, seeds, **kw)
        rouge += [rouge_l(a, b) for a, b in zip(_continuations(s_greedy), _continuations(t_greedy), strict=True)]
        samples += _continuations(s_sampled)
        total, n = teacher_nll(teacher, s_sampled, vocab)
        nll, count = nll + total, count + n
    return {
        "gen_rougeL": sum(rouge) / len(rouge),
        "gen_teacher_nll": nll / count if count else float("nan"),
        "gen_distinct2": distinct_n(samples),
    }
