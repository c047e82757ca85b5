"""Multiple-negatives ranking loss over query and document embeddings (pure functions).

Batch layout used everywhere in this project: for B queries with k hard negatives each,
documents are ordered ``[pos_0 .. pos_{B-1}, neg_0_0 .. neg_0_{k-1}, neg_1_0 .., neg_{B-1}_{k-1}]``,
so query i's positive is document i and its own negatives are ``B + i*k .. B + i*k + k - 1``.

With several data-parallel processes the documents of all of them are concatenated, one such
block per process (``num_shards`` blocks); the local queries belong to block ``shard_index``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEGATIVE_MODES = ("shared", "exclusive")


def ranking_scores(
    query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    doc_keys: torch.Tensor | None = None,
    *,
    num_negatives: int,
    scale: float = 20.0,
    mode: str = "shared",
    shard_index: int = 0,
    num_shards: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled cosine scores of each query against its candidate documents, in fp32, and the target columns.

    Shapes:
        query_emb: (B, D); doc_emb: (S*B*(1+k), D), S = num_shards blocks in the layout above;
        doc_keys: optional (S*B*(1+k),) int64 content hashes of the document texts.
        returns scores and labels (B,):
        ``shared`` (B, S*B*(1+k)): every query against every document of every block (sentence-transformers);
        ``exclusive`` (B, S*B + k): every positive of every block plus only the query's own k negatives (NeMo).

    scale = 1/temperature. A candidate whose key equals the key of the query's positive (the same
    text appearing twice in the global batch) gets -inf: it is neither a negative nor the target.
    """
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"Unknown hard-negative mode {mode!r}; expected one of {NEGATIVE_MODES}.")
    batch = query_emb.shape[0]
    block = batch * (1 + num_negatives)
    if doc_emb.shape[0] != num_shards * block:
        raise ValueError(
            f"Expected {num_shards}*{batch}*(1+{num_negatives}) = {num_shards * block} documents "
            f"for {batch} queries, got {doc_emb.shape[0]}.")
    rows = torch.arange(batch, device=query_emb.device)
    # fp32 whatever the autocast dtype: logits of scale 100 overflow fp16 softmax.
    query = F.normalize(query_emb.float(), dim=-1)  # (B, D)
    docs = F.normalize(doc_emb.float(), dim=-1)  # (S*B*(1+k), D)
    keys = None if doc_keys is None else doc_keys.view(num_shards, block)
    if mode == "shared" or num_negatives == 0:  # without hard negatives the two modes coincide
        scores = query @ docs.T  # (B, S*block)
        labels = shard_index * block + rows
        candidate_keys = None if keys is None else keys.reshape(1, -1).expand(batch, -1)
    else:
        blocks = docs.view(num_shards, block, -1)
        positives = blocks[:, :batch].reshape(num_shards * batch, -1)  # (S*B, D)
        negatives = blocks[shard_index, batch:].view(batch, num_negatives, -1)  # (B, k, D)
        scores = torch.cat([query @ positives.T, torch.einsum("bd,bkd->bk", query, negatives)], dim=1)  # (B, S*B+k)
        labels = shard_index * batch + rows
        candidate_keys = None
        if keys is not None:
            positive_keys = keys[:, :batch].reshape(1, -1).expand(batch, -1)  # (B, S*B)
            own_negative_keys = keys[shard_index, batch:].view(batch, num_negatives)  # (B, k)
            candidate_keys = torch.cat([positive_keys, own_negative_keys], dim=1)
    scores = scores * scale
    if candidate_keys is not None:
        target_keys = candidate_keys.gather(1, labels.unsqueeze(1))  # (B, 1)
        duplicate = candidate_keys == target_keys  # (B, C)
        duplicate[rows, labels] = False  # the positive itself stays
        scores = scores.masked_fill(duplicate, float("-inf"))
    return scores, labels


