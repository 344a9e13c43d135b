"""The OpenAI API as the official ``openai`` client uses it, against a live uvicorn on 127.0.0.1:
chat and completions equal the library's greedy output, streaming equals the whole answer,
stop, n, seeded sampling, unsupported fields and unknown models, and Prometheus ``/metrics``."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
import torch
from conftest import adapter_root, tiny_llama
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from moslora.serving import BASE, MultiAdapterModel
from moslora.serving.decoding import RowDecoder, Sampling
from benchmarks.loadtest import threaded_server, word_tokenizer
from moslora.serving.server import ApiKeys, create_app

TEMPLATE = "{% for m in messages %}w1 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w2{% endif %}"
PROMPT = "w5 w9 w17 w4"
CHAT = [{"role": "system", "content": "w30"}, {"role": "user", "content": "w5 w9"}]


def chat_tokenizer():
    tok = word_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return adapter_root(tmp_path_factory, "open")


def serve(root, tokenizer=None, **kwargs):
    mm = MultiAdapterModel(tiny_llama())
    mm.load_adapter("open", root / "open")
    return mm, create_app(mm, tokenizer or chat_tokenizer(), root, ApiKeys(), **kwargs)


@pytest.fixture(scope="module")
def live(root):
    mm, app = serve(root, batch_window=0.05)
    with threaded_server(app) as url:
        yield mm, url, openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=60)


def library_text(mm, model, ids, max_tokens):
    """The library's own greedy completion of token ids ``ids`` (the oracle)."""
    out = mm.generate(torch.tensor([ids]), adapter_names=[model], max_new_tokens=max_tokens, do_sample=False,
                      pad_token_id=0, eos_token_id=2)[0, len(ids):].tolist()
    return word_tokenizer().decode(out[: out.index(2)] if 2 in out else out, skip_special_tokens=True)


def chat_ids(messages):
    return chat_tokenizer().apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_completions_and_chat_equal_the_library_per_model(live):
    mm, _, client = live
    texts = set()
    for model in ("open", BASE):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
        assert r.object == "text_completion" and r.model == model
        assert r.choices[0].text == library_text(mm, model, word_tokenizer()(PROMPT)["input_ids"], 6)
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 6, 10)
        c = client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, temperature=0)
        assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
        assert c.choices[0].message.content == library_text(mm, model, chat_ids(CHAT), 5)
        assert c.usage.prompt_tokens == len(chat_ids(CHAT)) == 6  # w1 w30 w1 w5 w9 w2
        texts |= {r.choices[0].text, c.choices[0].message.content}
    assert len(texts) == 4, "the adapter and the template must change the answers"


def test_models_are_listed_and_retrieved(live):
    _, _, client = live
    assert [m.id for m in client.models.list()] == [BASE, "open"]
    assert client.models.retrieve("open").id == "open"
    with pytest.raises(openai.NotFoundError, match="no model 'nope'"):
        client.models.retrieve("nope")


def test_streaming_equals_the_whole_answer(live):
    _, _, client = live
    whole = client.completions.create(model="open", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="open", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) == 6 and "".join(texts) == whole  # one piece per token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6

    whole = client.chat.completions.create(model="open", messages=CHAT, max_tokens=5, temperature=0)
    chunks = list(client.chat.completions.create(model="open", messages=CHAT, max_tokens=5, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_stream_is_server_sent_events_ending_in_done(live):
    _, url, _ = live
    body = {"model": "open", "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "stream": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_text_before_them(live, stream):
    _, _, client = live
    prompt = "w7 w8 w9 w10"  # its greedy text has a word not seen before at position 2: w5 w94 w26 ...
    full = client.completions.create(model="open", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    words = full.split()
    k = next(k for k in range(2, len(words)) if words[k] not in words[:k])  # a word new at position k
    stop = " " + words[k]  # the text must end after k words
    expected = full[: full.find(stop)]
    r = client.completions.create(model="open", prompt=prompt, max_tokens=8, temperature=0, stop=["w999", stop],
                                  stream=stream)
    chunks = list(r) if stream else [r]
    text = "".join(c.choices[0].text for c in chunks)
    assert text == expected == " ".join(words[:k]) and stop not in text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_and_seeds(live):
    _, _, client = live

    def sample(seed, n=1, **kw):
        r = client.completions.create(model="open", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed, n=n, **kw)
        return [c.text for c in r.choices]

    assert sample(7) == sample(7), "a seed must reproduce"
    assert sample(7) != sample(8), "another seed must draw otherwise"
    three = sample(7, n=3)
    assert len(three) == 3 and len(set(three)) == 3 and three[0] == sample(7)[0]
    greedy = client.completions.create(model="open", prompt=PROMPT, max_tokens=12, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1] and greedy.choices[0].text == greedy.choices[1].text
    assert greedy.usage.completion_tokens == 24
    # top_p this small keeps only the most likely token: sampling becomes greedy
    assert sample(7, top_p=1e-6) == [greedy.choices[0].text]


def test_a_seed_reproduces_inside_a_mixed_batch(live):
    _, _, client = live
    alone = client.completions.create(model="open", prompt=PROMPT, max_tokens=10, temperature=0.8, seed=3).choices[0]
    answers = {}

    def ask(i, **kw):
        answers[i] = client.completions.create(**{"prompt": PROMPT, "max_tokens": 10, **kw}).choices[0].text

    requests = [dict(model="open", temperature=0.8, seed=3), dict(model=BASE, temperature=0, prompt="w1 w2 w3 w4 w5"),
                dict(model="open", temperature=1.0, seed=4)]
    threads = [threading.Thread(target=ask, args=(i,), kwargs=kw) for i, kw in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(answers) == 3 and answers[0] == alone.text


@pytest.mark.parametrize("kwargs, field", [
    ({"logprobs": 2}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"extra_body": {"foo": 1}}, "foo"),
    ({"temperature": 2.5}, "temperature"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"n": 9}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
])
def test_what_is_not_served_is_a_400_naming_the_field(live, kwargs, field):
    _, _, client = live
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="open", prompt=PROMPT, **{"max_tokens": 2, **kwargs})
    assert info.value.status_code == 400 and info.value.param == field and field in info.value.message


@pytest.mark.parametrize("kwargs, field", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"max_tokens": 2, "max_completion_tokens": 2}, "max_tokens"),
])
def test_chat_fields_not_served_are_a_400(live, kwargs, field):
    _, _, client = live
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="open", messages=CHAT, **{"max_completion_tokens": 2, **kwargs})
    assert info.value.param == field


