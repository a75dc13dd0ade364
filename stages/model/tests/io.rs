//! Tokenizer, chat template and GGUF loading against outside oracles.
//!
//! Golden data (committed under `tests/fixtures/`):
//! - `tokenizer/ggml-vocab-qwen2.gguf.{inp,out}`: llama.cpp's Qwen2 test vectors (46 pairs; PyPI sdist
//!   llama-cpp-python 0.3.36), fetched by `scripts/fetch_assets.py llama-vocab`.
//! - `gguf/*.gguf` + `*.golden.json`: written and dequantised by the PyPI `gguf` package
//!   (`scripts/oracles/gguf_fixtures.py`; version recorded in each golden file).
//! - `chat/golden.json`: transformers' `apply_chat_template` (`scripts/oracles/chat_golden.py`).
//!
//! Heavy tests (`cargo test -p pipeline-model --test io -- --ignored`) need
//! `python3 scripts/fetch_assets.py llama-vocab smollm2` first (files under `target/test-assets`
//! or `$PIPELINE_TEST_ASSETS`).

use std::path::{Path, PathBuf};

use pipeline_model::chat::{ChatTemplate, Message};
use pipeline_model::gguf::{
    add_tokenizer_metadata, hf_name, load_gguf, quantize, tokenizer_from_gguf, write_gguf, GgmlType, GgufFile,
    GgufValue, GgufWriter,
};
use pipeline_model::tokenizer::{SpecialTokens, Tokenizer};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn golden(rel: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(rel)).unwrap()).unwrap()
}

/// llama.cpp's `.inp` (texts separated by `\n__ggml_vocab_test__\n`) and `.out` (ids per line).
fn llama_cpp_vectors(inp: &Path, out: &Path) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(inp).unwrap();
    let out = std::fs::read_to_string(out).unwrap();
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let ids: Vec<Vec<u32>> = out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(texts.len(), ids.len(), "vector files disagree");
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

