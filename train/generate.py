"""Greedy decoding from an MM1 model, for checks and demos (not a serving path).

No KV cache: every step recomputes the full forward over prompt + generated tokens. That costs
O(steps x length) forwards' worth of attention instead of one, but it is simple, shares every line
with training (the same `MM1.forward`, so image splicing, RoPE positions and the attention mask are
exactly what the model was trained with) and needs nothing from the decoder beyond its forward.
For an MoE decoder this also keeps expert capacity as in training: capacity is computed over the
whole sequence of each forward, so a cached decoder would route differently.

The image placeholder id is never generated: its logit is masked to -inf at every step, because a
placeholder without an image behind it would make the next forward fail (its run count would no
longer match the images given) and, in the data, placeholders only ever come from images.
"""

from __future__ import annotations

import torch

from train.model.mm1 import MM1


def prompt_with_image(tok_ids_before: list[int], n_images: int, model: MM1) -> torch.LongTensor:
    """A prompt [1, S] in the pair layout the data path trains on (train/data/samples.py: [image
    run] caption [eos]): `n_images` runs of `model.n_image_tokens` placeholders, then the text ids
    `tok_ids_before` (the start of the text to continue; may be empty)."""
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if model.image_token_id in tok_ids_before:
        raise ValueError("the text ids contain the image placeholder id; images go in as runs only")
    ids = [model.image_token_id] * (n_images * model.n_image_tokens) + list(tok_ids_before)
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def greedy_generate(model: MM1, tokens: torch.LongTensor, images: torch.Tensor | None, *,
                    max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """The argmax continuation of `tokens` [1, S] (with `model.n_image_tokens` placeholders per image
    of `images` [N, 3, H, W], in order; None for a text-only prompt).

    Returns the new token ids only (not the prompt): at most `max_new_tokens` of them, fewer when
    `eos_id` is generated (it is included, as the last id) or when the sequence reaches the
    decoder's `max_seq_len` (the model cannot attend further). The image placeholder id is never
    among them. The model runs in eval mode and is put back in its previous mode afterwards; the
    forwards run on the device and dtype of `tokens`/`images` as given (the caller places them)."""
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be [1, S], got {tuple(tokens.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if eos_id is not None and eos_id == model.image_token_id:
        raise ValueError("eos_id is the image placeholder id, which is never generated")
    budget = min(max_new_tokens, model.cfg.decoder.max_seq_len - tokens.shape[1])
    was_training = model.training
    model.eval()
    try:
        seq = tokens
        generated: list[int] = []
        for _ in range(max(budget, 0)):
            logits = model(seq, images).logits[0, -1].float()
            logits[model.image_token_id] = float("-inf")
            nxt = int(logits.argmax())  # argmax takes the first maximum: ties break the same way every run
            generated.append(nxt)
            if nxt == eos_id:
                break
            seq = torch.cat([seq, seq.new_tensor([[nxt]])], dim=1)
        return generated
    finally:
        model.train(was_training)
