"""The README's quick-start recipes (recipes/curate/examples/) run as shipped.

Each test loads the shipped YAML with only its input and output paths overridden (the URL list's
download stage also allows 127.0.0.0/8, where the test's server runs), on a handful of tiny real
inputs made in tmp: photographs bundled with scikit-image, a URL parquet served by the demo's
loopback HTTP server, a jsonl of a few paragraphs. Each runs on the session's `shared_cluster`
and checks what each input became and that `tools.verify.verify` passes on the output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from curate.contract import read_manifest, read_sidecars
from curate.recipe import load_recipe
from tools.cli import main
from tools.demo.server import serve
from tools.verify import verify

pytestmark = pytest.mark.usefixtures("loopback_only")

EXAMPLES = Path(__file__).resolve().parents[2] / "recipes" / "curate" / "examples"
PHOTOS = {  # name -> (scikit-image sample, caption)
    "astronaut": ("astronaut", "An astronaut in a white suit beside the flag"),
    "coffee": ("coffee", "A cup of coffee on a saucer, seen from above"),
    "cat": ("chelsea", "A tabby cat looking to the side"),
    "rocket": ("rocket", "A rocket on its launch pad under a clear sky"),
}


def write_photos(folder: Path) -> None:
    """The four photographs as 160 px JPEGs (small: the test is about the recipe, not the images)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (sample, _) in PHOTOS.items():
        image = Image.fromarray(getattr(skdata, sample)()).convert("RGB")
        image.thumbnail((160, 160))
        image.save(folder / f"{name}.jpg", quality=90)


def run_example(cluster, name: str, inputs: Path, out: Path, **overrides) -> dict:
    recipe = load_recipe(EXAMPLES / name, {"sources.0.path": str(inputs), "output.path": str(out), **overrides})
    manifest = cluster.run(recipe)
    report = verify(out)
    assert report.ok, report
    return manifest


def test_image_folder(shared_cluster, tmp_path, capsys):
    folder = tmp_path / "my_images"
    write_photos(folder)
    for name, (_, caption) in PHOTOS.items():
        (folder / f"{name}.txt").write_text(caption)
    shutil.copy(folder / "coffee.jpg", folder / "zz_coffee_copy.jpg")  # the same bytes: exact_dedup
    (folder / "zz_coffee_copy.txt").write_text("The same cup of coffee again")
    shutil.copy(folder / "cat.jpg", folder / "short.jpg")
    (folder / "short.txt").write_text("cat")  # under min_chars: dropped before any image work

    manifest = run_example(shared_cluster, "image-folder.yaml", folder, tmp_path / "out")

    assert manifest["counts"]["inputs"] == 6
    assert manifest["kinds"]["pair"]["count"] == manifest["counts"]["kept"] == 4
    assert manifest["drops"] == {"caption_length_filter/caption_too_short": 1, "exact_dedup/duplicate": 1}

    # `mm1 curate --limit 2`: a dry run of the first two inputs, into its own output
    address = shared_cluster.cluster.scheduler_address
    argv = ["curate", str(EXAMPLES / "image-folder.yaml"), "--override", f"sources.0.path={folder}",
            "--output", str(tmp_path / "out"), "--limit", "2", "--address", address, "--no-progress"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert f"dry run: the first 2 inputs of each source -> {tmp_path / 'out'}.limit-2" in said, said
    dry = read_manifest(f"{tmp_path / 'out'}.limit-2")
    assert dry["counts"] == {**dry["counts"], "inputs": 2, "kept": 2} and verify(f"{tmp_path / 'out'}.limit-2").ok


def test_url_parquet(shared_cluster, tmp_path):
    www = tmp_path / "www"
    write_photos(www)
    with serve(www) as base:
        rows = [{"url": f"{base}/img/{name}.jpg", "caption": caption, "license": f"cc-by-{i}"}
                for i, (name, (_, caption)) in enumerate(PHOTOS.items())]
        rows.append({"url": f"{base}/img/gone.jpg", "caption": "A picture that is not there", "license": "?"})
        rows.append(dict(rows[0]))  # the same URL again: fetched once
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, tmp_path / "my_urls.parquet")
        manifest = run_example(shared_cluster, "url-parquet.yaml", tmp_path / "my_urls.parquet", tmp_path / "out",
                               **{"stages.2.allow_networks": ["127.0.0.0/8"]})

    assert manifest["counts"]["inputs"] == 6
    assert manifest["kinds"]["pair"]["count"] == manifest["counts"]["kept"] == 4
    assert manifest["drops"] == {"download/http_404": 1, "url_dedup/duplicate": 1}
    carried = read_sidecars(tmp_path / "out", "pair", columns=["meta_license"]).column("meta_license")
    assert sorted(carried.to_pylist()) == ["cc-by-0", "cc-by-1", "cc-by-2", "cc-by-3"]


TEXTS = [
    "The lighthouse stands on a rocky point at the mouth of the harbour. Its keeper climbs the spiral "
    "stairs each evening to light the lamp, and ships coming home from the north steer by its beam.",
    "Bread dough needs time to rise. Mix flour, water, salt and a little yeast, knead it until it is "
    "smooth, then leave it covered in a warm kitchen for an hour or two before shaping the loaves.",
    "A glacier moves slowly down its valley under its own weight. As it flows it scrapes the rock "
    "beneath, carrying stones and sand that it drops far away when the ice finally melts in summer.",
    "Bees return to the hive and dance to tell the others where the flowers are. The angle of the "
    "dance shows the direction from the sun, and its length tells how far the workers must fly.",
]
FRENCH = ("Le phare se dresse sur une pointe rocheuse à l'entrée du port. Chaque soir, le gardien monte "
          "l'escalier en colimaçon pour allumer la lampe, et les navires rentrent guidés par sa lumière.")


def test_jsonl_texts(shared_cluster, tmp_path):
    lines = [{"id": f"doc-{i}", "text": text} for i, text in enumerate(TEXTS)]
    lines += [{"id": "copy", "text": TEXTS[1]},  # a repeated text: minhash_dedup keeps one
              {"id": "stub", "text": "Too short to be a document."},  # under min_words
              {"id": "fr", "text": FRENCH}]  # not English
    corpus = tmp_path / "my_texts.jsonl"
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))

    manifest = run_example(shared_cluster, "jsonl-texts.yaml", corpus, tmp_path / "out")

    assert manifest["counts"]["inputs"] == 7
    assert manifest["kinds"]["text"]["count"] == manifest["counts"]["kept"] == 4
    assert manifest["drops"] == {"language_filter/lang_mismatch": 1, "doc_rules/too_few_words": 1,
                                 "minhash_dedup/duplicate": 1}