def ranking_loss(
    query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    doc_keys: torch.Tensor | None = None,
    *,
    directions: tuple[str, ...] = ("query_to_doc",),
    all_query_emb: torch.Tensor | None = None,
    query_keys: torch.Tensor | None = None,
    false_negatives: torch.Tensor | None = None,
    hardness_weighting: float = 0.0,
    **options,
) -> torch.Tensor:
    """Mean cross-entropy of each query against its positive among its candidates (fp32 scalar).

    Shapes and options (num_negatives, scale, mode, shard_index, num_shards) as in :func:`ranking_scores`.
    ``directions`` beyond ``query_to_doc`` add the candidates of :func:`direction_scores` to the same
    softmax (they need ``all_query_emb`` (S*B, D), and ``query_keys`` for duplicate masking).
    ``false_negatives``: optional (B, C) bool over the candidates of :func:`ranking_scores` (e.g.
    :func:`false_negative_mask`): those get -inf, the positive never. ``hardness_weighting`` alpha > 0 weights
    every negative of the softmax by its hardness (:func:`hardness_weighted_scores`). Off (None, 0), the loss
    is the plain one, operation for operation.
    """
    scores, labels = ranking_scores(query_emb, doc_emb, doc_keys, **options)
    if false_negatives is not None:
        false_negatives = false_negatives.clone()
        false_negatives[torch.arange(scores.shape[0], device=scores.device), labels] = False
        scores = scores.masked_fill(false_negatives, float("-inf"))
    if tuple(directions) != ("query_to_doc",):
        if "query_to_doc" not in directions:
            raise ValueError("The ranking directions must include 'query_to_doc': it holds the target pair.")
        extra = direction_scores(query_emb, query_emb if all_query_emb is None else all_query_emb, doc_emb,
                                 directions=tuple(directions), query_keys=query_keys, doc_keys=doc_keys,
                                 num_negatives=options["num_negatives"], scale=options.get("scale", 20.0),
                                 shard_index=options.get("shard_index", 0), num_shards=options.get("num_shards", 1))
        scores = torch.cat([scores, extra], dim=1)
    if hardness_weighting:
        scores = hardness_weighted_scores(scores, labels, alpha=hardness_weighting, scale=options.get("scale", 20.0))
    return F.cross_entropy(scores, labels)


# ------------------------------------------------------------------ false negatives and hard-negative weighting
FALSE_NEGATIVE_GUIDES = ("self", "teacher", "model")


def false_negative_mask(guide_scores: torch.Tensor, labels: torch.Tensor, *, margin: float) -> torch.Tensor:
    """Candidates that a guide scores too close to the query's positive to be trusted as negatives (GISTEmbed).

    Candidate j of query i is a likely false negative when ``guide(i, j) > guide(i, positive_i) - margin``:
    margin 0 drops what the guide ranks above the positive, a larger margin drops more. The positive is never
    dropped, nor a candidate the guide cannot score (-inf: a duplicate already masked, or no teacher score).

    Shapes: guide_scores (B, C), any units (cosine, a teacher's score), -inf where undefined; labels (B,) the
    positive's column -> (B, C) bool, True = drop.
    """
    rows = torch.arange(guide_scores.shape[0], device=guide_scores.device)
    positive = guide_scores[rows, labels].unsqueeze(1)  # (B, 1)
    mask = guide_scores > positive - margin  # -inf and NaN compare False
    mask[rows, labels] = False
    return mask


