"""Token counts: the recipe's tokenizer (a tokenizer.json, or a folder holding one) counts the
words of every kind; its id names the file's content; a missing local tokenizer fails at load."""

from __future__ import annotations

import json
import pickle

import pytest

from curate.documents import dump_json
from curate.recipe import RecipeError, parse_recipe
from curate.tokens import TokenCounter
from tools.demo.docs import prose, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "demo-bpe" / "tokenizer.json"
    return train_tokenizer([" ".join(prose(t)) for t in ("assignment", "types", "compound")], path, 512)


def test_counts_every_kind_with_the_same_words(tokenizer):
    counter = TokenCounter(str(tokenizer.parent))  # the folder form
    text = "The assignment statement binds names to objects.\n\nIt may also modify items."
    n = counter.count("text", {"text": text})
    assert n > 10
    segments = [{"type": "text", "text": "The assignment statement binds names to objects."},
                {"type": "image", "image": 0, "url": "x"}, {"type": "text", "text": "It may also modify items."}]
    assert counter.count("doc", {"segments": dump_json(segments)}) == n
    assert counter.count("pair", {"caption": "The assignment statement"}) < n
    assert counter.count("text", {"text": ""}) == 0
    assert counter.id.startswith("demo-bpe@") and len(counter.id) == len("demo-bpe@") + 12
    assert TokenCounter(str(tokenizer), id="mine").id == "mine"
    clone = pickle.loads(pickle.dumps(counter))  # shipped to workers without the model
    assert clone.count("text", {"text": text}) == n


def test_missing_local_tokenizer_fails_at_load(tmp_path):
    recipe = {"name": "t", "sources": [{"kind": "url_list", "name": "u", "path": str(tmp_path / "u.txt")}],
              "output": {"path": str(tmp_path / "out")}, "tokenizer": {"path": str(tmp_path / "none.json")}}
    with pytest.raises(RecipeError, match="tokenizer.path.*no tokenizer.json"):
        parse_recipe(recipe)
    recipe["tokenizer"] = {"path": "gpt2"}  # a hub name: loaded only when counting
    assert parse_recipe(json.loads(json.dumps(recipe))).tokenizer.path == "gpt2"
