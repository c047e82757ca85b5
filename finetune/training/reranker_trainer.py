"""RerankerTrainer: the EmbeddingTrainer for a cross-encoder (``finetune.model.cross_encoder.CrossEncoderModel``).

A batch is the collator's (question, document) pairs (positives first, then each query's hard negatives); the
model scores them and the reranker objective (``finetune.objectives.reranking``) turns the scores into the loss.
Everything else (samplers, saving, checkpoints, resume, the non-finite guard, component logs, evaluation calls)
is the EmbeddingTrainer's.
"""

from __future__ import annotations

from finetune.training.trainer import EmbeddingTrainer


class RerankerTrainer(EmbeddingTrainer):
    """``objective``: a ``RerankerObjective``; ``evaluator``: a ``RerankEvaluator`` (or None)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores = model(inputs["doc_input_ids"], inputs["doc_attention_mask"], inputs.get("doc_token_type_ids"))  # (B*(1+k),)
        output = self.objective(scores, inputs["query_input_ids"].shape[0], inputs.get("doc_scores"))
        loss = output.loss
        if model.training:
            if self.guard.check(loss, "loss", self.state.global_step + 1):
                self.components.add(output.components)
            else:  # skipped: a zero loss that still reaches every parameter (DDP's reducer expects them)
                loss = scores.sum() * 0.0
        return (loss, {"scores": scores}) if return_outputs else loss
