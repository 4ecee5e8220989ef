"""Build a plain-text corpus directory from Debian packages or local files.

A corpus directory holds ``train.jsonl`` and ``val.jsonl`` (one document per line:
``{"text": ..., "source": ..., "doc": ...}``) and ``manifest.json`` (sources, licences, counts,
file hashes). Whole documents are held out for validation, so no validation text is ever
seen in training, by the tokenizer or by the model.

The default English corpus (~90 MB) is assembled from Debian packages that ship prose
(novels, a Bible translation, software manuals, a dictionary). They are fetched with
``apt-get download`` into a cache (no system install) and read straight from the ``.deb``
with ``dpkg-deb --fsys-tarfile``; every format is parsed here in pure Python
(``perl_doc`` needs ``perl``, which every Debian system has).

One job per file: ``clean`` (prose cleaning and document sizes), ``debian`` (reading each
package's format), ``sources`` (the table of built-in sources), ``apt`` (fetching .deb files),
``local`` (the user's own files), ``build`` (split and manifest), ``read`` (reading a corpus).
"""

from raptr.data.corpus.clean import TARGET_DOC_CHARS, MAX_DOC_CHARS, MIN_DOC_CHARS, _NOT_LETTERS, _is_prose, _squash, _UNDERLINE, _RST_ROLE, _RST_LINK, _RST_LITERAL, _BACKTICK, _STRONG, _SUBST, _LINKGIT, _ASCIIDOC_XREF, _inline_markup, _markup_prose, _HTMLText, _html_prose, _split_long, _group, _merge_small  # noqa: F401
from raptr.data.corpus.debian import Members, _r_character_vectors, _CHAPTER, _VOLUME, _ITALIC, _extract_austen, _sword_entries, _osis_text, _extract_sword, _doc_id, _extract_rst, _extract_html, _POD_SCRIPT, _extract_pod, _extract_jargon, _GCIDE_TAG_LINE, _GCIDE_PRON, _GCIDE_PAREN_CODES, _GCIDE_CODE, _extract_gcide, _extract_wordnet  # noqa: F401
from raptr.data.corpus.sources import DebianSource, SOURCES, GROUPS  # noqa: F401
from raptr.data.corpus.apt import _NO_APT, default_cache_dir, _deb_version, _version_key, _cached_deb, _run, _apt_update, _resolve_package, _apt_download, fetch_debs, _deb_members  # noqa: F401
from raptr.data.corpus.local import _LOCAL_TEXT, _LOCAL_TABLE, _read_text_file, _text_docs, _local_docs, _table_docs  # noqa: F401
from raptr.data.corpus.build import MANIFEST, SPLITS, FORMAT, _expand, _val_indices, _stats, _write_jsonl, write_json, build_corpus  # noqa: F401
from raptr.data.corpus.read import load_manifest, manifest_hash, iter_documents, iter_texts  # noqa: F401
