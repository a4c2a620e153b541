"""An EAGLE head beside the target on one worker (speculative decoding's `eagle`
and `eagle3` methods; the heads are in models/eagle.py).

The head's KV pool has the target's block ids, tables and slots, like a draft
model's (worker/draft.py). Its row at position p reads the target's feature at
p and the token at p + 1, so it can only follow the target: in every step,
after the target's, it computes the rows of every position the target has now
verified, whether or not the step speculates.

    step:     x_p  d1  d2  d3       target keeps d1, refuses d2, samples s
    feed:     (h_p, d1) (h_p+1, s)  one pass: x_p's row reads d1, d1's reads s
    propose:  e1 from the last row; then (g, e1) -> e2, ... up to e_j

h is the target's feature, g the head's own output at the row before. The
token after a prompt chunk that is not the prompt's last is the next chunk's
first (`ScheduledSequence.next_token_id`). Proposals write rows past the
verified positions into the lookahead slots the scheduler reserves and takes
back after the step; the next step's feed writes those positions again. So the
head's cache never lags, and nothing about it lives here between steps.

A prefix-cache hit reuses the head's rows with the blocks; a block's last row
read the token after it in the sequence that computed it, which may differ
from this one's (acceptance may drop there, never exactness: the target
verifies).
"""

from __future__ import annotations

import dataclasses

import torch

from pagedserve.scheduler.step import ScheduledSequence, StepInput, StepOutput
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.draft import broadcast_tokens, sampled_outcomes, with_proposals
from pagedserve.worker.layers.attention import KVCache
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.models.eagle import Eagle3Head, EagleHead


class EagleDrafter:
    def __init__(self, head: EagleHead | Eagle3Head, runner: ModelRunner,
                 target_runner: ModelRunner, tp: TPGroup = TPGroup()) -> None:
        self.head = head
        self.runner = runner  # the head's attention plan and inputs (its forward is its own)
        self.target_runner = target_runner
        self.tp = tp  # every rank runs its shard of the head; rank 0 samples
        target_runner.keep_hidden = True

    @torch.inference_mode()
    def propose(self, step: StepInput, output: StepOutput | None, kv_caches: list[KVCache]
                ) -> StepOutput | None:
        """Compute the head's rows of the positions the step verified, and add each asking
        sequence's proposals to its sample (on rank 0, whose `output` has the samples).
        `step` has its tokens in flight filled in."""
        kept = self.target_runner.kept
        self.target_runner.kept = None
        if kept is None:
            return output
        target_seqs, hidden = kept
        sampled = sampled_outcomes(target_seqs, output, self.tp, hidden.device)
        feed: list[tuple[ScheduledSequence, range]] = []  # with its rows of `hidden`
        row = 0
        for seq in target_seqs:
            first_row, row = row, row + seq.num_tokens
            outcome = sampled.get(seq.seq_id)
            if outcome is not None:  # the drafts kept, and the token sampled after them
                kept_drafts, after = outcome
                verified = seq.num_tokens - len(seq.draft_token_ids or ()) + kept_drafts
            else:
                verified, after = seq.num_tokens, seq.next_token_id
            tokens = seq.token_ids[1:verified] + ([] if after is None else [after])
            if not tokens:
                continue
            asks = outcome is not None and seq.num_proposals > 0
            feed.append((ScheduledSequence(seq_id=seq.seq_id, token_ids=tokens,
                                           start_pos=seq.start_pos,
                                           block_table=seq.block_table, do_sample=asks),
                         range(first_row, first_row + len(tokens))))
        if not feed:
            return output
        # Single rows first, as the attention backends take them (stable, like the runner).
        feed.sort(key=lambda pair: pair[0].num_tokens > 1)
        index = torch.tensor([r for _, rows in feed for r in rows], device=hidden.device)
        seqs = [seq for seq, _ in feed]
        out, nexts = self._run(seqs, self.head.features(hidden)[index], kv_caches)
        asking = [seq for seq in seqs if seq.do_sample]
        if not asking:
            return output
        proposals = self._proposals(step, asking, out, nexts, kv_caches)
        if output is None:
            return None
        return dataclasses.replace(output, samples=[
            with_proposals(sample, proposals.get(sample.seq_id)) for sample in output.samples])

    def _greedy(self, rows: torch.Tensor) -> list[int]:
        """The head's proposal for each row, on every rank."""
        tokens = self.head.greedy(rows)
        return broadcast_tokens(None if tokens is None else tokens.tolist(), rows.shape[0],
                                self.tp, rows.device)

    def _run(self, seqs: list[ScheduledSequence], features: torch.Tensor,
             kv_caches: list[KVCache]) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over `seqs`: (LM-head rows, next features) of the rows that sample."""
        input_ids, positions, metadata, logits_rows = self.runner.prepare(seqs)
        out, nexts = self.head(input_ids, positions, features, kv_caches, metadata)
        return out[logits_rows], nexts[logits_rows]

    def _proposals(self, step: StepInput, asking: list[ScheduledSequence], out: torch.Tensor,
                   nexts: torch.Tensor, kv_caches: list[KVCache]) -> dict[int, list[int]]:
        wanted = {seq.seq_id: seq.num_proposals for seq in step.seqs}
        proposals: dict[int, list[int]] = {seq.seq_id: [] for seq in asking}
        ends = {seq.seq_id: seq.context_len for seq in asking}
        going = asking
        while True:
            for seq, token in zip(going, self._greedy(out), strict=True):
                proposals[seq.seq_id].append(token)
            keep = [i for i, seq in enumerate(going)
                    if len(proposals[seq.seq_id]) < wanted[seq.seq_id]]
            if not keep:
                return proposals
            going = [dataclasses.replace(
                going[i], token_ids=[proposals[going[i].seq_id][-1]],
                start_pos=ends[going[i].seq_id] + len(proposals[going[i].seq_id]) - 1)
                for i in keep]
            out, nexts = self._run(going, nexts[keep], kv_caches)
