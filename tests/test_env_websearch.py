"""WebSearch through the full multi-turn loop: BM25 over the shipped corpus, the oracle's
search/open actions replayed as model turns reach the answer and score 1.0 under both scaffolds;
wrong answers score 0 and F1 gives partial credit."""

import random

import pytest

from envs.websearch import (SAMPLES, WEBSEARCH_TOOLS, BM25, Doc, SearchTools, TaskFormatError, WebSearchEnv,
                            corpus_index, f1, generate, grade, load_corpus, load_facts, load_tasks, normalize,
                            oracle_actions, parse_row, question_space)
from rayrl.config import GRPOConfig
from rayrl.models import chat_prompt_ids, load_tokenizer, resolve_model_path
from rayrl.rollout.agent import EpisodeLimits, TurnTemplate, play_task, run_episode
from rayrl.rollout.engine import SamplingParams
from rayrl.rollout.scaffolds import Action, get_scaffold
from rayrl.rollout.replay import ReplayPolicy


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(GRPOConfig().model))


async def play(tokenizer, env, task, actions, scaffold_name):
    """One episode: replay `actions` (the last an answer) as model turns; grade what was submitted."""
    scaffold = get_scaffold(scaffold_name, WEBSEARCH_TOOLS)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    policy = ReplayPolicy(tokenizer, [scaffold.render(a) for a in actions], stop)
    episode = await run_episode(policy, tokenizer, scaffold,
                                chat_prompt_ids(tokenizer, task.prompt, system=scaffold.system_prompt()),
                                env.make_tools(task), SamplingParams(stop_token_ids=(stop,)),
                                EpisodeLimits(), TurnTemplate(tokenizer, stop_ids=(stop,)))
    assert episode.end_reason == "answer", episode.end_reason
    reward, info = await env.verify(task, episode.answer)
    return reward, info, episode, tokenizer.decode(policy.contexts[-1])


def test_corpus_is_small_and_consistent():
    docs = load_corpus()
    assert 60 <= len(docs) <= 150 and len({d.id for d in docs}) == len(docs)
    by_id = {d.id: d for d in docs}
    for fact in load_facts():   # every structured fact is stated by its document
        text = by_id[fact["doc"]].text
        for key in ("subject", "capital", "continent", "symbol", "ordinal"):
            if key in fact:
                assert fact[key] in text, (fact["doc"], key)


@pytest.mark.parametrize("query, doc", [
    ("capital of France", "country-france"), ("What is the chemical symbol of gold?", "element-gold"),
    ("fourth planet from the Sun", "planet-mars"), ("Mercury planet", "planet-mercury"),
    ("Mercury element atomic number", "element-mercury"), ("longest bone in the body", "sci-bones"),
    ("boiling point of water", "sci-water"), ("Which country has Abuja as its capital?", "country-nigeria"),
])
def test_bm25_ranks_the_relevant_document_first(query, doc):
    assert corpus_index().search(query, 5)[0][0].id == doc


def test_bm25_scores_match_the_formula_and_rank_deterministically():
    docs = [Doc("a", "A", "apple apple banana"), Doc("b", "B", "banana cherry"), Doc("c", "C", "cherry")]
    index = BM25(docs, k1=1.5, b=0.75)
    import math
    lens = [4, 3, 2]              # title + text tokens
    avg = sum(lens) / 3
    idf = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))      # apple: in one document
    tf, norm = 2, 1.5 * (1 - 0.75 + 0.75 * lens[0] / avg)
    assert index.scores("apple")[0] == pytest.approx(idf * tf * 2.5 / (tf + norm))
    assert index.scores("Apple APPLE")[0] == pytest.approx(index.scores("apple")[0])   # distinct terms count once
    tie = BM25([Doc("x", "", "same words"), Doc("y", "", "same words")])
    assert [d.id for d, _ in tie.search("same")] == ["x", "y"]      # ties keep corpus order
    assert index.search("durian") == [] and index.search("") == []