fn check_vectors(tok: &Tokenizer, vectors: &[(String, Vec<u32>)], what: &str) {
    let mut bad = Vec::new();
    for (text, want) in vectors {
        let got = tok.encode(text, false).unwrap();
        if &got != want {
            bad.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(bad.is_empty(), "{what}: {} of {} vectors differ:\n{}", bad.len(), vectors.len(), bad.join("\n"));
}

// ---------------------------------------------------------------- tokenizer

#[test]
fn qwen25_tokenizer_passes_llama_cpp_qwen2_vectors() {
    let tok = Tokenizer::qwen25().unwrap();
    let v = llama_cpp_vectors(
        &fixture("tokenizer/ggml-vocab-qwen2.gguf.inp"),
        &fixture("tokenizer/ggml-vocab-qwen2.gguf.out"),
    );
    // The files hold 46 text/ids pairs: llama.cpp's generator (`convert_hf_to_gguf_update.py`)
    // writes each of its 46 `tests` followed by `\n__ggml_vocab_test__\n`, and one ids line per test.
    // Splitting on the separator gives 47 pieces, the last being the empty remainder after the
    // final separator (not a test; ASSETS.md's "47" counts pieces). The empty string IS a test (the
    // third); `llama_cpp_vectors` keeps it and drops only the trailing remainder.
    assert_eq!(v.len(), 46);
    let raw = std::fs::read_to_string(fixture("tokenizer/ggml-vocab-qwen2.gguf.inp")).unwrap();
    assert_eq!(raw.matches("\n__ggml_vocab_test__\n").count(), 46);
    assert!(raw.ends_with("\n__ggml_vocab_test__\n"));
    assert_eq!(v[2], (String::new(), vec![]));
    check_vectors(&tok, &v, "qwen2.5 tokenizer.json");
    for (text, _) in &v {
        assert_eq!(&tok.decode(&tok.encode(text, false).unwrap(), false).unwrap(), text);
    }
}

#[test]
fn qwen25_special_tokens_and_sizes() {
    let tok = Tokenizer::qwen25().unwrap();
    assert_eq!(tok.vocab_size(), 151_665);
    assert_eq!(tok.eos_id(), Some(151_645));
    assert_eq!(tok.pad_id(), Some(151_643));
    assert_eq!(tok.im_start_id(), Some(151_644));
    assert_eq!(tok.im_end_id(), Some(151_645));
    assert_eq!(tok.bos_id(), None);
    // Qwen3-only tokens were dropped: `<think>` is ordinary text here.
    assert_eq!(tok.token_to_id("<think>"), None);
    assert!(tok.encode("<think>", false).unwrap().len() > 1);
    assert_eq!(tok.encode("<|im_start|>user", false).unwrap(), vec![151_644, 872]);
    tok.check_embedding_rows(151_936, "model.embed_tokens.weight").unwrap();
    let e = tok.check_embedding_rows(151_000, "model.embed_tokens.weight").unwrap_err().to_string();
    assert!(e.contains("model.embed_tokens.weight") && e.contains("151665"), "{e}");
}

#[test]
fn tokenizer_from_file_reads_config_beside_it() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/qwen2.5/tokenizer.json");
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert!(tok.chat_template().unwrap().contains("You are Qwen, created by Alibaba Cloud."));
    let e = Tokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err().to_string();
    assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
    let e = Tokenizer::from_bytes(b"{\"model\": 3}", None, "broken.json").unwrap_err().to_string();
    assert!(e.contains("broken.json"), "{e}");
    let e = Tokenizer::from_bytes(&std::fs::read(&path).unwrap(), Some(br#"{"eos_token": "<|nope|>"}"#), "cfg")
        .unwrap_err()
        .to_string();
    assert!(e.contains("eos_token") && e.contains("<|nope|>"), "{e}");
}

// ---------------------------------------------------------------- chat template

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn chat_templates_render_like_transformers() {
    let g = golden("chat/golden.json");
    let tok = Tokenizer::qwen25().unwrap();
    let qwen = ChatTemplate::from_tokenizer(&tok).unwrap();
    let qwen_default = ChatTemplate::qwen25_default().unwrap();
    let smol_src = std::fs::read_to_string(fixture("chat/smollm2.jinja")).unwrap();
    let smol = ChatTemplate::new(
        &smol_src,
        SpecialTokens { eos: Some("<|im_end|>".into()), bos: Some("<|im_start|>".into()), ..Default::default() },
    )
    .unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 20);
    for (i, c) in cases.iter().enumerate() {
        let msgs = messages(&c["messages"]);
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let want = c["text"].as_str().unwrap();
        if c["template"] == "qwen2.5" {
            assert_eq!(qwen.render(&msgs, gen).unwrap(), want, "case {i}");
            assert_eq!(qwen_default.render(&msgs, gen).unwrap(), want, "case {i}");
            let want_ids: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
            let want_mask: Vec<bool> = serde_json::from_value(c["assistant_mask"].clone()).unwrap();
            let enc = qwen.encode(&tok, &msgs, gen).unwrap();
            assert_eq!(enc.ids, want_ids, "case {i}");
            assert_eq!(enc.assistant_mask, want_mask, "case {i}: assistant mask differs from transformers'");
        } else {
            assert_eq!(smol.render(&msgs, gen).unwrap(), want, "case {i}");
        }
    }
}

#[test]
fn encode_chat_marks_reply_and_im_end_only() {
    let tok = Tokenizer::qwen25().unwrap();
    let t = ChatTemplate::qwen25_default().unwrap();
    let msgs = [Message::user("Who are you?"), Message::assistant("I am Qwen.")];
    let enc = t.encode_chat(&tok, &msgs, None).unwrap();
    let marked: Vec<u32> = enc.ids.iter().zip(&enc.assistant_mask).filter(|(_, &m)| m).map(|(&i, _)| i).collect();
    let mut want = tok.encode("I am Qwen.", false).unwrap();
    want.push(151_645);
    assert_eq!(marked, want);
    assert_eq!(enc.ids.last(), Some(&198)); // the "\n" after <|im_end|> is not assistant output
    assert!(!enc.assistant_mask.last().unwrap());

    // A default system prompt is inserted only when none is given.
    let smol: ChatTemplate =
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".parse().unwrap();
    let text = smol.render(&[Message::system("S"), Message::user("u")], false).unwrap();
    let enc = smol.encode_chat(&tok, &[Message::user("u")], Some("S")).unwrap();
    assert_eq!(enc.ids, tok.encode(&text, false).unwrap());
    let enc2 = smol.encode_chat(&tok, &[Message::system("S"), Message::user("u")], Some("other")).unwrap();
    assert_eq!(enc.ids, enc2.ids);
    let prompt = t.encode_prompt(&tok, &[Message::user("hi")], None).unwrap();
    assert_eq!(&prompt[prompt.len() - 3..], &[151_644, 77_091, 198]); // <|im_start|>assistant\n
}

#[test]
fn template_errors_are_reported() {
    let t: ChatTemplate =
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
            .parse()
            .unwrap();
    let e = t.render(&[Message::assistant("x")], false).unwrap_err().to_string();
    assert!(e.contains("first message must be user"), "{e}");
    // A template that rewrites earlier turns cannot give prefix spans: an error, not a wrong mask.
    let t: ChatTemplate =
        "{% for m in messages %}{{ m.role }}{{ m.content }}{% if loop.last %}!{% endif %}{% endfor %}".parse().unwrap();
    let tok = Tokenizer::qwen25().unwrap();
    let e = t
        .encode_chat(&tok, &[Message::user("a"), Message::assistant("b"), Message::user("c")], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("message 1"), "{e}");
}

// ---------------------------------------------------------------- GGUF

fn sha256_f32(data: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in data {
        h.update(x.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn gguf_dequantisation_equals_gguf_package() {
    let g = golden("gguf/types.golden.json");
    let f = GgufFile::open(fixture("gguf/types.gguf")).unwrap();
    assert_eq!(f.version(), 3);
    let tensors = g["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), 11);
    for (name, t) in tensors {
        let got = f.dequantize(name).unwrap();
        let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
        assert_eq!(got.shape, shape, "{name}");
        let want: Vec<f32> = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        for (i, (a, b)) in got.data.iter().zip(&want).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "{name}[{i}]: {a} != {b} (gguf package)");
        }
    }
    // Metadata of every value type.
    let m = g["metadata"].as_object().unwrap();
    assert_eq!(f.get("m.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(f.get("m.i8"), Some(&GgufValue::I8(-5)));
    assert_eq!(f.get("m.bool"), Some(&GgufValue::Bool(true)));
    assert_eq!(f.get_str("m.str").unwrap(), m["m.str"].as_str().unwrap());
    assert_eq!(f.get_u64("m.u64").unwrap(), m["m.u64"].as_u64().unwrap());
    assert_eq!(f.get("m.i64").and_then(GgufValue::as_i64), m["m.i64"].as_i64());
    assert_eq!(f.get("m.i16").and_then(GgufValue::as_i64), m["m.i16"].as_i64());
    assert_eq!(f.get_u64("m.u32").unwrap(), m["m.u32"].as_u64().unwrap());
    assert_eq!(f.get("m.i32").and_then(GgufValue::as_i64), m["m.i32"].as_i64());
    assert_eq!(f.get_u64("m.u16").unwrap(), m["m.u16"].as_u64().unwrap());
    assert_eq!(f.get_f64("m.f32").unwrap() as f32, m["m.f32"].as_f64().unwrap() as f32);
    assert_eq!(f.get_f64("m.f64").unwrap(), m["m.f64"].as_f64().unwrap());
    let arr: Vec<&str> = f.get("m.arr_str").unwrap().as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(serde_json::to_value(arr).unwrap(), m["m.arr_str"]);
    let arr: Vec<i64> = f.get("m.arr_i32").unwrap().as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(serde_json::to_value(arr).unwrap(), m["m.arr_i32"]);
    let e = f.get_u64("m.str").unwrap_err().to_string();
    assert!(e.contains("m.str"), "{e}");
}

fn check_model(arch: &str) {
    let g = golden(&format!("gguf/tiny_{arch}.golden.json"));
    let m = load_gguf(fixture(&format!("gguf/tiny_{arch}.gguf"))).unwrap();
    for (k, v) in g["config"].as_object().unwrap() {
        assert_eq!(&m.config_json[k], v, "config key {k}");
    }
    let want = g["tensors"].as_object().unwrap();
    let got_names: Vec<&String> = m.tensors.keys().collect();
    let want_names: Vec<&String> = want.keys().collect();
    assert_eq!(got_names, want_names);
    assert_eq!(m.tensors.contains_key("lm_head.weight"), arch == "qwen2");
    for (name, t) in want {
        let got = &m.tensors[name];
        let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
        assert_eq!(got.shape, shape, "{name}");
        for (i, v) in t["sample_index"].as_array().unwrap().iter().zip(t["sample"].as_array().unwrap()) {
            let i = i.as_u64().unwrap() as usize;
            assert_eq!(got.data[i], v.as_f64().unwrap() as f32, "{name}[{i}]");
        }
        assert_eq!(sha256_f32(&got.data), t["sha256_f32le"].as_str().unwrap(), "{name}: values differ");
    }
    assert_eq!(m.chat_template.as_deref(), g["chat_template"].as_str());
    let tok = m.tokenizer.unwrap();
    // The 5 UNUSED `[PADi]` entries padding the vocabulary to the embedding are not HF tokens.
    assert_eq!(tok.vocab_size() as u64 + 5, g["vocab"]["tokens"].as_u64().unwrap());
    assert_eq!(tok.token_to_id("[PAD300]"), None);
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (Some(1), Some(2), Some(0)));
    // Control tokens are atomic; merges learnt on the corpus apply.
    let ids = tok.encode("<|im_start|>user\nhello<|im_end|>", false).unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (1, 2));
    assert!(ids.len() < "user\nhello".len() + 2, "merges not applied: {ids:?}");
    for text in ["hello world", "the capital of France is Paris. 12345", "Ünïcödé 世界 ✓ 🙂\n\n  x"] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // `<tool_call>` is a user-defined (non-special) added token: atomic, kept when skipping specials.
    let ids = tok.encode("a<tool_call>b", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "a<tool_call>b");
    assert_eq!(tok.decode(&tok.encode("<|im_end|>x", false).unwrap(), true).unwrap(), "x");
}

#[test]
fn gguf_tiny_llama_loads_with_hf_names_and_unpermuted_qk() {
    check_model("llama");
}

#[test]
fn gguf_tiny_qwen2_loads_with_biases_and_untied_head() {
    check_model("qwen2");
}

#[test]
fn gguf_tiny_tokenizer_digits_follow_pre_tokenizer() {
    // smollm (llama) splits digits one by one; qwen2 too (\p{N} alone) -> 5 digit tokens either way.
    for arch in ["llama", "qwen2"] {
        let f = GgufFile::open(fixture(&format!("gguf/tiny_{arch}.gguf"))).unwrap();
        let tok = tokenizer_from_gguf(&f).unwrap().unwrap();
        assert_eq!(tok.encode("12345", false).unwrap().len(), 5, "{arch}");
    }
}

fn tmp_copy(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixture(&format!("gguf/{name}"))).unwrap();
    edit(&mut bytes);
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    (dir, p)
}

#[test]
fn gguf_bad_inputs_are_errors_naming_the_field_or_tensor() {
    let (_d, p) = tmp_copy("types.gguf", |b| b[..4].copy_from_slice(b"GGML"));
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("not a GGUF file") && e.contains("GGML"), "{e}");

    for v in [1u32, 4] {
        let (_d, p) = tmp_copy("types.gguf", |b| b[4..8].copy_from_slice(&v.to_le_bytes()));
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains(&format!("unsupported GGUF version {v}")), "{e}");
    }

    let f = GgufFile::open(fixture("gguf/unsupported_type.gguf")).unwrap();
    let e = f.dequantize("blk.0.attn_q.weight").unwrap_err().to_string();
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("Q2_K"), "{e}");

    for (file, rel) in [("bad_vocab_small.gguf", "smaller"), ("bad_vocab_large.gguf", "larger")] {
        let e = load_gguf(fixture(&format!("gguf/{file}"))).unwrap_err().to_string();
        assert!(e.contains("token_embd.weight") && e.contains("tokenizer.ggml.tokens") && e.contains(rel), "{e}");
    }

    let e = load_gguf(fixture("gguf/types.gguf")).unwrap_err().to_string();
    assert!(e.contains("general.architecture") && e.contains("test"), "{e}");

    // Truncation anywhere is an error (never a panic); cut inside the tensor data names the tensor.
    let full = std::fs::read(fixture("gguf/types.gguf")).unwrap();
    for cut in (0..full.len()).step_by(97).chain([full.len() - 1]) {
        let (_d, p) = tmp_copy("types.gguf", |b| b.truncate(cut));
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("truncated") || e.contains("not a GGUF"), "cut {cut}: {e}");
    }
    let (_d, p) = tmp_copy("types.gguf", |b| b.truncate(b.len() - 10));
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("tensor `t.F32_3d`"), "{e}");

    // Missing metadata names the key.
    let (_d, p) = tmp_copy("tiny_llama.gguf", |b| {
        let at = b.windows(22).position(|w| w == b"llama.embedding_length").unwrap();
        b[at..at + 5].copy_from_slice(b"xxxxx");
    });
    let e = load_gguf(&p).unwrap_err().to_string();
    assert!(e.contains("llama.embedding_length") && e.contains("missing"), "{e}");
}

