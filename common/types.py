"""The document both engines handle (protobuf lives only in services/)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    id: str
    title: str = ""
    text: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def embedding_text(self) -> str:
        """What the embedder sees: title and body, as BEIR evaluates dense models."""
        return f"{self.title} {self.text}".strip()
