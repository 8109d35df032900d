"""The fake upstream's `POST /v1/embeddings`: OpenAI's wire format, deterministic vectors, a crude notion of meaning.

A text's vector is a signed feature hash (DIMENSIONS wide, L2-normalised) of its character bigrams
(unigrams for one-character runs) of Chinese, its Latin words cut to four letters, and, weighted more,
the CONCEPTS its phrases name: so a paraphrase that shares no word with a passage ("when do I get my
money back?" and "Refunds reach your card...") still lands near it, as with a real embedding model,
while the same text always gets the same vector.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from services.common.errors import KefuError

DIMENSIONS = 256
CONCEPT_WEIGHT = 4.0
CONCEPTS: Mapping[str, tuple[str, ...]] = {
    "refund": ("refund", "money back", "reimburse", "退款", "退钱", "返还", "钱退"),
    "shipping": ("ship", "deliver", "dispatch", "发货", "寄出", "送达", "快递", "物流"),
    "return": ("return", "send back", "send it back", "退货", "退回", "寄回"),
    "price": ("price", "cost", "how much", "价格", "多少钱", "价钱", "费用"),
    "hours": ("opening hours", "open", "营业时间", "几点", "开门"),
}
"""Phrases (lower case) that mean the same thing: a text containing one gets the concept's feature."""

_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
_LATIN_WORD = re.compile(r"[a-z0-9]+")


class EmbeddingsRequestError(KefuError, ValueError):
    """A body the real API refuses with 400; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def features(text: str) -> dict[str, float]:
    lowered = text.lower()
    found: dict[str, float] = {}
    for word in _LATIN_WORD.findall(lowered):
        found[f"w:{word[:4]}"] = found.get(f"w:{word[:4]}", 0.0) + 1.0
    for run in _CJK_RUN.findall(lowered):
        grams = [run[i:i + 2] for i in range(len(run) - 1)] if len(run) > 1 else [run]
        for gram in grams:
            found[f"c:{gram}"] = found.get(f"c:{gram}", 0.0) + 1.0
    for concept, phrases in CONCEPTS.items():
        if any(phrase in lowered for phrase in phrases):
            found[f"concept:{concept}"] = CONCEPT_WEIGHT * max(1.0, math.sqrt(sum(found.values())) / 2)
    return found


def fake_vector(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """The deterministic, L2-normalised vector of `text` (all zeros only for a text with no feature)."""
    vector = np.zeros(dimensions, dtype=np.float64)
    for feature, weight in features(text).items():
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        slot = int.from_bytes(digest[:4], "little") % dimensions
        vector[slot] += weight if digest[4] & 1 else -weight
    norm = float(np.linalg.norm(vector))
    values: list[float] = (vector / norm if norm else vector).astype(np.float32).tolist()
    return values


def parse_embeddings_request(body: object) -> tuple[str, list[str], str, int]:
    """(model, inputs, encoding_format, dimensions) of a valid body; EmbeddingsRequestError as the real API
    answers."""
    if not isinstance(body, dict):
        raise EmbeddingsRequestError("We could not parse the JSON body of your request.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise EmbeddingsRequestError("you must provide a model parameter", "model")
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) for item in inputs):
        raise EmbeddingsRequestError("'$.input' is invalid. Please check the API reference: "
                                     "https://platform.openai.com/docs/api-reference.", "input")
    if len(inputs) > 2048 or any(not item for item in inputs):
        raise EmbeddingsRequestError("'$.input' is invalid. Please check the API reference: "
                                     "https://platform.openai.com/docs/api-reference.", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise EmbeddingsRequestError(f"Invalid value: '{encoding}'. Supported values are: 'float' and 'base64'.",
                                     "encoding_format")
    dimensions = body.get("dimensions", DIMENSIONS)
    if type(dimensions) is not int or not 1 <= dimensions <= 3072:
        raise EmbeddingsRequestError("Invalid 'dimensions': expected an integer between 1 and 3072.", "dimensions")
    return model, inputs, encoding, dimensions


def embeddings_response(model: str, inputs: Sequence[str], encoding: str, tokens: int,
                        dimensions: int = DIMENSIONS) -> dict[str, object]:
    """The body: {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}."""
    data = []
    for index, text in enumerate(inputs):
        vector = fake_vector(text, dimensions)
        embedding: list[float] | str = vector if encoding == "float" else base64.b64encode(
            np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
