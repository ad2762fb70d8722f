"""WebSearch: answer a question by searching a local corpus (BM25) and opening documents.

The corpus (`corpus.jsonl`: `id`, `title`, `text`) is shipped with the project; `facts.jsonl`
keeps the structured facts its country, element and planet documents state (`doc` names the
document), from which the seeded generator templates questions.

Tasks are JSONL rows: `task_id`, `question`, `answers` (acceptable answer strings; the first is
the reference) and `oracle` (the actions that solve it: `{"tool": "search", "args": {"query":
...}}`, `{"tool": "open", "args": {"id": ...}}`, ..., ending with `{"tool": "answer", "args":
{"answer": ...}}`). Answers are graded by SQuAD-normalized exact match (the reward) and token F1.

Generator difficulty: 1 asks forward questions (the capital of a country, the symbol of an
element), 2 (or more) reverse lookups (the country whose capital is X, the element with symbol
Y), whose query words are less distinctive. Generated questions whose oracle query does not put the
answer's document in the top results are never emitted. The held-out split is by the task id's
hash (`eval_fraction` of the question space).

Difficulty 0 is the tiny mode, for a tiny char-level model that can memorize a handful of fixed
strings but cannot copy unseen ones from its context (nor, in a few hundred steps, pick a name out
of the middle of a long prompt). It asks about a small fixed fact set: the position from the Sun of
3 planets (answered as the ordinal the document states, "first"; the digit is accepted too) and
the chemical symbol and the atomic number of 7 elements: 17 facts, each asked in 5 phrasings
behind 5 openers ("Quick question: ..."), 425 questions. The prompt is a fixed instruction line,
then the question, which ends with the entity's name: the name is then just before the reply, at
a fixed distance, and the names differ in their first and last letters. The protocol is the real
one over the real BM25 index: the oracle searches for the entity's name (`Venus`, which ranks its
document first), opens the document (`planet-venus`) and answers from it; the query, the id and
the answer each come from a fixed vocabulary of at most 17 strings, so a tiny model can learn the
whole episode. What it finds hardest is the relation (symbol or atomic number), which the answer
turn must take from the question, far back. The observations are short: the top 2 results as bare
`id: title` lines and the opened document's first sentence (which states the fact). The held-out
split is still by the task id's hash (86 of the 425 questions are held out), so held-out tasks are
never trained on, but the facts repeat between training and held-out tasks under other phrasings:
the tiny mode measures learning the protocol and the fact set, not generalizing to unseen facts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
from pathlib import Path

from envs.rows import TaskFormatError, check_fields, held_out, read_jsonl
from envs.base import GeneratedEnv, Task
from envs.websearch.grade import exact_match, f1, grade, normalize
from envs.websearch.search import (CORPUS, OPEN, SEARCH, WEBSEARCH_TOOLS, BM25, Doc, SearchTools,
                                   corpus_index, first_sentences, load_corpus, tokenize)
from rayrl.rollout.scaffolds import Action

SAMPLES = Path(__file__).with_name("samples.jsonl")
FACTS = Path(__file__).with_name("facts.jsonl")
TOP_K = 5
# tiny mode (difficulty 0): its entities, phrasings and short observations
TINY_TOP_K = 2
TINY_TOOLS = {"snippet_chars": 0, "open_sentences": 1}
# the entities' names differ in their first and in their last letter
TINY_PLANETS = ("Mercury", "Venus", "Earth")
TINY_ELEMENTS = ("Helium", "Neon", "Cobalt", "Zinc", "Silver", "Iodine", "Gold")
TINY_INSTRUCTION = "Search, open, then answer."
TINY_OPENERS = ("", "Quick question: ", "Tell me: ", "Please answer: ", "I wonder: ")
# every phrasing ends with the entity's name, at the end of the prompt: just before the reply
TINY_TEMPLATES = {
    "position": ("In order from the Sun, which planet is {s}?", "Which planet from the Sun is {s}?",
                 "Counting from the Sun, what is the position of {s}?", "Which place from the Sun holds {s}?",
                 "What is the position from the Sun of {s}?"),
    "symbol": ("What is the chemical symbol of {s}?", "Which symbol stands for the element {s}?",
               "What is the symbol for {s}?", "Which letters are the chemical symbol of {s}?",
               "Give the chemical symbol of {s}."),
    "number": ("What is the atomic number of {s}?", "Which atomic number belongs to {s}?",
               "Name the atomic number of the element {s}.", "Which atomic number is listed for {s}?",
               "Give the atomic number of {s}."),
}
_FIELDS = {"task_id": str, "question": str, "answers": list, "oracle": list}
_ORACLE_ARGS = {"search": ("query",), "open": ("id",), "answer": ("answer",)}


def parse_row(row, where: str) -> dict:
    check_fields(row, where, _FIELDS)
    if not row["answers"] or not all(isinstance(a, str) and normalize(a) for a in row["answers"]):
        raise TaskFormatError(f"{where}: field 'answers' must be a non-empty list of non-empty strings")
    for i, step in enumerate(row["oracle"]):
        tool = step.get("tool") if isinstance(step, dict) else None
        if tool not in _ORACLE_ARGS:
            raise TaskFormatError(f"{where}: field 'oracle'[{i}]: 'tool' must be one of {', '.join(_ORACLE_ARGS)}")
        args = step.get("args")
        if not isinstance(args, dict) or any(not isinstance(args.get(a), str) for a in _ORACLE_ARGS[tool]):
            raise TaskFormatError(f"{where}: field 'oracle'[{i}]: {tool} needs string args "
                                  f"{', '.join(_ORACLE_ARGS[tool])}")
    if not row["oracle"] or row["oracle"][-1]["tool"] != "answer" or \
            any(s["tool"] == "answer" for s in row["oracle"][:-1]):
        raise TaskFormatError(f"{where}: field 'oracle' must end with its one 'answer' action")
    return {k: row[k] for k in _FIELDS}


def load_tasks(path: str | Path) -> list[dict]:
    return read_jsonl(path, parse_row)


def oracle_actions(row: dict) -> list[Action]:
    """The oracle as scaffold actions (the last is the answer)."""
    return [Action(s["tool"], dict(s["args"])) for s in row["oracle"]]


def load_facts(path: str | Path = FACTS) -> list[dict]:
    return read_jsonl(path, lambda row, where: row)


def _templates(fact: dict, difficulty: int) -> list[tuple[str, list[str], str]]:
    """(question, answers, query) for one fact at one difficulty."""
    s, kind = fact["subject"], fact["kind"]
    subject = [s] + fact.get("subject_aliases", [])
    if difficulty <= 1:
        if kind == "country":
            return [(f"What is the capital of {s}?", [fact["capital"]] + fact["capital_aliases"], f"capital of {s}"),
                    (f"On which continent is {s}?", [fact["continent"]], f"{s} country")]
        if kind == "element":
            return [(f"What is the chemical symbol of {s}?", [fact["symbol"]], f"{s} chemical symbol"),
                    (f"What is the atomic number of {s}?", [str(fact["atomic_number"])], f"{s} atomic number")]
        return [(f"Which planet is the {fact['ordinal']} planet from the Sun?", [s], f"{fact['ordinal']} planet from the Sun")]
    if kind == "country":
        return [(f"Which country has {fact['capital']} as its capital?", subject, f"capital {fact['capital']}")]
    if kind == "element":
        return [(f"Which chemical element has the symbol {fact['symbol']}?", subject, f"element symbol {fact['symbol']}"),
                (f"Which chemical element has atomic number {fact['atomic_number']}?", subject,
                 f"element atomic number {fact['atomic_number']}")]
    return [(f"Counting from the Sun, what is the position of the planet {s}?",
             [fact["ordinal"], str(fact["position"])], f"{s} planet from the Sun")]


def make_row(question: str, answers: list[str], query: str, doc: str) -> dict:
    oracle = [{"tool": "search", "args": {"query": query}}, {"tool": "open", "args": {"id": doc}},
              # the oracle answers in ASCII where an alias allows: small tokenizers may lack accents
              {"tool": "answer", "args": {"answer": next((a for a in answers if a.isascii()), answers[0])}}]
    task_id = "ws-" + hashlib.blake2b(question.encode(), digest_size=6).hexdigest()
    return {"task_id": task_id, "question": question, "answers": list(answers), "oracle": oracle}


def _tiny_question_space() -> tuple[dict, ...]:
    """Difficulty 0 (see the module docstring), shuffled with a fixed seed so that any prefix of
    the held-out questions covers the fact set. Each question is checked: its oracle query (the
    entity's name) finds the document among the tiny top results, and the document's shown first
    sentence states the first answer."""
    index, tools, out = corpus_index(), SearchTools(corpus_index(), TINY_TOP_K, **TINY_TOOLS), []
    facts = {(f["kind"], f["subject"]): f for f in load_facts()}
    asks = [(facts["planet", s], "position") for s in TINY_PLANETS] + \
           [(facts["element", s], rel) for s in TINY_ELEMENTS for rel in ("symbol", "number")]
    for fact, rel in asks:
        s, doc = fact["subject"], index.by_id[fact["doc"]]
        answers = {"position": [fact.get("ordinal"), str(fact.get("position"))],
                   "symbol": [fact.get("symbol")], "number": [str(fact.get("atomic_number"))]}[rel]
        if fact["doc"] not in {d.id for d, _ in index.search(s, TINY_TOP_K)} or \
                normalize(answers[0]) not in normalize(tools.view(doc)).split():
            raise ValueError(f"tiny mode: searching {s!r} does not show {fact['doc']} stating {answers[0]!r}")
        for opener in TINY_OPENERS:
            for template in TINY_TEMPLATES[rel]:
                question = template.format(s=s)
                question = opener + (question[0].lower() + question[1:] if opener else question)
                out.append({**make_row(question, answers, s, fact["doc"]),
                            "prompt": f"{TINY_INSTRUCTION}\n{question}"})
    random.Random(0).shuffle(out)
    return tuple(out)


@functools.lru_cache(maxsize=8)
def question_space(difficulty: int = 1) -> tuple[dict, ...]:
    """Every question the generator can ask at `difficulty`, in a fixed order, each one checked:
    its oracle query finds the answer's document in the top results, and the document's text
    states the first answer. Difficulty 0 (or less) is the tiny mode."""
    if difficulty <= 0:
        return _tiny_question_space()
    index, out = corpus_index(), []
    for fact in load_facts():
        doc = index.by_id[fact["doc"]]
        for question, answers, query in _templates(fact, min(max(difficulty, 1), 2)):
            if fact["doc"] in {d.id for d, _ in index.search(query, TOP_K)} and \
                    normalize(answers[0]) in normalize(f"{doc.title} {doc.text}"):
                out.append(make_row(question, answers, query, fact["doc"]))
    return tuple(out)


def generate(rng: random.Random, difficulty: int = 1) -> dict:
    """A templated question about one corpus fact (may be a held-out one: see WebSearchEnv)."""
    return dict(rng.choice(question_space(difficulty)))


class WebSearchEnv(GeneratedEnv):
    """Agentic: the tools are `search` and `open` (`tools`, for `get_scaffold(name, env.tools)`);
    `episode(task)` yields the episode's tools object (`make_tools`), and the submitted answer is
    scored by `verify` (normalized exact match; F1 in the info)."""

    domain = "websearch"
    tools = WEBSEARCH_TOOLS

    def __init__(self, cfg=None, seed: int = 0):
        super().__init__(getattr(cfg, "tool_latency", "none"), seed)
        self.difficulty = getattr(cfg, "websearch_difficulty", 1)
        self.eval_fraction = getattr(cfg, "eval_fraction", 0.2)
        self.top_k = getattr(cfg, "websearch_top_k", TOP_K)
        if self.difficulty <= 0:
            self.top_k = min(self.top_k, TINY_TOP_K)

    def generate_row(self, rng: random.Random) -> dict:
        return generate(rng, self.difficulty)

    @staticmethod
    def to_task(row: dict) -> Task:
        """The prompt is the question and the instruction to search, or the row's own `prompt`
        (the tiny mode's: the question last, so that its entity is just before the reply)."""
        prompt = row.get("prompt") or \
            f"{row['question']}\nSearch the documents to find out, then give just the answer."
        return Task(id=row["task_id"], prompt=prompt, answer=row["answers"][0], domain="websearch", meta=row)

    def make_tools(self, task: Task | None = None) -> SearchTools:
        """A tools object for `run_episode` (stateless over the shared index: nothing to tear down)."""
        return SearchTools(corpus_index(), self.top_k, **(TINY_TOOLS if self.difficulty <= 0 else {}))

    @contextlib.asynccontextmanager
    async def episode(self, task: Task):
        yield self.make_tools(task)

    async def score(self, task: Task, answer: str | None, tools=None) -> tuple[float, dict]:
        if answer is None:
            return 0.0, {"reason": "no answer", "em": 0.0, "f1": 0.0}
        return await self.verify(task, answer)

    def oracle_actions(self, task: Task) -> list[Action]:
        return oracle_actions(task.meta)

    def eval_tasks(self, n: int) -> list[Task]:
        """The first n held-out questions (fewer if the question space holds fewer)."""
        rows = [r for r in question_space(self.difficulty) if held_out(r["task_id"], self.eval_fraction)]
        return [self.to_task(r) for r in rows[:n]]

    def demonstration(self, task: Task) -> str:
        return task.meta["oracle"][-1]["args"]["answer"] if "oracle" in task.meta else task.answer

    async def verify(self, task: Task, response: str) -> tuple[float, dict]:
        scores = grade(response, task.meta.get("answers") or [task.answer])
        return scores["em"], scores


__all__ = ["BM25", "CORPUS", "Doc", "FACTS", "OPEN", "SAMPLES", "SEARCH", "SearchTools", "TINY_TOP_K",
           "TaskFormatError", "WEBSEARCH_TOOLS", "WebSearchEnv", "corpus_index", "exact_match", "f1",
           "first_sentences", "generate", "grade", "load_corpus", "load_facts", "load_tasks", "make_row",
           "normalize", "oracle_actions", "parse_row", "question_space", "tokenize"]