#[test]
fn gguf_writer_reproduces_gguf_package_files_byte_for_byte() {
    for name in ["types.gguf", "tiny_llama.gguf", "tiny_qwen2.gguf"] {
        let path = fixture(&format!("gguf/{name}"));
        let f = GgufFile::open(&path).unwrap();
        let mut w = GgufWriter::new();
        for (k, v) in f.metadata_in_order() {
            w.add_metadata(k, v.clone());
        }
        for t in f.tensors() {
            w.add_raw_tensor(&t.name, t.dims.clone(), t.ggml_type, f.raw(t).unwrap().to_vec());
        }
        assert!(w.to_bytes().unwrap() == std::fs::read(&path).unwrap(), "{name}: bytes differ from gguf.GGUFWriter's");
    }
}

#[test]
fn quantizers_equal_gguf_package() {
    let g = golden("gguf/quant.golden.json");
    let x: Vec<f32> = g["input"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    assert_eq!(g["bytes_hex"].as_object().unwrap().len(), 7);
    for (ty, want) in g["bytes_hex"].as_object().unwrap() {
        let ty = match ty.as_str() {
            "F16" => GgmlType::F16,
            "BF16" => GgmlType::BF16,
            "Q8_0" => GgmlType::Q8_0,
            "Q4_0" => GgmlType::Q4_0,
            "Q4_1" => GgmlType::Q4_1,
            "Q5_0" => GgmlType::Q5_0,
            "Q5_1" => GgmlType::Q5_1,
            other => panic!("unexpected type {other}"),
        };
        let got: String = quantize(ty, &x).unwrap().iter().map(|b| format!("{b:02x}")).collect();
        assert!(got == want.as_str().unwrap(), "{}: differs from gguf.quants.quantize", ty.name());
    }
    assert_eq!(quantize(GgmlType::Q6_K, &x[..256]).unwrap().len(), 210);
    assert!(quantize(GgmlType::Q8_0, &x[..33]).is_err());

    // Round trip through a written file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.gguf");
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    w.add_tensor("q", &[6, 64], &x, GgmlType::Q4_1).unwrap();
    w.add_tensor("f", &[6, 64], &x, GgmlType::F32).unwrap();
    assert!(w.add_tensor("bad", &[5, 64], &x, GgmlType::F32).is_err());
    w.write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.dequantize("f").unwrap().data, x);
    let q = f.dequantize("q").unwrap();
    assert_eq!(q.shape, vec![6, 64]);
    let max_err = q.data.iter().zip(&x).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_err < 1000.0 * 6.0 / 15.0, "{max_err}");
}

