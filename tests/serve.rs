//! `pipeline serve` end to end: a real server process on 127.0.0.1 (an ephemeral port) with a tiny
//! random-weight model built here, driven over raw HTTP/1.1 so the tests see exactly what goes on
//! the wire (status lines, SSE framing). The patterns are vLLM's and llama.cpp's server tests.
//!
//! The tiny model's restricted vocabulary leaves out the end-of-turn tokens, so it never stops by
//! itself: a completion ends at `max_tokens` (`length`) or at a stop string (`stop`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dfdx::prelude::Cpu;
use pipeline_model::tokenizer::Tokenizer;
use pipeline_model::vocab::VocabMap;
use pipeline_model::{LoraConfig, ModelConfig, Qwen2, Trainable};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_pipeline");

/// Text whose tokens make the tiny model's vocabulary.
const VOCAB_TEXT: &str = "system\nuser\nassistant\nYou are a helpful assistant. Who are you? I am swift-robot, \
    a language model made by swift. Hello world! The quick brown fox jumps over the lazy dog, 1 2 3 4 5.";

/// A tiny-preset model folder (Qwen2.5 tokenizer files, `vocab_map.json`, `chat_defaults.json`).
fn tiny_model(dir: &Path) {
    let tok = Tokenizer::qwen25().unwrap();
    let vocab = VocabMap::new(&[tok.token_to_id("<|im_start|>").unwrap()], tok.encode(VOCAB_TEXT, false).unwrap());
    // untied: with a random head tied to the embedding, greedy decoding repeats the last token;
    // seed 4 gives a varied continuation (" model made by world The model …")
    let mut cfg = ModelConfig::tiny(vocab.len());
    cfg.tie_word_embeddings = false;
    let m = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 4), &Cpu::default()).unwrap();
    m.save_pretrained(dir).unwrap();
    Tokenizer::write_qwen25_files(dir).unwrap();
    vocab.save(&dir.join("vocab_map.json")).unwrap();
    std::fs::write(dir.join("chat_defaults.json"), r#"{"system": "You are a helpful assistant."}"#).unwrap();
}

/// A peft adapter folder for the model in `base` with random (non-zero) B matrices.
fn tiny_adapter(base: &Path, out: &Path) {
    let mut p = pipeline_model::pretrained::load_pretrained(base, &Cpu::default()).unwrap();
    let lc = LoraConfig::all_linear(4, 8.0);
    p.model.set_trainable(Trainable::Lora(lc.clone()), 3).unwrap();
    let mut host = p.model.lora_to_host();
    for (i, (name, t)) in host.iter_mut().enumerate() {
        if name.contains("lora_B") {
            t.data = (0..t.data.len()).map(|k| ((k * 7919 + i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        }
    }
    p.model.load_lora_host(lc, &host).unwrap();
    p.model.save_adapter(out, &base.display().to_string()).unwrap();
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(&dir.path().join("model"));
        Fixture { dir }
    }
    fn model(&self) -> PathBuf {
        self.dir.path().join("model")
    }
    fn serve(&self, extra: &[&str]) -> Server {
        Server::start(&self.model(), extra)
    }
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--port", "0", "--served-model-name", "tiny"])
            .args(extra)
            .env_remove("PIPELINE_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .unwrap();
        Server { child, addr }
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        if let Some(b) = body {
            s.write_all(b).unwrap();
        }
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        Reply::parse(&raw)
    }

    fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], None)
    }

    fn post(&self, path: &str, body: &Value) -> Reply {
        self.request("POST", path, &[], Some(body.to_string().as_bytes()))
    }

    fn chat(&self, body: Value) -> Value {
        let r = self.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    /// A metric's value from `/metrics` (summed over its label sets).
    fn metric(&self, name: &str) -> f64 {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200);
        r.body
            .lines()
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn parse(raw: &[u8]) -> Reply {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
            body = dechunk(&body);
        }
        Reply { status, headers, body: String::from_utf8(body).expect("UTF-8 body") }
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    /// The `data:` payloads of an SSE body, checking the framing (`data: …` lines, blank-line
    /// separated, comments allowed).
    fn events(&self) -> Vec<String> {
        assert!(self.header("content-type").unwrap_or_default().starts_with("text/event-stream"), "{:?}", self.headers);
        let mut out = Vec::new();
        for block in self.body.split("\n\n").filter(|b| !b.is_empty()) {
            for line in block.lines() {
                if line.starts_with(':') {
                    continue;
                }
                let data = line.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data line: {line:?}"));
                out.push(data.to_string());
            }
        }
        out
    }
    /// An OpenAI error body: (status, type, param, message).
    fn error(&self) -> (u16, String, Value, String) {
        let v = self.json();
        let e = &v["error"];
        assert!(e.is_object() && e.get("code").is_some(), "not an OpenAI error: {}", self.body);
        (
            self.status,
            e["type"].as_str().unwrap().to_string(),
            e["param"].clone(),
            e["message"].as_str().unwrap().to_string(),
        )
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 2 + size + 2..];
    }
}