async def test_tools_search_and_open():
    tools = SearchTools(k=3)
    out = await tools.run(Action("search", {"query": "capital of Japan"}))
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("country-japan: Japan — ")
    assert "Tokyo" in await tools.run(Action("open", {"id": "country-japan"}))
    assert "no document with id 'nope'" in await tools.run(Action("open", {"id": "nope"}))
    assert "no results" in await tools.run(Action("search", {"query": "zzzqqq"}))


@pytest.mark.parametrize("scaffold_name", ["xml", "json"])
async def test_oracles_solve_sample_and_generated_tasks(tokenizer, scaffold_name):
    env = WebSearchEnv()
    rows = load_tasks(SAMPLES) + [generate(random.Random(s), difficulty=d) for s in range(3) for d in (1, 2)]
    assert len(load_tasks(SAMPLES)) >= 8
    for row in rows:
        task = env.to_task(row)
        reward, info, episode, transcript = await play(tokenizer, env, task, oracle_actions(row), scaffold_name)
        assert reward == 1.0 and info == {"em": 1.0, "f1": 1.0}, row["task_id"]
        assert episode.answer == env.demonstration(task)
        # the tools really ran: every opened document's text reached the model's context
        for action in oracle_actions(row):
            if action.kind == "open":
                assert corpus_index().by_id[action.args["id"]].text[:40] in transcript


@pytest.mark.parametrize("scaffold_name", ["xml", "json"])
async def test_env_protocol_plays_oracle_and_wrong_episodes(tokenizer, scaffold_name):
    """The generic path (`play_task`: env.tools, env.episode, env.score, env.oracle_actions)."""
    env, stop = WebSearchEnv(), tokenizer.convert_tokens_to_ids("<|im_end|>")
    render = get_scaffold(scaffold_name, env.tools).render
    params, limits = SamplingParams(stop_token_ids=(stop,)), EpisodeLimits()
    for row in load_tasks(SAMPLES):
        task = env.to_task(row)
        policy = ReplayPolicy(tokenizer, [render(a) for a in env.oracle_actions(task)], stop)
        episode, reward, info = await play_task(env, task, policy, tokenizer, scaffold_name, params, limits)
        assert reward == 1.0 and info["end_reason"] == "answer", row["task_id"]
    policy = ReplayPolicy(tokenizer, ["no tool call here"], stop)
    _, reward, info = await play_task(env, task, policy, tokenizer, scaffold_name, params, limits)
    assert reward == 0.0 and info["end_reason"].startswith("invalid")


async def test_oracle_searches_find_the_documents_they_open():
    index = corpus_index()
    for row in load_tasks(SAMPLES) + list(question_space(1)) + list(question_space(2)):
        hits = set()
        for step in row["oracle"]:
            if step["tool"] == "search":
                hits |= {d.id for d, _ in index.search(step["args"]["query"], 5)}
            elif step["tool"] == "open":
                assert step["args"]["id"] in hits, row["task_id"]


async def test_wrong_answers_score_zero(tokenizer):
    env = WebSearchEnv()
    rows = {r["task_id"]: r for r in load_tasks(SAMPLES)}
    task = env.to_task(rows["ws-capital-australia"])
    wrong = oracle_actions(rows["ws-capital-australia"])[:-1] + [Action("answer", {"answer": "Sydney"})]
    for name in ("xml", "json"):
        reward, info, _, _ = await play(tokenizer, env, task, wrong, name)
        assert reward == 0.0 and info == {"em": 0.0, "f1": 0.0}
    for row in rows.values():   # every sample against another sample's answer
        other = next(r for r in rows.values() if r is not row)
        assert (await env.verify(env.to_task(row), other["answers"][0]))[0] == 0.0
    # a bad turn ends the episode with no answer, not an exception
    scaffold = get_scaffold("xml", WEBSEARCH_TOOLS)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    episode = await run_episode(ReplayPolicy(tokenizer, ["I think it is Sydney."], stop), tokenizer, scaffold,
                                chat_prompt_ids(tokenizer, task.prompt), env.make_tools(task),
                                SamplingParams(stop_token_ids=(stop,)), EpisodeLimits(),
                                TurnTemplate(tokenizer, stop_ids=(stop,)))
    assert episode.answer is None and episode.end_reason.startswith("invalid")


