"""MM1, assembled: image encoder -> connector -> decoder, for one device.

A sequence carries its images as runs of placeholder tokens (`image_token_id`), `n_tokens` of
them per image, in reading order; the packer (train/data) writes them. `forward` encodes the
batch's images (all of them, in the order their runs appear: row by row, left to right), maps
each to `n_tokens` embeddings with the connector, and writes those over the placeholders' token
embeddings before the decoder runs. Any number of images per sequence works (MM1 packs up to
16); a run count that does not match the images given is an error, never a silent shift.

The loss is next-token cross-entropy over text targets only (`text_labels`): a position whose
next token is an image placeholder, padding, or the first token of another packed document
predicts nothing. With labels, the forward returns the loss as a SUM over the batch's targets
(`loss_sum`) and their count (`n_targets`), so the trainer can divide by the targets of a whole
optimizer step (every micro-batch, every rank) and the weight of a token does not depend on what
shares its micro-batch; `loss` is the batch's mean, for reading. The full-vocabulary logits are
never held for every position: the output projection and the cross-entropy run in chunks of
positions, each recomputed in backward (`chunked_cross_entropy`). MoE auxiliary losses (load
balance, router z, each summed over the MoE layers) are returned unweighted; `aux_total` is their
weighted sum, and `total_loss` = `loss` + `aux_total` (the per-batch objective).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.model.config import MM1Config
from train.model.connector import build_connector
from train.model.decoder import Decoder
from train.model.hf import load_hf_decoder
from train.model.moe import aux_loss
from train.model.vision import VisionEncoder

IGNORE = -100


CE_CHUNK = 2048  # positions per chunk of the output projection + cross-entropy


@dataclass
class MM1Output:
    logits: torch.Tensor | None  # [B, S, vocab]; None when labels were given (the loss is chunked)
    loss: torch.Tensor | None = None  # the mean language-model loss over the batch's text targets
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    total_loss: torch.Tensor | None = None  # loss + aux_total
    loss_sum: torch.Tensor | None = None  # the LM loss summed over the batch's text targets (fp32)
    n_targets: torch.Tensor | None = None  # how many targets that sum covers
    aux_total: torch.Tensor | None = None  # the weighted MoE auxiliary losses (0 for a dense decoder)


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int = CE_CHUNK) -> torch.Tensor:
    """Sum of next-token cross-entropy over the targets of `labels` [N] (IGNORE: none) for hidden
    states [N, D] and the output projection `weight` [vocab, D]. Each chunk of `chunk` positions
    is projected, scored in fp32 and dropped; backward recomputes its logits (activation
    checkpointing per chunk), so at most one chunk's [chunk, vocab] logits live at a time
    instead of [N, vocab] fp32 (800 MB for one 4096-token sequence at a 50k vocabulary), for
    about a third more output-projection FLOPs. No host synchronisation."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_ce_sum, h, weight, y, use_reentrant=False)
        else:
            total = total + _ce_sum(h, weight, y)
    return total


def text_labels(tokens: torch.Tensor, image_token_id: int, doc_ids: torch.Tensor | None = None,
                pad_id: int | None = None) -> torch.Tensor:
    """Targets for next-token prediction, aligned with `tokens` ([B, S]): labels[:, t] is
    tokens[:, t + 1] when that is a text token of the same document, else IGNORE."""
    labels = torch.full_like(tokens, IGNORE)
    nxt = tokens[:, 1:]
    keep = nxt != image_token_id
    if pad_id is not None:
        keep &= nxt != pad_id
    if doc_ids is not None:
        keep &= doc_ids[:, 1:] == doc_ids[:, :-1]
    labels[:, :-1] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE))
    return labels


def with_pretrained_decoder(cfg: MM1Config, path: str, image_token_id: int | None = None) -> "MM1":
    """MM1 whose decoder starts from a Hugging Face causal LM on local disk (Llama, Mistral,
    Qwen2 families: train/model/hf.py): the decoder's shape comes from the checkpoint's config,
    the vision tower and connector from `cfg`, freshly initialised (the tower from its
    `pretrained` weights). The placeholder token defaults to the checkpoint vocabulary's last id."""
    decoder = load_hf_decoder(path)
    with torch.device("meta"):
        model = MM1(replace(cfg, decoder=decoder.cfg, image_token_id=image_token_id))
    model.decoder = decoder
    model.vision.to_empty(device="cpu")
    model.connector.to_empty(device="cpu")
    model.vision.init_weights()
    model.connector.init_weights()
    return model


class MM1(nn.Module):
    def __init__(self, cfg: MM1Config):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.connector = build_connector(cfg.connector, self.vision.width, self.vision.grid, cfg.decoder.dim)
        self.decoder = Decoder(cfg.decoder)
        self.image_token_id = cfg.decoder.vocab_size - 1 if cfg.image_token_id is None else cfg.image_token_id
        self.n_image_tokens = cfg.connector.n_tokens

    def init_weights(self) -> None:
        """Initialise every part (the vision tower from `cfg.vision.pretrained`): what a model
        built on the meta device needs after `to_empty()`."""
        self.vision.init_weights()
        self.connector.init_weights()
        self.decoder.init_weights()

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, n_tokens, dim]."""
        return self.connector(self.vision(images))

    def embed(self, tokens: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        embeds = self.decoder.embed(tokens)
        slots = tokens == self.image_token_id
        n_images = 0 if images is None else images.shape[0]
        if tokens.is_cuda:  # checked on the device: reading the count would stall the host every batch
            torch._assert_async(slots.sum() == n_images * self.n_image_tokens,
                                "image placeholder tokens do not match the images given")
        elif int(slots.sum()) != n_images * self.n_image_tokens:
            raise ValueError(f"{int(slots.sum())} image placeholder tokens for {n_images} images of "
                             f"{self.n_image_tokens} tokens each")
        if n_images:
            image_embeds = self.image_embeddings(images).to(embeds.dtype)
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), image_embeds.reshape(-1, embeds.shape[-1]))
        return embeds

    def forward(self, tokens: torch.Tensor, images: torch.Tensor | None = None, *,
                doc_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> MM1Output:
        """`tokens` [B, S] with `n_tokens` placeholders per image; `images` [N, 3, H, W] in the
        placeholders' order; `doc_ids` [B, S] for packed sequences; `labels` [B, S] aligned with
        tokens (IGNORE where there is no target; `text_labels` makes them); `token_mask` [B, S]
        (True: a real token, False: padding, which MoE layers never route). With labels the
        logits are not returned (see the module docstring)."""
        out = self.decoder(embeds=self.embed(tokens, images), doc_ids=doc_ids, token_mask=token_mask,
                           project=labels is None)
        result = MM1Output(logits=out.logits, aux_losses=out.aux_losses)
        if labels is not None:
            flat = labels.flatten()
            result.loss_sum = chunked_cross_entropy(out.hidden.flatten(0, 1), self.decoder.output_weight, flat)
            result.n_targets = (flat != IGNORE).sum()
            result.loss = result.loss_sum / result.n_targets.clamp(min=1)
            result.aux_total = result.loss_sum.new_zeros(())
            moe = self.cfg.decoder.moe
            if moe is not None and out.aux_losses:
                result.aux_total = aux_loss(out.aux_losses, moe)
            result.total_loss = result.loss + result.aux_total
        return result
