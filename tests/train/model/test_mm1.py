"""The assembled MM1 on CPU with the tiny configs (random weights: mechanics, not quality):
image tokens land at the placeholders, two images in one sequence run forward and backward,
the loss counts text targets only, and the MoE variant adds its auxiliary losses."""

from __future__ import annotations

import pytest
import torch

from train.model.mm1 import IGNORE, MM1, text_labels
from train.model.registry import get_config


def _sequence(model: MM1, n_images: int, length: int = 40, seed: int = 0) -> torch.Tensor:
    """Text, an image run, text, another image run, text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, model.image_token_id, (length,), generator=g)
    run = torch.full((model.n_image_tokens,), model.image_token_id)
    parts, cut = [], length // (n_images + 1)
    for i in range(n_images):
        parts += [text[i * cut:(i + 1) * cut], run]
    parts.append(text[n_images * cut:])
    return torch.cat(parts).unsqueeze(0)


def _images(model: MM1, n: int) -> torch.Tensor:
    side = model.vision.image_size
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MM1(get_config("tiny"))


def test_two_images_in_one_sequence_forward_and_backward(tiny):
    tokens = _sequence(tiny, 2)
    labels = text_labels(tokens, tiny.image_token_id)
    out = tiny(tokens, _images(tiny, 2), labels=labels)
    assert out.logits is None  # with labels the loss is computed in chunks, the logits never held whole
    assert torch.isfinite(out.loss) and int(out.n_targets) == int((labels != IGNORE).sum())
    assert torch.allclose(out.loss, out.loss_sum / out.n_targets)
    out.total_loss.backward()
    for part in (tiny.vision, tiny.connector, tiny.decoder):  # the tiny tower trains
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    tiny.zero_grad()


def test_the_chunked_loss_equals_the_full_cross_entropy(tiny):
    """The chunked projection + cross-entropy (chunks of 7 positions here) gives the loss and the
    gradients of the whole-logits cross-entropy."""
    import torch.nn.functional as F

    from train.model.mm1 import chunked_cross_entropy

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (30,), generator=gen)
    labels[::4] = IGNORE
    ours = chunked_cross_entropy(hidden, weight, labels, chunk=7)
    g_ours = torch.autograd.grad(ours, (hidden, weight))
    full = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE, reduction="sum")
    g_full = torch.autograd.grad(full, (hidden, weight))
    torch.testing.assert_close(ours, full)
    for a, b in zip(g_ours, g_full):
        torch.testing.assert_close(a, b)


def test_image_embeddings_replace_the_placeholders(tiny):
    tokens = _sequence(tiny, 2)
    images = _images(tiny, 2)
    embeds = tiny.embed(tokens, images)
    slots = tokens[0] == tiny.image_token_id
    expected = tiny.image_embeddings(images).reshape(-1, tiny.cfg.decoder.dim)
    assert torch.equal(embeds[0, slots], expected)
    assert torch.equal(embeds[0, ~slots], tiny.decoder.embed(tokens)[0, ~slots])
    with pytest.raises(ValueError, match="image placeholder tokens for 1 images"):
        tiny.embed(tokens, images[:1])


def test_labels_cover_text_targets_only():
    tokens = torch.tensor([[5, 6, 9, 9, 7, 8, 0, 0]])  # 9: image placeholder, 0: padding
    doc_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    labels = text_labels(tokens, 9, doc_ids, pad_id=0)
    # 5->6 kept; 6->9 image; 9->9 image; 9->7 text (after an image); 7->8 crosses documents; 8->0 pad
    assert labels.tolist() == [[6, IGNORE, IGNORE, 7, IGNORE, IGNORE, IGNORE, IGNORE]]


def test_moe_variant_adds_its_auxiliary_losses():
    torch.manual_seed(0)
    model = MM1(get_config("tiny-moe"))
    tokens = _sequence(model, 1)
    out = model(tokens, _images(model, 1), labels=text_labels(tokens, model.image_token_id))
    assert set(out.aux_losses) == {"load_balance", "router_z"}
    assert out.total_loss > out.loss
    out.total_loss.backward()
    assert model.decoder is not None


def test_meta_build_then_init_gives_a_working_model():
    """How the trainer builds big models: on the meta device (no memory), then materialised and
    initialised in place."""
    with torch.device("meta"):
        model = MM1(get_config("tiny-moe"))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    tokens = _sequence(model, 1)
    out = model(tokens, _images(model, 1), labels=text_labels(tokens, model.image_token_id))
    assert torch.isfinite(out.total_loss)


def test_a_few_optimizer_steps_lower_the_loss_of_a_tiny_moe_mm1():
    """Mechanics of training (random init): AdamW on one fixed batch lowers the total loss, the
    MoE auxiliary losses included."""
    torch.manual_seed(0)
    model = MM1(get_config("tiny-moe"))
    tokens = _sequence(model, 2, length=60)
    images = _images(model, 2)
    labels = text_labels(tokens, model.image_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(tokens, images, labels=labels)
        opt.zero_grad()
        out.total_loss.backward()
        opt.step()
        losses.append(out.total_loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_decoder_from_a_local_hugging_face_checkpoint(tmp_path):
    """A decoder saved in Hugging Face's format (random weights) starts an MM1: same logits on
    text as the checkpoint's own decoder."""
    from train.model.hf import load_hf_decoder, save_hf
    from train.model.mm1 import with_pretrained_decoder

    torch.manual_seed(0)
    source = MM1(get_config("tiny"))
    save_hf(source.decoder, tmp_path / "llm", model_type="llama")
    model = with_pretrained_decoder(get_config("tiny"), str(tmp_path / "llm"))
    tokens = _sequence(model, 1)
    out = model(tokens, _images(model, 1))
    assert out.logits.shape[-1] == get_config("tiny").decoder.vocab_size
    text = torch.randint(0, model.image_token_id, (1, 12))
    reference = load_hf_decoder(tmp_path / "llm")(text).logits
    assert torch.allclose(model(text).logits, reference, atol=1e-6)