def teacher_guide_scores(doc_scores: torch.Tensor, *, batch: int, num_negatives: int, mode: str = "shared",
                         doc_keys: torch.Tensor | None = None, shard_index: int = 0,
                         num_shards: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's scores in the candidate layout of :func:`ranking_scores`, where it has them (fp32), and the
    target columns.

    The records carry a teacher score for each query's own positive and own k hard negatives only; every other
    candidate (the in-batch ones) gets -inf, so that :func:`false_negative_mask` keeps it. An own negative
    with the positive's text (``doc_keys``) gets -inf too: :func:`ranking_scores` masks it already.

    Shapes: doc_scores (S*B*(1+k),) in the document layout; doc_keys optional, the same -> scores (B, C), C as
    in :func:`ranking_scores` (``shared`` S*B*(1+k), ``exclusive`` S*B + k), and labels (B,).
    """
    own = own_teacher_scores(doc_scores, batch=batch, num_negatives=num_negatives, shard_index=shard_index,
                             num_shards=num_shards)  # (B, 1+k), column 0 the positive
    block = batch * (1 + num_negatives)
    if doc_keys is not None and num_negatives:
        local_keys = doc_keys.view(num_shards, block)[shard_index]  # int64: no float rounding of the hashes
        duplicate = local_keys[batch:].view(batch, num_negatives) == local_keys[:batch, None]  # (B, k)
        own[:, 1:] = own[:, 1:].masked_fill(duplicate, float("-inf"))
    rows = torch.arange(batch, device=doc_scores.device)
    if mode == "shared" or num_negatives == 0:
        guide = own.new_full((batch, num_shards * block), float("-inf"))
        start = shard_index * block
        labels = start + rows
        negatives = start + batch + rows[:, None] * num_negatives + torch.arange(num_negatives, device=rows.device)
        guide.scatter_(1, negatives, own[:, 1:])  # (B, k): negative j of query i is document start + B + i*k + j
    else:
        guide = own.new_full((batch, num_shards * batch + num_negatives), float("-inf"))
        labels = shard_index * batch + rows
        guide[:, num_shards * batch:] = own[:, 1:]
    guide[rows, labels] = own[:, 0]
    return guide, labels


def hardness_weighted_scores(scores: torch.Tensor, labels: torch.Tensor, *, alpha: float,
                             scale: float = 20.0) -> torch.Tensor:
    """Logits whose softmax weights each negative by its hardness: the positive's logit unchanged, negative j's
    plus log w_ij, so that the denominator is ``exp(s_i+) + sum_j w_ij exp(s_ij)``.

    ``w_ij = exp(alpha cos_ij) / mean_j' exp(alpha cos_ij')`` over query i's negatives (finite scores other than
    the positive; cos = score / scale), detached: an importance weighting of the negatives towards the hard ones,
    as in the hard-negative contrastive loss of Robinson et al., "Contrastive Learning with Hard Negative
    Samples" (ICLR 2021), whose beta (on logits) is alpha x temperature here. The mean weight is 1, so alpha -> 0
    gives the plain loss; the weights carry no gradient, only where the gradient goes.

    Shapes: scores (B, C) fp32 scaled cosines, -inf where masked; labels (B,) -> (B, C).
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    negative = torch.isfinite(scores)
    negative[rows, labels] = False
    hardness = torch.where(negative, alpha * scores.detach() / scale, float("-inf"))  # (B, C)
    count = negative.sum(1, keepdim=True).clamp(min=1).to(scores.dtype)  # (B, 1)
    log_mean = torch.logsumexp(hardness, dim=1, keepdim=True) - count.log()  # log of the mean of exp(hardness)
    return scores + torch.where(negative, hardness - log_mean, 0.0)


# ------------------------------------------------------------------ more in-batch directions (GTE's joint softmax)
DIRECTIONS = ("query_to_doc", "doc_to_query", "query_to_query", "doc_to_doc")


def direction_scores(
    query_emb: torch.Tensor,
    all_query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    *,
    directions: tuple[str, ...],
    num_negatives: int,
    scale: float = 20.0,
    query_keys: torch.Tensor | None = None,
    doc_keys: torch.Tensor | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
) -> torch.Tensor:
    """Scaled cosine scores of the extra in-batch directions, to join query i's softmax (GTE's improved contrastive loss).

    For each local query i with positive d_i, the target stays s(q_i, d_i) (the ``query_to_doc`` scores
    of :func:`ranking_scores`); these candidates are added to its partition function:
    ``doc_to_query`` s(d_i, q_j) for every other query j; ``query_to_query`` s(q_i, q_j), j != i;
    ``doc_to_doc`` s(d_i, d_j) for every other positive d_j, all over the global batch.

    Shapes: query_emb (B, D) the local queries; all_query_emb (S*B, D) the queries of every process in
    rank order (= query_emb with S = 1); doc_emb (S*B*(1+k), D) in the layout above; query_keys (S*B,) and
    doc_keys (S*B*(1+k),) optional content hashes. Returns (B, C) fp32 scores, C = S*B per direction
    beyond ``query_to_doc``, in the order of DIRECTIONS. Masked (-inf): the pair itself, a query with the
    same text as q_i, a positive with the same text as d_i, and for ``doc_to_query`` a query whose own
    positive has d_i's text (it is d_i's true query, not a negative).
    """
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"Unknown ranking direction(s) {sorted(unknown)}; expected some of {DIRECTIONS}.")
    batch = query_emb.shape[0]
    block = batch * (1 + num_negatives)
    rows = torch.arange(batch, device=query_emb.device)
    own = shard_index * batch + rows  # each local query's index among all queries (and all positives)
    query = F.normalize(query_emb.float(), dim=-1)  # (B, D)
    all_queries = F.normalize(all_query_emb.float(), dim=-1)  # (S*B, D)
    all_positives = F.normalize(doc_emb.float(), dim=-1).view(num_shards, block, -1)[:, :batch].reshape(
        num_shards * batch, -1)  # (S*B, D), positive j belongs to query j
    own_positive = all_positives[own]  # (B, D)
    self_pair = torch.zeros((batch, num_shards * batch), dtype=torch.bool, device=query_emb.device)
    self_pair[rows, own] = True
    same_query = self_pair if query_keys is None else query_keys[None, :] == query_keys[own][:, None]  # (B, S*B)
    same_positive = self_pair
    if doc_keys is not None:
        positive_keys = doc_keys.view(num_shards, block)[:, :batch].reshape(-1)  # (S*B,)
        same_positive = positive_keys[None, :] == positive_keys[own][:, None]  # (B, S*B)
    parts = []
    if "doc_to_query" in directions:
        parts.append((own_positive @ all_queries.T).masked_fill(self_pair | same_query | same_positive, float("-inf")))
    if "query_to_query" in directions:
        parts.append((query @ all_queries.T).masked_fill(self_pair | same_query, float("-inf")))
    if "doc_to_doc" in directions:
        parts.append((own_positive @ all_positives.T).masked_fill(self_pair | same_positive, float("-inf")))
    if not parts:
        return query.new_zeros((batch, 0))
    return torch.cat(parts, dim=1) * scale


