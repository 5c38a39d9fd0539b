"""Corpora streamed from Hugging Face `datasets`: Hub datasets such as SlimPajama, or local data.

`load_hub_corpus(name)` streams ``datasets.load_dataset(name, config, split=..., streaming=True)``
and keeps the first ``max_documents`` records with non-blank text, so a sample of a corpus far
larger than the disk (SlimPajama-627B is ~900 GB) costs only what is read. ``name`` is a Hub id
(``"cerebras/SlimPajama-627B"``) or anything `load_dataset` accepts locally, e.g. a directory of
``.jsonl`` files whose split is inferred from its folder names (``train/``, ``validation/``, ...).

The domain label comes from a record field, dotted for nested dicts (SlimPajama's
``meta.redpajama_set_name``: ``RedPajamaWikipedia``, ``RedPajamaGithub``, ...); without one it is
the dataset name's last path component. `HUB_ALIASES` names ready-made settings
(``load_hub_corpus("slimpajama")``). `datasets` is optional: ``pip install 'libmoe[hub]'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

from ..overrides import lookup
from .documents import Corpus, Document

HUB_ALIASES: dict[str, dict[str, Any]] = {
    "slimpajama": dict(name="cerebras/SlimPajama-627B", domain_field="meta.redpajama_set_name"),
}

_DEFAULTS: dict[str, Any] = dict(config=None, split="train", text_field="text", domain_field=None)


def _unreachable(name: str, err: BaseException) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {name!r} could not be read: the Hugging Face Hub is unreachable (or offline mode "
        f"is on) or the name is wrong ({type(err).__name__}: {err})."
    )


def iter_hub_documents(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    domain_field: str | None = None,
    max_documents: int | None = 10_000,
    streaming: bool = True,
) -> Iterator[Document]:
    """Documents from the first `max_documents` records (None: all) of `name`'s `split` whose
    `text_field` is non-blank text, read lazily; see the module docstring. An alias in
    `HUB_ALIASES` supplies the name and defaults for the other settings, which arguments other
    than the default override. Each document's source is ``"{name}:{split}:{record index}"``.
    The dataset is opened (and errors about it raised) on the first ``next()``."""
    settings = dict(config=config, split=split, text_field=text_field, domain_field=domain_field)
    if name in HUB_ALIASES:
        alias = dict(HUB_ALIASES[name])
        name = alias.pop("name")
        for key, value in alias.items():
            if settings[key] == _DEFAULTS[key]:
                settings[key] = value
    config, split = settings["config"], settings["split"]
    text_field, domain_field = settings["text_field"], settings["domain_field"]
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents={max_documents} must be at least 1 (or None for all).")
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"reading {name!r} needs the Hugging Face `datasets` package: pip install 'libmoe[hub]'."
        ) from err

    # Every failure to locate or fetch the data surfaces as an OSError subclass: DatasetNotFoundError
    # and LocalEntryNotFoundError (FileNotFoundError), OfflineModeIsEnabled (ConnectionError),
    # HfHubHTTPError; in streaming mode they can also arrive while iterating.
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except OSError as err:
        raise _unreachable(name, err) from err
    except ValueError as err:  # e.g. an unknown split or config
        raise ValueError(
            f"dataset {name!r} could not be opened with config {config!r} and split {split!r} ({err})."
        ) from err

    default_domain = PurePath(name.rstrip("/\\")).name or name
    n = 0
    try:
        for index, record in enumerate(dataset):
            if index == 0 and text_field not in record:
                raise ValueError(
                    f"dataset {name!r} records have no {text_field!r} field (the first has "
                    f"{sorted(record)}); pass text_field=<one of them>."
                )
            text = record.get(text_field)
            if not isinstance(text, str) or not text.strip():
                continue
            domain = lookup(record, domain_field) if domain_field else None
            yield Document(text, default_domain if domain is None else str(domain),
                           f"{name}:{split}:{index}")
            n += 1
            if max_documents is not None and n >= max_documents:
                break
    except OSError as err:
        raise _unreachable(name, err) from err
    if n == 0:
        raise ValueError(f"dataset {name!r} split {split!r} holds no non-blank {text_field!r} text.")


def load_hub_corpus(name: str, **options: Any) -> Corpus:
    """All documents of `iter_hub_documents(name, **options)` in memory (mind `max_documents`)."""
    return Corpus(list(iter_hub_documents(name, **options)))


def hub_name(source: str) -> str | None:
    """The dataset name when `source` is a Hub source (``hf:NAME`` or an alias that is not an
    existing path), else None."""
    if source.startswith("hf:"):
        if not source[3:]:
            raise ValueError("data source 'hf:' names no dataset; write 'hf:NAME' (a Hub id or path).")
        return source[3:]
    if source in HUB_ALIASES and not Path(source).exists():
        return source
    return None