/// Corrupting any header byte gives an error or a readable file, never a panic.
#[test]
fn gguf_corrupt_bytes_never_panic() {
    let full = std::fs::read(fixture("gguf/tiny_llama.gguf")).unwrap();
    let header_end = full.windows(18).position(|w| w == b"output_norm.weight").unwrap() + 64;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.gguf");
    // Every byte of the fixed header and first key/values, then a sample through the vocabulary
    // and tensor infos.
    for at in (0..200).chain((200..header_end).step_by(53)) {
        for byte in [0x00, 0xFF] {
            let mut b = full.clone();
            b[at] = byte;
            std::fs::write(&path, &b).unwrap();
            if GgufFile::open(&path).is_ok() {
                let _ = load_gguf(&path);
            }
        }
    }
}

#[test]
fn q4_k_quantizer_equals_llama_cpp_reference() {
    let g = golden("gguf/quant_k.golden.json");
    let x: Vec<f32> = g["input"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let got = quantize(GgmlType::Q4_K, &x).unwrap();
    let want = g["bytes_hex"]["Q4_K"].as_str().unwrap();
    for (row, (a, b)) in got.chunks(144).zip(want.as_bytes().chunks(288)).enumerate() {
        let a: String = a.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(a, std::str::from_utf8(b).unwrap(), "super-block {row} differs from quantize_row_q4_K_ref");
    }
}

#[test]
fn gguf_export_round_trips_tiny_models() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2"] {
        let m = load_gguf(fixture(&format!("gguf/tiny_{arch}.gguf"))).unwrap();
        let out = dir.path().join(format!("{arch}.gguf"));
        let tok = m.tokenizer.as_ref();
        write_gguf(&out, &m.config_json, &m.tensors, tok, m.chat_template.as_deref(), |_| GgmlType::F32).unwrap();
        if let Some(keep) = std::env::var_os("PIPELINE_KEEP_EXPORT") {
            // For checking with the gguf package by hand (scripts/oracles/check_export.py).
            std::fs::copy(&out, Path::new(&keep).join(format!("{arch}.gguf"))).unwrap();
        }
        let m2 = load_gguf(&out).unwrap();
        assert_eq!(m2.config_json, m.config_json, "{arch}");
        assert!(m2.tensors == m.tensors, "{arch}: tensors changed in the round trip (Q/K permutation?)");
        assert_eq!(m2.chat_template, m.chat_template);
        let (t1, t2) = (m.tokenizer.unwrap(), m2.tokenizer.unwrap());
        for text in ["hello world <|im_end|>", "the capital of France is Paris. 12345 <tool_call>"] {
            assert_eq!(t1.encode(text, false).unwrap(), t2.encode(text, false).unwrap());
        }
        // Quantised export reads back close to the original.
        write_gguf(&out, &m.config_json, &m.tensors, None, None, |_| GgmlType::Q8_0).unwrap();
        let q = load_gguf(&out).unwrap();
        assert!(q.tokenizer.is_none());
        let (a, b) = (
            &q.tensors["model.layers.1.self_attn.q_proj.weight"],
            &m.tensors["model.layers.1.self_attn.q_proj.weight"],
        );
        let err = a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(err > 0.0 && err < 0.05, "{arch}: Q8_0 error {err}");
    }
}