async def test_normalized_exact_match_and_f1_partial_credit():
    env = WebSearchEnv()
    task = env.to_task(next(r for r in load_tasks(SAMPLES) if r["task_id"] == "ws-dna-shape"))
    assert normalize("  The  Double-Helix! ") == "doublehelix"
    assert normalize("A double, helix.") == "double helix"
    assert (await env.verify(task, "A double helix."))[0] == 1.0
    reward, info = await env.verify(task, "a helix")          # 1 of 1 predicted, 1 of 2 gold: F1 = 2/3
    assert reward == 0.0 and info["em"] == 0.0 and info["f1"] == pytest.approx(2 / 3)
    # max over acceptable answers; precision 1/3, recall 1/2 -> F1 0.4
    assert f1("carbon dioxide gas", "carbon monoxide") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert grade("CO2", ["carbon dioxide", "CO2"]) == {"em": 1.0, "f1": 1.0}
    assert grade("", ["Paris"]) == {"em": 0.0, "f1": 0.0}


def test_generator_is_seeded_and_split():
    for difficulty in (1, 2):
        env = WebSearchEnv(type("Cfg", (), {"websearch_difficulty": difficulty})())
        a = [env.sample(random.Random(s)).id for s in range(5)]
        assert a == [env.sample(random.Random(s)).id for s in range(5)]
        held = {t.id for t in env.eval_tasks(20)}
        assert len(held) == 20 and held == {t.id for t in env.eval_tasks(20)}
        train = {env.sample(random.Random(s)).id for s in range(300)}
        assert len(train) > 40 and not held & train
    forward, reverse = {r["question"] for r in question_space(1)}, {r["question"] for r in question_space(2)}
    assert "What is the capital of France?" in forward and "Which country has Paris as its capital?" in reverse


def test_bad_rows_name_the_field(tmp_path):
    good = load_tasks(SAMPLES)[0]
    with pytest.raises(TaskFormatError, match="'answers' is missing"):
        parse_row({k: v for k, v in good.items() if k != "answers"}, "t.jsonl:1")
    with pytest.raises(TaskFormatError, match="t.jsonl:3: field 'answers' must be list"):
        parse_row({**good, "answers": "Canberra"}, "t.jsonl:3")
    with pytest.raises(TaskFormatError, match=r"'oracle'\[0\]: search needs string args query"):
        parse_row({**good, "oracle": [{"tool": "search", "args": {}}] + good["oracle"][1:]}, "t.jsonl:1")
    with pytest.raises(TaskFormatError, match="'oracle' must end with its one 'answer'"):
        parse_row({**good, "oracle": good["oracle"][:-1]}, "t.jsonl:1")
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"task_id": "x"\n')
    with pytest.raises(TaskFormatError, match="t.jsonl:1"):
        load_tasks(bad)


def test_bad_corpus_rows_name_the_file_line_and_field(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "title": "A", "text": "x"}\n{"id": "b", "title": 3, "text": "y"}\n')
    with pytest.raises(TaskFormatError, match="corpus.jsonl:2: field 'title' must be str"):
        load_corpus(corpus)
    corpus.write_text('{"id": "a", "title": "A", "text": "x"}\n\n{"id": "a", "title": "B", "text": "y"}\n')
    with pytest.raises(TaskFormatError, match=r"corpus.jsonl:3: field 'id' 'a' repeats .*corpus.jsonl:1"):
        load_corpus(corpus)
