"""Drives a running `pipeline serve` with the official `openai` Python client (vLLM's and
llama.cpp's server-test patterns). Usage: openai_client_check.py BASE_URL API_KEY
(started by the `openai_python_client` test in tests/serve.rs, which makes the model and server)."""

import sys

import openai
from openai import OpenAI

base_url, key = sys.argv[1], sys.argv[2]
client = OpenAI(api_key=key, base_url=base_url)

models = client.models.list()
ids = [m.id for m in models.data]
assert ids == ["tiny"], ids
model = ids[0]
print("models.list:", ids)

messages = [{"role": "user", "content": "Who are you?"}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
text = r.choices[0].message.content
assert r.choices[0].finish_reason == "length", r
assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12, r.usage
print("chat:", repr(text))

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
)
chunks = list(stream)
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert joined == text, (joined, text)
assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
assert chunks[-1].choices == [] and chunks[-1].usage == r.usage, chunks[-1]
print("chat stream:", repr(joined))

lp = client.chat.completions.create(
    model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
)
tokens = lp.choices[0].logprobs.content
assert "".join(t.token for t in tokens) == lp.choices[0].message.content
assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in tokens)

c = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=8, temperature=0)
assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8, c
cs = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True)
assert "".join(x.choices[0].text for x in cs if x.choices) == c.choices[0].text
print("completions:", repr(c.choices[0].text))

try:
    OpenAI(api_key="wrong", base_url=base_url).models.list()
    raise AssertionError("a bad key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.body["type"] == "authentication_error", e.body
    print("bad key: 401", e.body["type"])

try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=5)
    raise AssertionError("temperature 5 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["param"] == "temperature", e.body
    print("bad request: 400", e.body["message"])

try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404, e
print("unknown model: 404")

# and the server still answers
assert client.chat.completions.create(model=model, messages=messages, max_tokens=2).choices[0].message.content is not None
print(f"ok (openai {openai.__version__})")
