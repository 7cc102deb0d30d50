"""Tiny random-weight Hugging Face models built from configs, saved as ordinary model folders: a
LLaVA-architecture vision-language model (CLIP vision tower + Llama decoder) and a Llama chat
model, with a byte-level BPE tokenizer trained here and a chat template. They exist so the
recaptioning stage's real loading and generation code (AutoProcessor, AutoModelForImageTextToText,
AutoModelForCausalLM, chat templates, batched greedy generate) runs in tests and the demo with
nothing downloaded. RANDOM WEIGHTS: what they write is noise; they test mechanics, not quality.

    python -m tools.demo.tiny_models OUT_DIR      # OUT_DIR/vlm and OUT_DIR/llm

Building is deterministic for a seed (the same bytes each time), so a demo run's caption cache
stays valid when the demo rebuilds them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<pad>", "<eos>", "<image>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
IMAGE_SIZE, PATCH = 28, 14  # a 2 x 2 patch grid: 4 image tokens (+ CLS, dropped)


def _tokenizer(texts: list[str] | None = None):
    from transformers import PreTrainedTokenizerFast  # heavy, optional (vecap extra)

    texts = texts or [
        "a photo of a cat sitting on a wooden table next to a window",
        "The Eiffel Tower in Paris, built in 1889, seen from the river at night",
        "two dogs run across a green park on a sunny day in May",
        "a red bicycle leaning against a brick wall in London",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left", chat_template=CHAT_TEMPLATE)


def _llama(tok, seed: int):
    from transformers import LlamaConfig  # heavy, optional (vecap extra)

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)


def _finish(model, tok, out: Path) -> Path:
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def build_tiny_vlm(out: str | Path, seed: int = 0) -> Path:
    """A LLaVA-architecture model (random weights) + its processor in `out`."""
    # heavy optional dependencies (vecap extra): torch, transformers
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, \
        LlavaProcessor

    tok = _tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32),
        text_config=_llama(tok, seed), image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    out = _finish(model, tok, Path(out))
    processor.save_pretrained(out)
    return out


def build_tiny_lm(out: str | Path, seed: int = 1) -> Path:
    """A Llama chat model (random weights) + its tokenizer (with the chat template) in `out`."""
    # heavy optional dependencies (vecap extra): torch, transformers
    import torch
    from transformers import LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama(tok, seed))
    out = _finish(model, tok, Path(out))
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    args = ap.parse_args(argv)
    root = Path(args.out)
    print(build_tiny_vlm(root / "vlm"), build_tiny_lm(root / "llm"))


if __name__ == "__main__":
    main()
