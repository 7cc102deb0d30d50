"""Sources: where curation inputs come from. Importing a module registers its source kinds."""

from curate.sources.base import SOURCES, Partition, Source, SourceConfig, build_source
from curate.sources import image_folder, url_list, webdataset  # noqa: F401  (register their kinds)
from curate.sources import html_files, obelics, text_corpus, warc  # noqa: F401  (docs and text)

__all__ = ["SOURCES", "Partition", "Source", "SourceConfig", "build_source"]