#[test]
fn qwen25_tokenizer_survives_gguf_metadata_round_trip() {
    let tok = Tokenizer::qwen25().unwrap();
    let mut w = GgufWriter::new();
    add_tokenizer_metadata(&mut w, &tok, 151_936).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vocab.gguf");
    w.write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "qwen2");
    let tok2 = tokenizer_from_gguf(&f).unwrap().unwrap();
    let v = llama_cpp_vectors(
        &fixture("tokenizer/ggml-vocab-qwen2.gguf.inp"),
        &fixture("tokenizer/ggml-vocab-qwen2.gguf.out"),
    );
    check_vectors(&tok2, &v, "qwen2.5 via GGUF metadata");
    assert_eq!((tok2.eos_id(), tok2.pad_id(), tok2.im_start_id()), (Some(151_645), Some(151_643), Some(151_644)));
    assert!(add_tokenizer_metadata(&mut GgufWriter::new(), &tok, 1000).is_err());
}

// ---------------------------------------------------------------- heavy

fn assets() -> PathBuf {
    std::env::var_os("PIPELINE_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-assets"))
}

#[test]
#[ignore = "heavy: needs llama.cpp vocab files; run scripts/fetch_assets.py llama-vocab"]
fn gguf_vocab_tokenizers_pass_llama_cpp_vectors() {
    let dir = assets().join("llama.cpp");
    for name in ["qwen2", "llama-bpe", "starcoder", "refact", "gpt-2"] {
        let base = dir.join(format!("ggml-vocab-{name}.gguf"));
        let f = GgufFile::open(&base).unwrap();
        let tok = tokenizer_from_gguf(&f).unwrap().unwrap();
        let v = llama_cpp_vectors(&base.with_extension("gguf.inp"), &base.with_extension("gguf.out"));
        check_vectors(&tok, &v, name);
    }
}

