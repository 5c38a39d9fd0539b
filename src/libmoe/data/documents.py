"""Documents with a domain label, and a corpus of them: what every text source yields
(`libmoe.data.corpus` for files and the embedded text, `libmoe.data.hub` for Hugging Face datasets)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    """One document's text, its domain label and where it came from."""

    text: str
    domain: str
    source: str


@dataclass
class Corpus:
    """Documents in source order, and the files skipped as not UTF-8."""

    documents: list[Document]
    skipped: list[str] = field(default_factory=list)

    @property
    def domains(self) -> list[str]:
        """Domain labels in first-seen order."""
        return list(dict.fromkeys(d.domain for d in self.documents))

    def __len__(self) -> int:
        return len(self.documents)