# ------------------------------------------------------------------------------------------- distillation
DISTILLATION_KINDS = ("kl", "margin_mse")


def own_candidate_scores(query_emb: torch.Tensor, doc_emb: torch.Tensor, *, num_negatives: int, shard_index: int = 0,
                         num_shards: int = 1) -> torch.Tensor:
    """Cosine of each local query with its own positive and its own k hard negatives, fp32.

    Shapes: query_emb (B, D); doc_emb (S*B*(1+k), D) in the layout above -> (B, 1+k), column 0 the positive.
    """
    batch = query_emb.shape[0]
    block = batch * (1 + num_negatives)
    docs = F.normalize(doc_emb.float(), dim=-1).view(num_shards, block, -1)[shard_index]  # (B*(1+k), D)
    query = F.normalize(query_emb.float(), dim=-1)
    positives, negatives = docs[:batch], docs[batch:].view(batch, num_negatives, -1)
    return torch.cat([(query * positives).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", query, negatives)], dim=1)


def own_teacher_scores(doc_scores: torch.Tensor, *, batch: int, num_negatives: int, shard_index: int = 0,
                       num_shards: int = 1) -> torch.Tensor:
    """The teacher scores of the same candidates as :func:`own_candidate_scores`: (S*B*(1+k),) -> (B, 1+k) fp32."""
    block = batch * (1 + num_negatives)
    local = doc_scores.float().view(num_shards, block)[shard_index]
    return torch.cat([local[:batch, None], local[batch:].view(batch, num_negatives)], dim=1)


def kl_distillation_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, *, scale: float = 20.0,
                         teacher_temperature: float = 1.0) -> torch.Tensor:
    """Listwise distillation: KL(teacher || student) over each query's own candidates, mean over queries (fp32).

    Shapes: student_scores, teacher_scores (B, 1+k). The student's distribution is softmax(scale x cosine)
    (the ranking loss's logits), the teacher's softmax(teacher score / teacher_temperature).
    """
    teacher = F.log_softmax(teacher_scores.float() / teacher_temperature, dim=-1)
    student = F.log_softmax(student_scores.float() * scale, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True)


def margin_mse_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, *, scale: float = 20.0,
                    teacher_temperature: float = 1.0) -> torch.Tensor:
    """MarginMSE: mean squared difference of positive-minus-negative margins, in logits.

    Student logits = scale x cosine, teacher logits = teacher score / teacher_temperature (1 for a
    cross-encoder's logits; the student's temperature for a bi-encoder teacher's cosines).
    Shapes: student_scores, teacher_scores (B, 1+k), k >= 1 -> scalar over the B*k margins (fp32).
    """
    student = student_scores.float() * scale
    teacher = teacher_scores.float() / teacher_temperature
    return F.mse_loss(student[:, :1] - student[:, 1:], teacher[:, :1] - teacher[:, 1:])