#[test]
#[ignore = "heavy: 98 MB SmolLM2 GGUF; run scripts/fetch_assets.py smollm2"]
fn smollm2_gguf_matches_gguf_package() {
    let path = assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = golden("gguf/smollm2.golden.json");
    let f = GgufFile::open(&path).unwrap();
    let m = load_gguf(&path).unwrap();
    let c = &m.config_json;
    assert_eq!(c["architectures"][0], "LlamaForCausalLM");
    assert_eq!(
        [&c["num_hidden_layers"], &c["hidden_size"], &c["intermediate_size"], &c["num_attention_heads"]],
        [30, 576, 1536, 9]
    );
    assert_eq!([&c["num_key_value_heads"], &c["head_dim"], &c["vocab_size"]], [3, 64, 49152]);
    assert_eq!(c["rope_theta"], 100000.0);
    assert!((c["rms_norm_eps"].as_f64().unwrap() - 1e-5).abs() < 1e-9);
    assert_eq!(c["tie_word_embeddings"], true);
    assert!(!m.tensors.contains_key("lm_head.weight"));
    let want = g["tensors"].as_object().unwrap();
    assert_eq!(want.len(), 272);
    assert_eq!(m.tensors.len(), 272);
    for (gguf_name, t) in want {
        let hf = hf_name(gguf_name).unwrap();
        let got = &m.tensors[&hf];
        assert_eq!(got.shape, f.tensor_info(gguf_name).unwrap().shape(), "{hf}");
        assert_eq!(sha256_f32(&got.data), t["sha256_f32le"].as_str().unwrap(), "{hf}: differs from the gguf package");
    }
    assert_eq!(
        sha256_f32(&m.tensors["model.layers.7.self_attn.q_proj.weight"].data),
        want["blk.7.attn_q.weight"]["sha256_f32le"].as_str().unwrap()
    );
    let tok = m.tokenizer.unwrap();
    assert_eq!(
        (tok.vocab_size(), tok.im_start_id(), tok.im_end_id(), tok.eos_id()),
        (49152, Some(1), Some(2), Some(2))
    );
    let tmpl = ChatTemplate::from_tokenizer(&tok).unwrap();
    assert_eq!(tmpl.source(), std::fs::read_to_string(fixture("chat/smollm2.jinja")).unwrap());
    let ids = tmpl.encode_prompt(&tok, &[Message::user("What is the capital of France?")], None).unwrap();
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        tmpl.render(&[Message::user("What is the capital of France?")], true).unwrap()
    );
}

/// A full model folder `load_pretrained` accepts, built from `qwen2_tiny` (transformers-written
/// weights, 256-row embedding): the Qwen2.5 tokenizer files plus an identity `vocab_map.json`
/// over tokenizer ids 0..256, so model ids are the golden prompts' ids.
fn qwen2_tiny_with_tokenizer(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("qwen2_tiny").join(f), dir.join(f)).unwrap();
    }
    Tokenizer::write_qwen25_files(dir).unwrap();
    pipeline_model::vocab::VocabMap::new(&[], 0..256).save(&dir.join("vocab_map.json")).unwrap();
}

