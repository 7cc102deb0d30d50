"""Real img2dataset output as an input: img2dataset downloads from a loopback HTTP server into
WebDataset shards (tar + parquet), and our `webdataset` source re-curates them."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from curate.contract import read_ledger
from curate.recipe import parse_recipe
from tools.demo.server import LoopbackHTTPServer
from tools.verify import verify

PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea, "rocket": data.rocket}


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    for name, load in PHOTOS.items():
        Image.fromarray(load()).save(root / f"{name}.jpg", quality=90)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = LoopbackHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_recurate_img2dataset_shards(tmp_path, server, shared_cluster):
    from img2dataset import download

    urls = tmp_path / "urls.csv"
    rows = [f"{server}/{name}.jpg,a photograph: {name}" for name in PHOTOS] + [f"{server}/missing.jpg,gone"]
    urls.write_text("url,caption\n" + "\n".join(rows) + "\n")
    shards = tmp_path / "i2d"
    download(
        url_list=str(urls), input_format="csv", url_col="url", caption_col="caption",
        output_format="webdataset", output_folder=str(shards), processes_count=1, thread_count=2,
        image_size=128, resize_mode="keep_ratio", timeout=10, enable_wandb=False,
        number_sample_per_shard=3,
    )
    tars = sorted(shards.glob("*.tar"))
    assert tars and sorted(shards.glob("*.parquet")), "img2dataset wrote no shards"

    recipe = parse_recipe({
        "name": "from-img2dataset",
        "sources": [{"kind": "webdataset", "name": "i2d", "path": str(shards)}],
        "stages": [{"kind": "image", "image_size": 64}, {"kind": "exact_dedup"}],
        "output": {"path": str(tmp_path / "out")},
        "cluster": {"n_workers": 1, "dashboard": False},
    })
    manifest = shared_cluster.run(recipe)
    ledger = read_ledger(tmp_path / "out").to_pylist()
    # img2dataset keeps successes only: the 404 never reaches its tars, so 4 inputs here
    assert manifest["counts"] == {"partitions": len(tars), "inputs": 4, "kept": 4, "dropped": 0}
    assert sorted(r["url"] for r in ledger) == sorted(f"{server}/{n}.jpg" for n in PHOTOS)
    assert all(r["domain"] == "127.0.0.1" and r["id"].startswith("i2d:") for r in ledger)
    assert verify(tmp_path / "out").ok
