"""The WebSearch domain's local "web": a small shipped corpus, a BM25 index over it, and the
`search` and `open` tools the agent calls.

BM25 (Okapi, k1=1.5, b=0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5)), which is never
negative) over lowercase word tokens, in numpy. Each distinct query term counts once. Ranking is
deterministic: by score, ties broken by corpus order; documents that share no term with the query
are not returned.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from envs.rows import check_fields, read_jsonl, unique_ids
from rayrl.rollout.scaffolds import Action, Tool

CORPUS = Path(__file__).with_name("corpus.jsonl")
_TOKEN = re.compile(r"\w+", re.UNICODE)

SEARCH = Tool("search", ("query",), "search the document collection; returns the top results as 'id: title — snippet'")
OPEN = Tool("open", ("id",), "open a document by its id and read its full text")
WEBSEARCH_TOOLS = (SEARCH, OPEN)


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    text: str


def load_corpus(path: str | Path = CORPUS) -> list[Doc]:
    def doc(row, where: str) -> Doc:
        check_fields(row, where, {"id": str, "title": str, "text": str})
        return Doc(row["id"], row["title"], row["text"])
    return read_jsonl(path, unique_ids(doc, "id", lambda d: d.id))


class BM25:
    def __init__(self, docs: list[Doc], k1: float = 1.5, b: float = 0.75):
        self.docs, self.k1, self.b = list(docs), k1, b
        self.by_id = {d.id: d for d in self.docs}
        tokens = [tokenize(f"{d.title} {d.text}") for d in self.docs]
        self.vocab = {t: i for i, t in enumerate(sorted({t for ts in tokens for t in ts}))}
        tf = np.zeros((len(self.docs), len(self.vocab)), np.float64)
        for i, ts in enumerate(tokens):
            for t in ts:
                tf[i, self.vocab[t]] += 1
        lengths = tf.sum(1)
        df = (tf > 0).sum(0)
        n = len(self.docs)
        self.idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
        norm = k1 * (1.0 - b + b * lengths / max(lengths.mean(), 1e-9))
        self._weights = tf * (k1 + 1.0) / (tf + norm[:, None])     # per doc and term, before idf

    def scores(self, query: str) -> np.ndarray:
        cols = sorted({self.vocab[t] for t in tokenize(query) if t in self.vocab})
        if not cols:
            return np.zeros(len(self.docs))
        return self._weights[:, cols] @ self.idf[cols]

    def search(self, query: str, k: int = 5) -> list[tuple[Doc, float]]:
        s = self.scores(query)
        order = np.lexsort((np.arange(len(s)), -s))    # score descending, then corpus order
        return [(self.docs[i], float(s[i])) for i in order[:k] if s[i] > 0]


@functools.lru_cache(maxsize=4)
def corpus_index(path: str = str(CORPUS)) -> BM25:
    """The shared index over a corpus file (built once per process)."""
    return BM25(load_corpus(path))


def snippet(text: str, chars: int = 90) -> str:
    if len(text) <= chars:
        return text
    cut = text[:chars].rsplit(" ", 1)[0]
    return cut + " …"


def first_sentences(text: str, n: int) -> str:
    """The first n sentences of text (split after '.', '!' or '?' followed by a space)."""
    return " ".join(re.split(r"(?<=[.!?]) ", text)[:n])


class SearchTools:
    """The tools object for `run_episode`: `search` and `open` over a BM25 index.

    `snippet_chars`: the snippet length of a result line (0: lines are just `id: title`);
    `open_sentences`: how many sentences `open` shows (None: the whole text). The short settings are
    the tiny mode's (see envs.websearch); the defaults are the full observations."""

    def __init__(self, index: BM25 | None = None, k: int = 5, snippet_chars: int = 90,
                 open_sentences: int | None = None):
        self.index, self.k = index if index is not None else corpus_index(), k
        self.snippet_chars, self.open_sentences = snippet_chars, open_sentences

    def result_line(self, doc: Doc) -> str:
        if self.snippet_chars <= 0:
            return f"{doc.id}: {doc.title}"
        return f"{doc.id}: {doc.title} — {snippet(doc.text, self.snippet_chars)}"

    def view(self, doc: Doc) -> str:
        """What `open` shows of a document."""
        text = doc.text if self.open_sentences is None else first_sentences(doc.text, self.open_sentences)
        return f"{doc.title}\n\n{text}"

    async def run(self, action: Action) -> str:
        if action.kind == "search":
            query = action.args["query"].strip()
            hits = self.index.search(query, self.k)
            if not hits:
                return f"no results for {query!r}"
            return "\n".join(self.result_line(d) for d, _ in hits)
        if action.kind == "open":
            doc = self.index.by_id.get(action.args["id"].strip())
            if doc is None:
                return f"no document with id {action.args['id']!r}; open an id from the search results"
            return self.view(doc)
        raise ValueError(f"no tool runs action {action.kind!r}")
