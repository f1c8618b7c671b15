"""Batched next-token sampling on fp32 logits [B, V], with vLLM's order of operations.

Per step: SamplingMetadata.build turns each row's SamplingParams and token history into tensors
and flags once; Sampler(logits, meta) then runs

    min_tokens EOS mask → penalties → logprobs → greedy argmax
                        → temperature → min_p → top_k → top_p → exponential race (random rows)

Logprobs are taken from the logits after penalties and min_tokens masking but before
temperature and truncation: they describe the model's (penalized) distribution, so they do not
change when a client varies temperature/top_p, and they stay finite for every token (a token
that top_p cut still has a meaningful logprob). vLLM's "processed" mode would differ from ours.

The common batch (all greedy, no penalties, no logprobs) does one argmax and nothing else: every
optional step is guarded by a flag or a None tensor computed once in build().

Reproducibility: a seeded row draws its noise from its own torch.Generator, exactly V values per
step, and only when the row samples randomly; so its tokens do not depend on which other rows
share the batch. Unseeded random rows share one batched draw from torch's default generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from baton.services.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplerOutput:
    """What the sampler returns for one step of B rows."""

    token_ids: torch.Tensor
    """[B] int64: the chosen token of each row."""
    logprobs: torch.Tensor | None
    """[B] fp32: logprob of each chosen token; None when no row asked for logprobs."""
    top_logprob_ids: torch.Tensor | None
    """[B, k] int64: ids of the k most likely tokens, k = the batch's largest `logprobs`; a row
    that asked for fewer keeps its first `logprobs` columns. None when k == 0."""
    top_logprobs: torch.Tensor | None
    """[B, k] fp32: their logprobs, sorted descending along k."""


@dataclass(frozen=True)
class SamplingMetadata:
    """One step's sampling inputs as tensors; a None tensor means "this step is a no-op"."""

    vocab_size: int
    all_greedy: bool
    """No row samples randomly: the sampler stops after argmax."""
    greedy_mask: torch.Tensor | None
    """[B] bool, rows that take argmax; None unless the batch mixes greedy and random rows."""
    temperature: torch.Tensor | None
    """[B, 1] fp32 (1.0 on greedy rows); None when every random row has temperature 1."""
    top_k: torch.Tensor | None
    """[B] int64 in [1, V] (V = off); None when no random row uses top_k."""
    top_k_max: int
    """max(top_k), known on the host so the GPU path never syncs to read it (0 with no top_k)."""
    top_p: torch.Tensor | None
    """[B] fp32 (1.0 = off); None when no random row uses top_p."""
    min_p: torch.Tensor | None
    """[B] fp32 (0.0 = off); None when no random row uses min_p."""
    seeded_rows: tuple[tuple[int, torch.Generator], ...]
    """(row, generator) for each random row with its own generator."""
    any_unseeded_random: bool
    """Some random row draws from the default generator (one batched draw covers them all)."""
    repetition_penalty: torch.Tensor | None
    """[B, 1] fp32 (1.0 = off); None when no row uses it."""
    frequency_penalty: torch.Tensor | None
    """[B, 1] fp32; None when no row uses frequency or presence penalties."""
    presence_penalty: torch.Tensor | None
    """[B, 1] fp32; set together with frequency_penalty."""
    seen_mask: torch.Tensor | None
    """[B, V] bool, token occurs in prompt or output (repetition penalty); penalized rows only."""
    output_counts: torch.Tensor | None
    """[B, V] fp32, occurrences in the output (frequency/presence); penalized rows only."""
    min_tokens_index: tuple[torch.Tensor, torch.Tensor] | None
    """(rows, token ids) to set to -inf: stop tokens of rows still short of min_tokens."""
    max_num_logprobs: int | None
    """Largest `logprobs` in the batch; None when no row asked for any."""

    @staticmethod
    def build(
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        *,
        eos_token_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
    ) -> SamplingMetadata:
        """Row i of the batch is params[i] with its history and generator.

        eos_token_ids: the model's EOS ids, masked (with each row's stop_token_ids) until the
        row has min_tokens outputs. device: where the logits live; generators must live there too.
        Cost per step: a few Python passes over the rows, plus, for penalized rows only, a
        scatter of their prompt and output ids (vLLM keeps these incrementally; do the same if
        it ever shows in a profile).
        """
        num_rows = len(params)
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == num_rows):
            raise ValueError("params, prompt/output token ids and generators differ in length")
        greedy = [p.greedy for p in params]
        random_rows = [i for i, g in enumerate(greedy) if not g]
        all_greedy = not random_rows

        def row_floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        temperature = top_k = top_p = min_p = None
        top_k_max = 0
        if not all_greedy:
            # Greedy rows get neutral values: their random sample is computed, then discarded.
            temps = [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
            if any(t != 1.0 for t in temps):
                temperature = row_floats(temps).unsqueeze(1)
            ks = [
                vocab_size if g or p.top_k <= 0 else min(p.top_k, vocab_size)
                for p, g in zip(params, greedy, strict=True)
            ]
            if any(k < vocab_size for k in ks):
                top_k = torch.tensor(ks, dtype=torch.int64, device=device)
                top_k_max = max(ks)
            ps = [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)]
            if any(p < 1.0 for p in ps):
                top_p = row_floats(ps)
            mps = [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)]
            if any(m > 0.0 for m in mps):
                min_p = row_floats(mps)

        seeded_rows = tuple((i, g) for i in random_rows if (g := generators[i]) is not None)

        # Penalties apply to greedy rows too (vLLM): they change the argmax.
        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        freq_rows = [i for i, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
        repetition = frequency = presence = seen_mask = None
        # Rows without penalties keep all-zero history: their neutral penalties make it moot.
        counts = torch.zeros(
            num_rows if rep_rows or freq_rows else 0, vocab_size, dtype=torch.float32, device=device
        )
        for i in sorted(set(rep_rows) | set(freq_rows)):
            out = torch.tensor(output_token_ids[i], dtype=torch.int64, device=device)
            counts[i].scatter_add_(0, out, torch.ones_like(out, dtype=torch.float32))
        if rep_rows:
            repetition = row_floats([p.repetition_penalty for p in params]).unsqueeze(1)
            seen_mask = counts > 0
            for i in rep_rows:
                prompt = torch.tensor(prompt_token_ids[i], dtype=torch.int64, device=device)
                seen_mask[i, prompt] = True
        if freq_rows:
            frequency = row_floats([p.frequency_penalty for p in params]).unsqueeze(1)
            presence = row_floats([p.presence_penalty for p in params]).unsqueeze(1)

        mask_rows: list[int] = []
        mask_ids: list[int] = []
        for i, p in enumerate(params):
            if len(output_token_ids[i]) < p.min_tokens:
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                mask_rows += [i] * len(stops)
                mask_ids += sorted(stops)
        min_tokens_index = None
        if mask_rows:
            min_tokens_index = (
                torch.tensor(mask_rows, dtype=torch.int64, device=device),
                torch.tensor(mask_ids, dtype=torch.int64, device=device),
            )

        requested = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingMetadata(
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            greedy_mask=(
                torch.tensor(greedy, dtype=torch.bool, device=device)
                if random_rows and len(random_rows) < num_rows
                else None
            ),
            temperature=temperature,
            top_k=top_k,
            top_k_max=top_k_max,
            top_p=top_p,
            min_p=min_p,
            seeded_rows=seeded_rows,
            any_unseeded_random=len(seeded_rows) < len(random_rows),
            repetition_penalty=repetition,
            frequency_penalty=frequency,
            presence_penalty=presence,
            seen_mask=seen_mask,
            output_counts=counts if freq_rows else None,
            min_tokens_index=min_tokens_index,
            max_num_logprobs=max(requested) if requested else None,
        )


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt + output), then frequency and presence (output only); out of place.

    Repetition follows HF/vLLM: a seen token's positive logit is divided by the penalty, a
    negative one multiplied, so a penalty > 1 always makes it less likely.
    """
    if meta.repetition_penalty is not None and meta.seen_mask is not None:
        rep = meta.repetition_penalty.expand_as(logits)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(meta.seen_mask, penalized, logits)
    if (
        meta.output_counts is not None
        and meta.frequency_penalty is not None
        and meta.presence_penalty is not None
    ):
        logits = logits - meta.frequency_penalty * meta.output_counts
        logits = logits - meta.presence_penalty * (meta.output_counts > 0).float()
    return logits


def apply_top_k_top_p_min_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    top_k_max: int | None = None,
) -> torch.Tensor:
    """Set to -inf every logit outside the row's min_p, then top_k, then top_p set; out of place.

    logits [B, V] are already divided by temperature. Each filter sees only the survivors of
    the one before (top_p renormalizes over what min_p and top_k kept), as in vLLM.
    top_k [B] int64 in [1, V]: keep tokens whose logit is >= the k-th largest.
    top_p [B] in (0, 1]: keep the smallest most-likely-first set whose probability is >= top_p.
    min_p [B] in [0, 1]: keep tokens with prob >= min_p * (the top token's prob).
    top_k_max: max(top_k) if the caller knows it (read from top_k otherwise: a host sync).
    Ties: a filter keeps every token tied with the last one it keeps (as HF's top-k does), so
    the kept set never depends on sort order among equal logits and may exceed k. The top token
    always survives all three.
    """
    neg_inf = float("-inf")
    if min_p is not None:
        # Compared in probability space, like vLLM: in logit space (logit_i - logit_max <
        # log(min_p)) rounding moves exact boundaries. min_p = 0 keeps everything.
        probs = logits.softmax(dim=-1)
        max_prob = probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < max_prob * min_p.unsqueeze(1), neg_inf)
    if top_k is not None:
        k_max = int(top_k.max().item()) if top_k_max is None else top_k_max
        top_values = torch.topk(logits, k_max, dim=-1).values  # sorted descending
        kth = top_values.gather(1, (top_k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, neg_inf)
    if top_p is not None:
        sorted_logits = torch.sort(logits, dim=-1, descending=True).values
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Keep sorted token j while the mass strictly before it is < top_p: the smallest prefix
        # reaching top_p. Token 0 has 0 mass before it, so it is always kept.
        mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
        num_kept = (mass_before < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True)
        # top_p == 1 keeps everything even where rounding lets the cumsum reach 1 early: a row
        # with top_p off must see the same support whether or not a neighbour turned it on.
        num_kept = torch.where(top_p.unsqueeze(1) >= 1.0, logits.shape[-1], num_kept)
        threshold = sorted_logits.gather(1, num_kept - 1)
        logits = logits.masked_fill(logits < threshold, neg_inf)
    return logits


class Sampler:
    """Stateless: every per-request input arrives in SamplingMetadata (see module docstring)."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[1] != meta.vocab_size:
            raise ValueError(f"logits {tuple(logits.shape)} are not [B, {meta.vocab_size}]")
        logits = logits.float()
        if meta.min_tokens_index is not None:
            logits = logits.clone()  # never write into the caller's logits
            logits[meta.min_tokens_index] = float("-inf")
        logits = apply_penalties(logits, meta)

        logprobs_all = None
        if meta.max_num_logprobs is not None:
            logprobs_all = logits.log_softmax(dim=-1)

        if meta.all_greedy:
            token_ids = _argmax(logits)
        else:
            token_ids = self._sample_random(logits, meta)
            if meta.greedy_mask is not None:
                token_ids = torch.where(meta.greedy_mask, _argmax(logits), token_ids)

        if logprobs_all is None or meta.max_num_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        sampled = logprobs_all.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        if meta.max_num_logprobs == 0:
            return SamplerOutput(token_ids, sampled, None, None)
        top = torch.topk(logprobs_all, meta.max_num_logprobs, dim=-1)  # sorted descending
        return SamplerOutput(token_ids, sampled, top.indices, top.values)

    @staticmethod
    def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Sample every row as if random (greedy rows have neutral settings and are replaced)."""
        if meta.temperature is not None:
            logits = logits / meta.temperature
        logits = apply_top_k_top_p_min_p(
            logits, meta.top_k, meta.top_p, meta.min_p, top_k_max=meta.top_k_max
        )
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is a sample from p, and unlike
        # torch.multinomial it never synchronizes with the host and draws a fixed V values/row.
        # float32 whatever the logits' dtype: a row takes exactly V float32 draws from its
        # generator, which Request.skip_sampled_tokens replays for tokens sampled elsewhere.
        noise = torch.empty(probs.shape, dtype=torch.float32, device=probs.device)
        if meta.any_unseeded_random:
            noise.exponential_()
        for row, generator in meta.seeded_rows:
            noise[row].exponential_(generator=generator)  # exactly V draws from its own stream
        # An Exp(1) draw can round to 0; 0/0 would be NaN, and argmax picks NaN. Clamp instead.
        noise.clamp_(min=_TINY)
        return _argmax(probs.div_(noise))


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of [B, V]; on CUDA one Triton launch (torch's reduction takes 38 us
    for one 128k-vocab row on an H100, kernels/triton_argmax.py)."""
    if x.is_cuda:
        from baton.kernels.triton_argmax import argmax

        return argmax(x if x.stride(-1) == 1 else x.contiguous())
    return x.argmax(dim=-1)


_TINY = math.ldexp(1.0, -126)  # smallest normal fp32