def test_no_op_values_of_unsupported_fields_are_accepted(live):
    _, _, client = live
    r = client.completions.create(model="open", prompt=PROMPT, max_tokens=2, temperature=0, echo=False,
                                  logprobs=None, frequency_penalty=0, best_of=1)
    assert len(r.choices) == 1


def test_unknown_model_is_not_found(live):
    _, _, client = live
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=2)


@pytest.mark.parametrize("content", [
    b'{"model": "open", "prompt": ',                 # malformed JSON
    b"\x00\xff",                                    # not UTF-8
    b'["open"]',                                    # not an object
    b'{"model": "open", "prompt": "w1", "max_tokens": "5"}',  # a string for an int
    b'{"model": "open", "prompt": "w1", "stream": 1}',        # a number for a bool
    b'{"model": "open"}',                           # no prompt
    b'{"model": "open", "prompt": ""}',
    b'{"model": "open", "prompt": "w1", "max_tokens": 0}',
    b'{"model": "open", "prompt": ["w1", "w2"]}',   # one prompt per request
])
def test_bad_bodies_are_400_in_openai_shape_never_422(live, content):
    _, url, _ = live
    r = httpx.post(f"{url}/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_chat_without_a_template_is_a_clear_400(root):
    _, app = serve(root, tokenizer=word_tokenizer())
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "open", "messages": CHAT})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        assert "/v1/completions" in r.json()["error"]["message"]
        bad_role = {"model": "open", "messages": [{"role": "tool", "content": "w1"}]}
        assert client.post("/v1/chat/completions", json=bad_role).json()["error"]["param"] == "messages.0.role"


def test_prometheus_metrics_count_per_model(root):
    _, app = serve(root)
    with threaded_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=60)
        client.completions.create(model="open", prompt=PROMPT, max_tokens=3, temperature=0)
        list(client.completions.create(model="open", prompt=PROMPT, max_tokens=2, temperature=0, stream=True))
        client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4, temperature=0)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="open", prompt=PROMPT, echo=True)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt=PROMPT)
        r = httpx.get(f"{url}/metrics")
        legacy = httpx.get(f"{url}/metrics.json").json()
    assert r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("moslora_requests_total", model="open", endpoint="completions") == 3
    assert value("moslora_requests_total", model=BASE, endpoint="chat_completions") == 1
    assert value("moslora_requests_total", model="unknown", endpoint="completions") == 1
    assert value("moslora_request_errors_total", model="open", endpoint="completions", status="400") == 1
    assert value("moslora_request_errors_total", model="unknown", endpoint="completions", status="404") == 1
    assert value("moslora_completion_tokens_total", model="open") == 5
    assert value("moslora_completion_tokens_total", model=BASE) == 4
    assert value("moslora_prompt_tokens_total", model="open") == 8
    assert value("moslora_request_duration_seconds_count", model="open", endpoint="completions") == 2
    assert value("moslora_request_duration_seconds_bucket", model="open", endpoint="completions", le="+Inf") == 2
    assert value("moslora_adapters_loaded") == 1 and value("moslora_resident_bytes", part="adapters_total") > 0
    assert (legacy["requests"], legacy["completion_tokens"], legacy["errors"]) == (5, 9, 2)


def letters(tokens):  # token t decodes to the letter chr(97 + t); 99 to an incomplete character
    return "".join("\ufffd" if t == 99 else chr(97 + t) for t in tokens)


@pytest.mark.parametrize("tokens, stop, text, pieces, finish", [
    ([0, 1, 2, 3, 4], ("cd",), "ab", ["a", "b"], "stop"),           # "c" is held back: it may start "cd"
    ([0, 2, 1, 2, 4], ("cd",), "acbce", ["a", "cb", "ce"], "length"),  # "c" held, then released
    ([0, 99, 1], (), "a\ufffdb", ["a", "\ufffdb"], "length"),       # an incomplete character waits
    ([0, 2, 9], (), "ac", ["a", "c"], "stop"),                      # 9 is EOS
])
def test_a_row_streams_only_text_that_cannot_change(tokens, stop, text, pieces, finish):
    streamed = []
    row = RowDecoder(Sampling(max_tokens=len(tokens), stop=stop), 0, letters, eos_id=9, on_text=streamed.append)
    for token in tokens:
        row.push(token)
    assert (row.text, streamed, row.finish) == (text, pieces, finish) and "".join(streamed) == text
