"""curate/captions/generation.py: the transformers backends on tiny RANDOM-weight models built from configs
(mechanics only: what they write is noise) and the chat-completions client against a real
server process on loopback (tools/servers/chat.py over the same models), its failure modes
scripted on the server: 500s, 429, a 400, malformed JSON, a dropped connection, an answer
slower than the deadline, a body dripped one byte at a time, an answer over the size cap."""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from curate.captions.generation import ChatCompletions, TransformersLM, TransformersVLM, folder_fingerprint

pytestmark = pytest.mark.usefixtures("loopback_only")


def jpeg(seed: int, size: tuple[int, int] = (40, 60)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()


def test_vlm_batches_give_the_same_captions_as_one_at_a_time(tiny_models):
    """Left-padded batched greedy decoding equals unbatched decoding, in fewer model calls."""
    images = [jpeg(i, (30 + 7 * i, 50)) for i in range(5)]
    batched = TransformersVLM(str(tiny_models[0]), device="cpu", batch_size=4, max_new_tokens=10)
    single = TransformersVLM(str(tiny_models[0]), device="cpu", batch_size=1, max_new_tokens=10)
    a, b = batched.caption(images, "Describe."), single.caption(images, "Describe.")
    assert [g.text for g in a] == [g.text for g in b] and all(g.ok and g.text for g in a)
    assert [g.truncated for g in a] == [g.truncated for g in b]
    assert (batched.calls, single.calls, batched.items) == (2, 5, 5)


def test_vlm_undecodable_bytes_are_a_decode_error_and_the_rest_still_caption(tiny_models):
    vlm = TransformersVLM(str(tiny_models[0]), device="cpu", max_new_tokens=4)
    out = vlm.caption([jpeg(0), b"\x89PNG not really", jpeg(1)], "Describe.")
    assert [g.error for g in out] == [None, "decode_error", None]
    assert out[0].text and out[2].text and "Error" in out[1].detail


def test_lm_batches_equal_single_prompts_and_report_truncation(tiny_models):
    prompts = ["Rewrite: a cat", "Rewrite: The Eiffel Tower in Paris, 1889, at night", "hi"]
    lm = TransformersLM(str(tiny_models[1]), device="cpu", batch_size=3, max_new_tokens=6)
    one = TransformersLM(str(tiny_models[1]), device="cpu", batch_size=1, max_new_tokens=6)
    a, b = lm.complete(prompts), one.complete(prompts)
    assert [g.text for g in a] == [g.text for g in b]
    # deterministic weights (seed 1) that never reach <eos> in 6 tokens: every answer was cut
    assert [g.truncated for g in a] == [g.truncated for g in b] == [True, True, True]
    assert lm.calls == 1 and one.calls == 3


def test_a_batch_that_fails_is_retried_item_by_item_and_a_failing_item_is_a_code(tiny_models, monkeypatch):
    """Fault injection: generate raises for any batch of more than one prompt, and for the prompt
    "boom" (as an out-of-memory or a refused input would): the others still come back."""
    lm = TransformersLM(str(tiny_models[1]), device="cpu", batch_size=4, max_new_tokens=3)
    lm.load()
    real = lm._model.generate

    def fragile(**kw):
        if kw["input_ids"].shape[0] > 1 or lm.tokenizer.decode(kw["input_ids"][0]).endswith("boom<|assistant|>"):
            raise RuntimeError("CUDA out of memory (injected)")
        return real(**kw)

    monkeypatch.setattr(lm._model, "generate", fragile)
    out = lm.complete(["one", "boom", "three"])
    assert [g.error for g in out] == [None, "generation_error", None]
    assert "out of memory" in out[1].detail and out[0].text and out[2].text


def test_an_lm_without_a_chat_template_is_refused(tiny_models, tmp_path):
    copy = tmp_path / "plain"
    shutil.copytree(tiny_models[1], copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    import json

    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        TransformersLM(str(copy), device="cpu").load()


def test_model_ids_follow_the_weights(tiny_models, tmp_path):
    """The fingerprint of a folder changes when its weights change (another seed), not when the
    same model is built again."""
    from tools.demo.tiny_models import build_tiny_lm

    again = build_tiny_lm(tmp_path / "again", seed=1)
    other = build_tiny_lm(tmp_path / "other", seed=2)
    assert folder_fingerprint(again) == folder_fingerprint(tiny_models[1])
    assert folder_fingerprint(other) != folder_fingerprint(tiny_models[1])
    assert TransformersLM(str(again)).model_id.startswith("again@")


# ---------------------------------------------------------------------------------------------
# the chat-completions client against a real server process


def _client(server, model: str = "llm", **kw) -> ChatCompletions:
    kw = {"concurrency": 1, "timeout_s": 5.0, "retries": 2, "backoff_s": 0.01, "max_tokens": 6, **kw}
    return ChatCompletions(server.base_url, model, **kw)


def test_server_answers_equal_the_local_backend_and_concurrent_requests_batch(chat_server, tiny_models):
    """Greedy answers through the server equal the same model run locally; 8 requests in flight
    reach the server's batcher together (its largest batch is > 1)."""
    chat_server.reset()
    prompts = [f"Rewrite caption number {i}" for i in range(16)]
    client = _client(chat_server, concurrency=8)
    remote = client.complete(prompts)
    local = TransformersLM(str(tiny_models[1]), device="cpu", batch_size=1, max_new_tokens=6).complete(prompts)
    assert [g.text for g in remote] == [g.text for g in local]
    assert [g.truncated for g in remote] == [g.truncated for g in local]
    stats = chat_server.stats()
    assert stats["completions"] == 16 and stats["max_batch"] > 1 and client.calls == 16


def test_server_captions_images_sent_as_data_urls(chat_server, tiny_models):
    chat_server.reset()
    images = [jpeg(3), jpeg(4)]
    remote = _client(chat_server, "vlm").caption(images, "Describe.")
    local = TransformersVLM(str(tiny_models[0]), device="cpu", batch_size=1, max_new_tokens=6).caption(images, "Describe.")
    assert [g.text for g in remote] == [g.text for g in local] and all(g.ok for g in remote)


@pytest.mark.parametrize("steps, error, requests", [
    ([{"mode": "status", "status": 500}], None, 2),                     # retried, then answered
    ([{"mode": "status", "status": 429}], None, 2),
    ([{"mode": "malformed"}], None, 2),
    ([{"mode": "drop"}], None, 2),
    ([{"mode": "slow", "delay_s": 4}], None, 2),                         # past the 1.5 s deadline
    ([{"mode": "status", "status": 503}] * 3, "http_503", 3),           # retries (2) exhausted
    ([{"mode": "malformed"}] * 3, "bad_response", 3),
    ([{"mode": "status", "status": 400}], "http_400", 1),               # a 4xx is not retried
])
def test_failure_modes_are_retried_or_reported_with_a_code(chat_server, steps, error, requests):
    chat_server.reset()
    chat_server.script(*steps)
    client = _client(chat_server, timeout_s=1.5)
    [g] = client.complete(["hello"])
    assert g.error == error, g
    assert (g.text is not None) == (error is None)
    assert client.calls == requests == chat_server.stats()["requests"]


def test_a_dripping_server_cannot_stretch_the_total_deadline(chat_server):
    """One byte every 0.5 s (a body of ~70 bytes: ~35 s): the 1 s deadline ends the attempt.
    The bound is generous (a hang fails it, a slow machine does not)."""
    chat_server.reset()
    chat_server.script({"mode": "drip", "delay_s": 0.5})
    client = _client(chat_server, timeout_s=1.0, retries=0)
    start = time.monotonic()
    [g] = client.complete(["hello"])
    assert g.error == "timeout" and time.monotonic() - start < 15


def test_an_answer_over_the_size_cap_is_a_bad_response(chat_server):
    chat_server.reset()
    chat_server.script({"mode": "reply", "text": "x" * 5000})
    [g] = _client(chat_server, max_response_bytes=1000).complete(["hello"])
    assert g.error == "bad_response" and "over 1000 bytes" in g.detail


def test_a_server_that_is_not_there_is_a_connection_error(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    client = ChatCompletions(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff_s=0.01, timeout_s=2)
    [g] = client.complete(["hello"])
    assert g.error == "connection_error" and client.calls == 2


def test_base_url_must_be_http():
    with pytest.raises(ValueError, match="base_url"):
        ChatCompletions("file:///etc/passwd", "m")