/// Chunks of a chat stream, parsed; the last event must be `[DONE]`.
fn chunks(r: &Reply) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.body);
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap_or_else(|x| panic!("{x}: {e}"))).collect()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[test]
fn models_health_chat_completions_and_streams() {
    let f = Fixture::new();
    let s = f.serve(&[]);

    let h = s.get("/health");
    assert_eq!((h.status, h.json()["status"].as_str()), (200, Some("ok")));
    let models = s.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["object"], "model");

    // non-stream, greedy: `length` at max_tokens, exact usage, same as `pipeline generate`
    let req = json!({"model": "tiny", "messages": user("Who are you?"), "max_tokens": 12, "temperature": 0});
    let a = s.chat(req.clone());
    assert_eq!(a["object"], "chat.completion");
    let choice = &a["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    let u = &a["usage"];
    assert_eq!(u["completion_tokens"], 12);
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + 12);
    let out = Command::new(BIN)
        .args(["generate", "--prompt", "Who are you?", "--max-tokens", "12", "--model"])
        .arg(f.model())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).strip_suffix('\n').unwrap(), text, "pipeline generate");
    let out = Command::new(BIN)
        .args(["generate", "--stream", "--prompt", "Who are you?", "--max-tokens", "12", "--model"])
        .arg(f.model())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).strip_suffix('\n').unwrap(), text, "pipeline generate --stream");
    // `pipeline chat`: the same first answer, kept in the history, forgotten after /clear
    let mut chat = Command::new(BIN)
        .args(["chat", "--max-new-tokens", "12", "--model"])
        .arg(f.model())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    chat.stdin.take().unwrap().write_all(b"Who are you?\nWho are you?\n/clear\nWho are you?\n/exit\n").unwrap();
    let out = String::from_utf8(chat.wait_with_output().unwrap().stdout).unwrap();
    let replies: Vec<&str> = out.split(">>> ").skip(1).map(|r| r.split("\n<<< ").next().unwrap()).collect();
    assert_eq!(replies.len(), 3, "{out}");
    assert_eq!((replies[0], replies[2]), (text.as_str(), text.as_str()), "{out}");
    assert!(out.contains("(the conversation is cleared)"), "{out}");
    // deterministic, and the model may be omitted
    let mut again = req.clone();
    again.as_object_mut().unwrap().remove("model");
    assert_eq!(s.chat(again)["choices"][0]["message"]["content"], text.as_str());
    // text content parts are the same message
    let mut parts = req.clone();
    parts["messages"] = json!([{"role": "user", "content": [{"type": "text", "text": "Who are you?"}]}]);
    assert_eq!(s.chat(parts)["choices"][0]["message"]["content"], text.as_str());

    // stream: role first, one id, exactly one finish_reason, joined deltas == non-stream text, no usage
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let c = chunks(&s.post("/v1/chat/completions", &sreq));
    assert_eq!(c[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(c.iter().all(|x| x["id"] == c[0]["id"] && x["object"] == "chat.completion.chunk"));
    assert!(c.iter().all(|x| x.get("usage").is_none()), "usage without include_usage");
    let finishes: Vec<&Value> = c.iter().filter(|x| !x["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finishes.len(), 1);
    assert_eq!(finishes[0]["choices"][0]["finish_reason"], "length");
    let joined: String = c.iter().filter_map(|x| x["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(joined, text);

    // include_usage: one final chunk with no choices and the usage
    sreq["stream_options"] = json!({"include_usage": true});
    let c = chunks(&s.post("/v1/chat/completions", &sreq));
    let last = c.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], a["usage"]);
    assert_eq!(c.iter().filter(|x| x.get("usage").is_some()).count(), 1);

    // stop string: cut before it, finish_reason stop, same in the stream
    let (at, _) = text.char_indices().nth(text.chars().count() / 2).unwrap();
    let stop: String = text[at..].chars().take(2).collect();
    let want = &text[..text.find(&stop).unwrap()];
    let mut st = req.clone();
    st["stop"] = json!([stop, "never-appears"]);
    let r = s.chat(st.clone());
    assert_eq!(r["choices"][0]["message"]["content"], want, "stop {stop:?} in {text:?}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    st["stream"] = json!(true);
    let c = chunks(&s.post("/v1/chat/completions", &st));
    let joined: String = c.iter().filter_map(|x| x["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(joined, want);
    assert_eq!(c.last().unwrap()["choices"][0]["finish_reason"], "stop");

    // n = 2 with sampling: two choices, usage counts both
    let r = s.chat(json!({"messages": user("Hello"), "max_tokens": 5, "n": 2, "temperature": 1.0, "seed": 3}));
    assert_eq!(r["choices"].as_array().unwrap().len(), 2);
    assert_eq!((r["choices"][0]["index"].as_u64(), r["choices"][1]["index"].as_u64()), (Some(0), Some(1)));
    assert_eq!(r["usage"]["completion_tokens"], 10);
    let c = chunks(&s.post(
        "/v1/chat/completions",
        &json!({"messages": user("Hello"), "max_tokens": 5, "n": 2, "stream": true, "seed": 3}),
    ));
    for i in 0..2 {
        let finishes =
            c.iter().filter(|x| x["choices"][0]["index"] == i && !x["choices"][0]["finish_reason"].is_null());
        assert_eq!(finishes.count(), 1, "choice {i}");
    }

    // logprobs: top_logprobs entries, all <= 0, tokens join to the content
    let r = s.chat(
        json!({"messages": user("Hello"), "max_tokens": 8, "temperature": 0, "logprobs": true, "top_logprobs": 5}),
    );
    let content = r["choices"][0]["message"]["content"].as_str().unwrap();
    let lp = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!lp.is_empty());
    let joined: String = lp.iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(joined, content);
    for t in lp {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        assert!(top.iter().all(|x| x["logprob"].as_f64().unwrap() <= 0.0));
        // greedy: the chosen token is the most likely one
        assert!((top[0]["logprob"].as_f64().unwrap() - t["logprob"].as_f64().unwrap()).abs() < 1e-6);
    }

    // completions: raw text, same engine; streamed text joins to the non-streamed one
    let creq = json!({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0});
    let r = s.post("/v1/completions", &creq);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = r.json();
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 10);
    let ctext = r["choices"][0]["text"].as_str().unwrap().to_string();
    let out = Command::new(BIN)
        .args(["generate", "--raw", "--prompt", "The quick brown fox", "--max-tokens", "10", "--model"])
        .arg(f.model())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).strip_suffix('\n').unwrap(), ctext, "generate --raw");
    let mut cs = creq.clone();
    cs["stream"] = json!(true);
    cs["stream_options"] = json!({"include_usage": true});
    let c = chunks(&s.post("/v1/completions", &cs));
    let joined: String = c.iter().filter_map(|x| x["choices"].get(0).and_then(|c| c["text"].as_str())).collect();
    assert_eq!(joined, ctext);
    assert_eq!(c.last().unwrap()["usage"], r["usage"]);

    // metrics: Prometheus text with the counters and histograms
    let m = s.get("/metrics");
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    for name in [
        "pipeline_requests_total",
        "pipeline_prompt_tokens_total",
        "pipeline_generation_tokens_total",
        "pipeline_time_to_first_token_seconds_bucket",
        "pipeline_inter_token_latency_seconds_bucket",
        "pipeline_queue_depth",
        "pipeline_running_sequences",
    ] {
        assert!(m.body.contains(name), "{name} missing from /metrics:\n{}", m.body);
    }
    assert!(s.metric("pipeline_generation_tokens_total") >= 12.0);
    assert_eq!(s.metric("pipeline_running_sequences"), 0.0);
}

#[test]
fn errors_have_openai_shape_and_status() {
    let f = Fixture::new();
    let s = f.serve(&["--max-tokens", "64"]);
    let chat = |body: &[u8]| s.request("POST", "/v1/chat/completions", &[], Some(body));
    let ok = json!({"messages": user("Hi"), "max_tokens": 2});

    let (st, ty, _, msg) = chat(b"{not json").error();
    assert_eq!((st, ty.as_str()), (400, "invalid_request_error"));
    assert!(msg.contains("malformed JSON"), "{msg}");
    let (st, _, _, msg) = chat(br#"{"model": "tiny"}"#).error();
    assert!(st == 400 && msg.contains("messages"), "{msg}");
    let (st, _, param, _) = chat(br#"{"messages": "hello"}"#).error();
    assert_eq!((st, param), (400, json!("messages")));
    let (st, _, param, _) = chat(br#"{"messages": [{"role": "wizard", "content": "x"}]}"#).error();
    assert_eq!((st, param), (400, json!("messages[0].role")));

    // image / audio parts on a text-only model
    for part in [
        json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
        json!({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
    ] {
        let body =
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]});
        let (st, _, param, msg) = s.post("/v1/chat/completions", &body).error();
        assert_eq!((st, param), (400, json!("messages[0].content[1].type")));
        assert!(msg.contains("text-only"), "{msg}");
    }

    // limits: max_tokens above --max-tokens names the limit; a prompt longer than the context
    let mut big = ok.clone();
    big["max_tokens"] = json!(65);
    let (st, _, param, msg) = s.post("/v1/chat/completions", &big).error();
    assert_eq!((st, param), (400, json!("max_tokens")));
    assert!(msg.contains("64") && msg.contains("--max-tokens"), "{msg}");
    let long = "Hello world! ".repeat(1200);
    let (st, _, param, msg) = s.post("/v1/completions", &json!({"prompt": long, "max_tokens": 1})).error();
    assert_eq!((st, param), (400, json!("prompt")));
    assert!(msg.contains("maximum context length is 2048 tokens"), "{msg}");
    for (field, value) in [("temperature", json!(3)), ("top_p", json!(0)), ("n", json!(0)), ("max_tokens", json!(0))] {
        let mut b = ok.clone();
        b[field] = value;
        let (st, _, param, _) = s.post("/v1/chat/completions", &b).error();
        assert_eq!((st, param), (400, json!(field)));
    }
    let mut b = ok.clone();
    b["logprobs"] = json!(true);
    b["top_logprobs"] = json!(21);
    assert_eq!(s.post("/v1/chat/completions", &b).error().0, 400);
    let mut b = ok.clone();
    b["stream_options"] = json!({"include_usage": true});
    let (st, _, param, _) = s.post("/v1/chat/completions", &b).error();
    assert_eq!((st, param), (400, json!("stream_options")));
    let mut b = ok.clone();
    b["stop"] = json!(5);
    assert_eq!(s.post("/v1/chat/completions", &b).error().0, 400);

    // unknown model, route, method
    let mut b = ok.clone();
    b["model"] = json!("gpt-17");
    let (st, _, param, msg) = s.post("/v1/chat/completions", &b).error();
    assert_eq!((st, param), (404, json!("model")));
    assert!(msg.contains("gpt-17"));
    assert_eq!(s.get("/v1/nope").error().0, 404);
    assert_eq!(s.get("/v1/chat/completions").error().0, 405);
    // a body over the limit is refused from its Content-Length, before it is sent
    let mut c = TcpStream::connect(s.addr).unwrap();
    write!(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", (16 << 20) + 1).unwrap();
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    assert_eq!(Reply::parse(&raw).error().0, 413);

    // after all that the server still answers
    assert_eq!(s.post("/v1/chat/completions", &ok).status, 200);
}

#[test]
fn api_key_guards_v1_but_not_health() {
    let f = Fixture::new();
    let s = f.serve(&["--api-key", "sekrit"]);
    let body = json!({"messages": user("Hi"), "max_tokens": 2}).to_string();
    let (st, ty, _, msg) = s.get("/v1/models").error();
    assert_eq!((st, ty.as_str()), (401, "authentication_error"));
    assert!(msg.contains("Authorization: Bearer"), "{msg}");
    let r = s.request("POST", "/v1/chat/completions", &[("Authorization", "Bearer wrong")], Some(body.as_bytes()));
    assert_eq!(r.error().0, 401);
    assert_eq!(r.error().1, "authentication_error");
    assert_eq!(s.get("/health").status, 200);
    assert_eq!(s.get("/metrics").status, 200);
    let r = s.request("POST", "/v1/chat/completions", &[("Authorization", "Bearer sekrit")], Some(body.as_bytes()));
    assert_eq!(r.status, 200, "{}", r.body);
    // the environment variable works too
    let mut c = Command::new(BIN);
    c.arg("serve").arg("--model").arg(f.model()).args(["--port", "0"]).env("PIPELINE_API_KEY", "k2");
    c.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let s2 = Server { child, addr: line.trim().strip_prefix("listening on http://").unwrap().parse().unwrap() };
    assert_eq!(s2.get("/v1/models").status, 401);
    assert_eq!(s2.request("GET", "/v1/models", &[("Authorization", "Bearer k2")], None).status, 200);
}

/// A client that disconnects mid-stream frees its sequence at once; a full queue answers 429; a
/// request past --request-timeout fails with 408.
#[test]
fn disconnect_frees_the_sequence_and_a_full_queue_is_429() {
    let f = Fixture::new();
    let s = f.serve(&["--max-num-seqs", "1", "--max-queue", "1", "--max-tokens", "2000"]);
    let long = json!({"messages": user("Hi"), "max_tokens": 2000, "stream": true}).to_string();
    let before = s.metric("pipeline_generation_tokens_total");
    // a stream that has produced tokens (the role chunk comes before the engine takes it)
    let open_stream = || {
        let mut c = TcpStream::connect(s.addr).unwrap();
        write!(
            c,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{long}",
            long.len()
        )
        .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while String::from_utf8_lossy(&seen).matches("data: ").count() < 4 {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
        c
    };
    let c = open_stream();
    drop(c);
    let t = Instant::now();
    while s.get("/health").json()["running"] != 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "the sequence was not freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let generated = s.metric("pipeline_generation_tokens_total") - before;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.metric("pipeline_generation_tokens_total") - before, generated, "still generating");
    assert!(generated < 1000.0, "{generated} tokens generated for a client that left");

    // one running, one waiting, the third is refused
    let a = open_stream();
    let body = json!({"messages": user("Hi"), "max_tokens": 2000}).to_string();
    let waiting = {
        let mut c = TcpStream::connect(s.addr).unwrap();
        write!(
            c,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        c
    };
    let t = Instant::now();
    while s.get("/health").json()["waiting"] != 1 {
        assert!(t.elapsed() < Duration::from_secs(20), "the second request is not waiting");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (st, ty, _, msg) = s.post("/v1/chat/completions", &json!({"messages": user("Hi"), "max_tokens": 1})).error();
    assert_eq!((st, ty.as_str()), (429, "rate_limit_error"));
    assert!(msg.contains("--max-queue 1"), "{msg}");
    drop(waiting);
    drop(a);
    let t = Instant::now();
    while s.get("/health").json() != json!({"status": "ok", "running": 0, "waiting": 0}) {
        assert!(t.elapsed() < Duration::from_secs(20), "not idle: {}", s.get("/health").body);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.post("/v1/chat/completions", &json!({"messages": user("Hi"), "max_tokens": 1})).status, 200);
    drop(s);

    // 8 × 2000 tokens take far longer than a second on any machine
    let s = f.serve(&["--request-timeout", "1", "--max-tokens", "2000"]);
    let t = Instant::now();
    let (st, ty, _, msg) = s.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2000, "n": 8})).error();
    assert_eq!((st, ty.as_str()), (408, "timeout_error"));
    assert!(msg.contains("--request-timeout"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    while s.get("/health").json()["running"] != 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "timed-out sequences still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Adapters are listed after the base and selected per request; concurrent requests to the base
/// and the adapter each get their own model's output (the same as alone, and as `pipeline
/// generate --adapter`).
#[test]
fn adapters_per_request_concurrently() {
    let f = Fixture::new();
    let adapter = f.dir.path().join("adapter");
    tiny_adapter(&f.model(), &adapter);
    let spec = format!("robot={}", adapter.display());
    let s = f.serve(&["--adapters", &spec]);
    let models = s.get("/v1/models").json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny", "robot"]);
    assert_eq!(models["data"][1]["parent"], "tiny");
    let req =
        |model: &str| json!({"model": model, "messages": user("Who are you?"), "max_tokens": 16, "temperature": 0});
    let alone: Vec<String> = ["tiny", "robot"]
        .iter()
        .map(|m| s.chat(req(m))["choices"][0]["message"]["content"].as_str().unwrap().to_string())
        .collect();
    assert_ne!(alone[0], alone[1], "the adapter changes the output");
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..6)
            .map(|i| {
                let (s, r) = (&s, req(["tiny", "robot"][i % 2]));
                sc.spawn(move || s.chat(r)["choices"][0]["message"]["content"].as_str().unwrap().to_string())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, t) in together.iter().enumerate() {
        assert_eq!(t, &alone[i % 2], "request {i}");
    }
    let out = Command::new(BIN)
        .args(["generate", "--prompt", "Who are you?", "--max-tokens", "16", "--model"])
        .arg(f.model())
        .arg("--adapter")
        .arg(&adapter)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).strip_suffix('\n').unwrap(), alone[1]);
}

/// Chunked prefill interleaved with decoding: on a server that runs at most 3 prompt tokens per
/// iteration, prompts of different lengths arriving while others decode (each prompt takes many
/// iterations, so new prompts are prefilled between the decoding steps of running sequences, and
/// the sequences join the batch at different lengths) give each request the greedy text it gets
/// alone with its prompt in one forward, streamed or not.
#[test]
fn interleaved_chunked_prefill_gives_each_request_its_text_alone() {
    let f = Fixture::new();
    let prompts = [
        "Who are you?",
        "Hello world! The quick brown fox jumps over the lazy dog, 1 2 3 4 5.",
        "1 2 3",
        "I am swift-robot, a language model made by swift. Who are you? The lazy dog",
        "The quick brown fox",
    ];
    let req = |p: &str, stream: bool| json!({"messages": user(p), "max_tokens": 20, "temperature": 0, "stream": stream, "stop": ["lazy dog"]});
    let alone: Vec<String> = {
        let s = f.serve(&[]);
        prompts
            .iter()
            .map(|p| s.chat(req(p, false))["choices"][0]["message"]["content"].as_str().unwrap().into())
            .collect()
    };
    assert!(alone.iter().collect::<std::collections::HashSet<_>>().len() > 2, "{alone:?}");
    let s = f.serve(&["--max-prefill-tokens", "3"]);
    let together: Vec<(usize, String)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2 * prompts.len())
            .map(|i| {
                let (s, p, stream) = (&s, prompts[i % prompts.len()], i % 2 == 1);
                sc.spawn(move || {
                    // staggered: later requests arrive while earlier ones decode
                    std::thread::sleep(Duration::from_millis(40 * i as u64));
                    let text = if stream {
                        let c = chunks(&s.post("/v1/chat/completions", &req(p, true)));
                        c.iter().filter_map(|x| x["choices"][0]["delta"]["content"].as_str()).collect()
                    } else {
                        s.chat(req(p, false))["choices"][0]["message"]["content"].as_str().unwrap().to_string()
                    };
                    (i, text)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, t) in together {
        assert_eq!(t, alone[i % prompts.len()], "request {i} ({:?})", prompts[i % prompts.len()]);
    }
}

/// A stop string made of the end of one token and the start of the next (found from the tokens'
/// logprobs) ends the completion where the string starts, streamed or not, though the server only
/// decodes and searches the new tokens' text at each step.
#[test]
fn stop_strings_spanning_tokens_stop_where_they_start() {
    let f = Fixture::new();
    let s = f.serve(&[]);
    let req = json!({"messages": user("Who are you?"), "max_tokens": 24, "temperature": 0, "logprobs": true});
    let r = s.chat(req.clone());
    let text = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let toks: Vec<String> = r["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(toks.concat(), text);
    let mut tried = 0;
    for k in (2..toks.len() - 1).filter(|&k| toks[k].chars().count() >= 2 && toks[k + 1].chars().count() >= 2) {
        let tail: String = toks[k].chars().skip(toks[k].chars().count() - 2).collect();
        let head: String = toks[k + 1].chars().take(2).collect();
        let stop = format!("{tail}{head}");
        let want = &text[..text.find(&stop).unwrap()];
        let mut st = req.clone();
        st["stop"] = json!(["never-appears", stop]);
        let r = s.chat(st.clone());
        assert_eq!(r["choices"][0]["message"]["content"], want, "stop {stop:?} in {text:?}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        st["stream"] = json!(true);
        let c = chunks(&s.post("/v1/chat/completions", &st));
        let joined: String = c.iter().filter_map(|x| x["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(joined, want, "streamed, stop {stop:?}");
        tried += 1;
        if tried == 3 {
            break;
        }
    }
    assert!(tried > 0, "no two adjacent tokens of 2+ characters in {toks:?}");
}

/// The official `openai` Python client against the server (`scripts/test_openai_client.sh` makes
/// the venv and runs this with `PIPELINE_OPENAI_PYTHON` set).
#[test]
#[ignore = "needs the openai package: scripts/test_openai_client.sh"]
fn openai_python_client() {
    let python =
        std::env::var("PIPELINE_OPENAI_PYTHON").expect("PIPELINE_OPENAI_PYTHON: run scripts/test_openai_client.sh");
    let f = Fixture::new();
    let s = f.serve(&["--api-key", "test-key"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/openai_client_check.py");
    let out = Command::new(python).arg(script).arg(format!("http://{}/v1", s.addr)).arg("test-key").output().unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