/// A copy of the peft-written `lora_tiny` adapter with `base_model_name_or_path` set to `base`.
fn lora_tiny_with_base(dir: &Path, base: serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(fixture("lora_tiny/adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
    let mut cfg = golden("lora_tiny/adapter_config.json");
    cfg["base_model_name_or_path"] = base;
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

/// The peft adapter folder loads as a model (base from `base_model_name_or_path`, relative to the
/// adapter folder or absolute, or given explicitly) and its logits equal peft's, with the adapter
/// applied unmerged and merged (golden: `scripts/oracles/qwen2_parity.py`, transformers 5.24 +
/// peft 0.21.2, in `golden.json` → `lora`).
#[test]
fn peft_adapter_folder_loads_on_its_base_with_peft_logits() {
    use dfdx::prelude::*;
    use pipeline_model::pretrained::{load_pretrained, load_pretrained_with_base, ModelSource};
    let g = golden("golden.json");
    let want = g["lora"]["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
    let want_merged =
        g["lora"]["merged_logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
    let prompt: Vec<u32> = g["prompts"][0].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("models/base");
    qwen2_tiny_with_tokenizer(&base);
    let relative = tmp.path().join("adapters/relative");
    lora_tiny_with_base(&relative, "../../models/base".into());
    let absolute = tmp.path().join("absolute");
    lora_tiny_with_base(&absolute, base.display().to_string().into());
    let dev = Cpu::default();
    let loaded = [
        ("relative", load_pretrained(&relative, &dev).unwrap()),
        ("absolute", load_pretrained(&absolute, &dev).unwrap()),
        // peft left base_model_name_or_path null in the fixture: the explicit base is required
        ("explicit", load_pretrained_with_base(&fixture("lora_tiny"), Some(&base), &dev).unwrap()),
    ];
    let rel_err = |got: &[f32], want: &[f32]| {
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        got.iter().zip(want).map(|(a, b)| (a - b).abs() / scale).fold(0f32, f32::max)
    };
    for (what, p) in &loaded {
        assert!(p.model.lora_config().is_none(), "{what}: the adapter is merged");
        let logits =
            p.model.forward(&pipeline_model::Batch::new(prompt.clone(), 1, prompt.len()).unwrap()).unwrap().as_vec();
        assert_eq!(logits.len(), want.len());
        let (e, em) = (rel_err(&logits, &want), rel_err(&logits, &want_merged));
        eprintln!("{what}: max error vs peft {e:e} (unmerged), {em:e} (merged)");
        assert!(e < 1e-4 && em < 1e-4, "{what}: {e} / {em}");
        assert!(p.vocab.is_some() && p.chat.is_some(), "{what}: tokenizer side files come from the base");
    }
    // the base alone differs (the adapter is really applied)
    let plain = load_pretrained(&base, &dev).unwrap();
    let logits =
        plain.model.forward(&pipeline_model::Batch::new(prompt.clone(), 1, prompt.len()).unwrap()).unwrap().as_vec();
    assert!(rel_err(&logits, &want) > 1e-3);
    let src = ModelSource::resolve(&relative, None).unwrap();
    assert_eq!(src.root(), &ModelSource::Folder(relative.join("../../models/base")));
    assert_eq!(src.find_file("tokenizer.json"), Some(relative.join("../../models/base/tokenizer.json")));
    assert_eq!(src.find_file("adapter_config.json"), Some(relative.join("adapter_config.json")));
}

#[test]
fn adapter_base_errors_name_the_key_and_path() {
    use dfdx::prelude::*;
    use pipeline_model::pretrained::{load_pretrained, load_pretrained_with_base};
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    qwen2_tiny_with_tokenizer(&base);
    let dev = Cpu::default();
    let err = |path: &Path, base: Option<&Path>| match load_pretrained_with_base(path, base, &dev) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    };
    // peft's null (the fixture), a hub id, a missing key, a wrong type, a self-reference
    let null = err(&fixture("lora_tiny"), None);
    assert!(null.contains("lora_tiny/adapter_config.json: `base_model_name_or_path` is null"), "{null}");
    assert!(null.contains("`base_model` param") && null.contains("--base"), "{null}");
    let hub = tmp.path().join("hub");
    lora_tiny_with_base(&hub, "Qwen/Qwen2.5-7B-Instruct".into());
    let e = err(&hub, None);
    assert!(e.contains("= \"Qwen/Qwen2.5-7B-Instruct\": no model folder or .gguf file at"), "{e}");
    assert!(e.contains(&hub.join("Qwen/Qwen2.5-7B-Instruct").display().to_string()), "{e}");
    let missing = tmp.path().join("missing");
    lora_tiny_with_base(&missing, serde_json::Value::Null);
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(missing.join("adapter_config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("base_model_name_or_path");
    std::fs::write(missing.join("adapter_config.json"), cfg.to_string()).unwrap();
    assert!(err(&missing, None).contains("`base_model_name_or_path` is missing"));
    let number = tmp.path().join("number");
    lora_tiny_with_base(&number, 7.into());
    assert!(err(&number, None).contains("`base_model_name_or_path` is 7, not a path"));
    let itself = tmp.path().join("itself");
    lora_tiny_with_base(&itself, ".".into());
    assert!(err(&itself, None).contains("stacked more than 8 deep"));
    // an explicit base that does not exist; a base for a full model; a missing weights file
    let e = err(&fixture("lora_tiny"), Some(&tmp.path().join("nope")));
    assert!(e.contains("base model `") && e.contains("nope` given for adapter") && e.contains("does not exist"), "{e}");
    assert!(err(&base, Some(&base)).contains("is not a peft adapter folder"));
    let no_weights = tmp.path().join("no_weights");
    lora_tiny_with_base(&no_weights, "../base".into());
    std::fs::remove_file(no_weights.join("adapter_model.safetensors")).unwrap();
    let e = err(&no_weights, None);
    assert!(e.contains("adapter_model.safetensors"), "{e}");
    // the working case, for contrast
    lora_tiny_with_base(&tmp.path().join("ok"), "../base".into());
    assert!(load_pretrained(&tmp.path().join("ok"), &dev).is_ok());
}

/// `ExportModel::write_gguf` over 256-wide rows, where llama.cpp's Q4_K_M choice shows: Q6_K for
/// the untied head and for `attn_v` / `ffn_down` of the `use_more_bits` layers (2 and 3 of 4), Q4_K
/// elsewhere, F32 norms and biases; every file loads back within its types' error. With
/// `PIPELINE_KEEP_EXPORT=DIR` the files are kept in `DIR/k/` for `scripts/oracles/check_quantize.sh`
/// (the `gguf` package's reader and dequantiser, and `gguf.quants.quantize` for Q8_0/Q4_0).
#[test]
fn k_quant_files_follow_llama_cpp_choice() {
    use pipeline_model::export::ExportModel;
    use pipeline_model::gguf::FileType;
    let tok = load_gguf(fixture("gguf/tiny_qwen2.gguf")).unwrap().tokenizer.unwrap();
    let mut cfg = pipeline_model::ModelConfig::tiny(tok.max_id_exclusive());
    cfg.hidden_size = 256;
    cfg.intermediate_size = 512;
    cfg.num_hidden_layers = 4;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 2;
    cfg.head_dim = 64;
    cfg.tie_word_embeddings = false;
    let tensors = pipeline_model::Qwen2::<dfdx::prelude::Cpu>::random_host(&cfg, 3);
    let m = ExportModel { config: cfg, tensors, tokenizer: tok, system: None, expanded_vocab: None };
    let dir = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("PIPELINE_KEEP_EXPORT").map(|k| Path::new(&k).join("k"));
    for ft in [FileType::F32, FileType::Q8_0, FileType::Q4_0, FileType::Q4_K_M] {
        let path = dir.path().join(format!("{}.gguf", ft.name()));
        m.write_gguf(&path, ft, "k").unwrap();
        if let Some(k) = &keep {
            std::fs::create_dir_all(k).unwrap();
            std::fs::copy(&path, k.join(format!("{}.gguf", ft.name()))).unwrap();
        }
        let f = GgufFile::open(&path).unwrap();
        let ty = |n: &str| GgmlType::from_id(f.tensor_info(n).unwrap().ggml_type).unwrap();
        if ft == FileType::Q4_K_M {
            assert_eq!(ty("output.weight"), GgmlType::Q6_K);
            assert_eq!(ty("token_embd.weight"), GgmlType::Q4_K);
            for l in 0..4 {
                let more = if l >= 2 { GgmlType::Q6_K } else { GgmlType::Q4_K };
                assert_eq!(ty(&format!("blk.{l}.attn_v.weight")), more, "layer {l}");
                assert_eq!(ty(&format!("blk.{l}.ffn_down.weight")), more, "layer {l}");
                assert_eq!(ty(&format!("blk.{l}.attn_q.weight")), GgmlType::Q4_K);
                assert_eq!(ty(&format!("blk.{l}.attn_q.bias")), GgmlType::F32);
            }
        }
        if ft == FileType::Q4_0 {
            assert_eq!(ty("output.weight"), GgmlType::Q6_K, "llama-quantize gives the head 6 bits");
        }
        assert_eq!(f.get("general.file_type").and_then(|v| v.as_u64()), Some(ft.id() as u64));
        for (name, t) in &m.tensors {
            let g = pipeline_model::gguf::gguf_name(name).unwrap();
            let got = f.dequantize(&g).unwrap();
            assert_eq!(got.shape, t.shape, "{g}");
            let amax = t.data.iter().fold(0f32, |a, x| a.max(x.abs()));
            let err = got.data.iter().zip(&t.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let bound = match ty(&g) {
                GgmlType::F32 => 0.0,
                GgmlType::Q8_0 => amax / 127.0,
                GgmlType::Q6_K => amax / 15.0,
                _ => amax / 4.0,
            };
            assert!(err <= bound, "{} {g}: error {err} > {bound}", ft.name());
        }
    }
}
