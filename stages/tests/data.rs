//! Integration tests of the data stages (collect, dedupe, clean, label, augment), run through
//! the registry with a hand-built `RunCtx`, on the fixtures in `tests/fixtures/data/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use pipeline_engine::{NullSink, PlanCtx, RunCtx, RunParts, StageError};
use pipeline_stages::data::{read_dataset, write_dataset, Label, Message, Sample};
use rand::{Rng, SeedableRng};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

struct Ran {
    report: serde_json::Value,
    outputs: BTreeMap<String, PathBuf>,
    _tmp: tempfile::TempDir,
}

impl Ran {
    fn rows(&self) -> Vec<Sample> {
        read_dataset(&self.outputs["data"]).unwrap()
    }
    fn file(&self, output: &str, name: &str) -> String {
        std::fs::read_to_string(self.outputs[output].join(name)).unwrap()
    }
}

/// Plan (declare) then run stage `kind` with `params` (TOML) and `inputs`.
fn run_stage(kind: &str, params: &str, recipe_dir: &Path, inputs: &[(&str, &Path)]) -> Result<Ran, StageError> {
    run_stage_with(kind, params, recipe_dir, inputs, Arc::new(NullSink))
}

/// Records the messages a stage sends.
#[derive(Default)]
struct Messages(std::sync::Mutex<Vec<String>>);
impl pipeline_engine::EventSink for Messages {
    fn stage_event(&self, _: &str, event: pipeline_engine::StageEvent) {
        if let pipeline_engine::StageEvent::Message(m) = event {
            self.0.lock().unwrap().push(m);
        }
    }
}

/// [`run_stage`], the stage's events going to `sink`.
fn run_stage_with(
    kind: &str,
    params: &str,
    recipe_dir: &Path,
    inputs: &[(&str, &Path)],
    sink: Arc<dyn pipeline_engine::EventSink>,
) -> Result<Ran, StageError> {
    let reg = pipeline_stages::registry();
    let stage = reg.get(kind).unwrap();
    let params: toml::Table = toml::from_str(params).unwrap();
    let names: Vec<&str> = inputs.iter().map(|(n, _)| *n).collect();
    let declared = stage.declare(&PlanCtx { stage_id: kind, params: &params, input_names: names, recipe_dir })?;
    let tmp = tempfile::tempdir().unwrap();
    let outputs: BTreeMap<String, PathBuf> = declared.outputs.iter().map(|o| (o.clone(), tmp.path().join(o))).collect();
    for d in outputs.values() {
        std::fs::create_dir_all(d).unwrap();
    }
    let ctx = RunCtx::new(RunParts {
        stage_id: kind.to_string(),
        params,
        seed: 42,
        recipe_dir: recipe_dir.to_path_buf(),
        inputs: inputs.iter().map(|(n, p)| (n.to_string(), vec![p.to_path_buf()])).collect(),
        outputs: outputs.clone(),
        scratch: tmp.path().join("scratch"),
        sink,
        cancel: Arc::new(AtomicBool::new(false)),
    });
    stage.run(&ctx)?;
    let mut report = ctx.take_report().expect("stage sets a report");
    strip_timings(&mut report);
    Ok(Ran { report, outputs, _tmp: tmp })
}

fn strip_timings(v: &mut serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, _| !k.ends_with("_ms"));
        o.values_mut().for_each(strip_timings);
    }
}

fn snapshot(name: &str, value: &impl serde::Serialize) {
    let text = serde_json::to_string_pretty(value).unwrap().replace(&fixtures().display().to_string(), "[FIXTURES]");
    insta::with_settings!({ snapshot_path => "../../snapshots/data", prepend_module_to_snapshot => false }, {
        insta::assert_snapshot!(name, text);
    });
}

#[test]
fn every_format_round_trips_to_canonical_rows() {
    let dir = fixtures().join("formats");
    for (file, name) in [
        ("messages.jsonl", "messages"),
        ("query_response.jsonl", "query_response"),
        ("sharegpt.jsonl", "sharegpt"),
        ("sharegpt_llamafactory.json", "sharegpt_llamafactory"),
        ("alpaca.json", "alpaca"),
        ("multimodal.jsonl", "multimodal"),
        ("embedding.jsonl", "embedding"),
        ("classification.csv", "classification"),
        ("kto.jsonl", "kto"),
        ("kto_llamafactory.json", "kto_llamafactory"),
        ("dpo.jsonl", "dpo"),
        ("dpo_llamafactory.json", "dpo_llamafactory"),
        ("corpus", "text_corpus"),
    ] {
        let params = format!("datasets = [\"{file}\"]\nshuffle = false");
        let ran = run_stage("collect", &params, &dir, &[]).unwrap_or_else(|e| panic!("{file}: {e}"));
        snapshot(&format!("format_{name}"), &ran.rows());
        assert_eq!(ran.report["quarantined"], 0);
    }
}

#[test]
fn canonical_parquet_is_read_back_by_collect() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = vec![Sample {
        id: "x:1".into(),
        source: "x".into(),
        messages: vec![Message::new("user", "q"), Message::new("assistant", "a")],
        rejected_response: Some("bad".into()),
        label: Some(Label::Bool(false)),
        ..Default::default()
    }];
    write_dataset(&tmp.path().join("ds"), &rows).unwrap();
    let ran = run_stage("collect", "datasets = [\"ds/data.parquet\"]\nshuffle = false", tmp.path(), &[]).unwrap();
    let got = ran.rows();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].messages, rows[0].messages);
    assert_eq!(got[0].rejected_response, rows[0].rejected_response);
    assert_eq!(got[0].label, rows[0].label);
}

#[test]
fn self_cognition_substitutes_names_per_language() {
    let params = r#"
        datasets = ["builtin:self-cognition"]
        model_name = ["小派", "Pipo"]
        model_author = ["派派实验室", "Pipeline Lab"]
        shuffle = false
    "#;
    let ran = run_stage("collect", params, Path::new("."), &[]).unwrap();
    let rows = ran.rows();
    assert!(rows.len() >= 100, "{}", rows.len());
    for s in &rows {
        let t = s.joined_text();
        assert!(!t.contains("{{"), "{t}");
        let zh = t.contains("小派");
        assert!(zh != t.contains("Pipo"), "exactly one language's name in: {t}");
    }
    assert!(rows.iter().filter(|s| s.joined_text().contains("小派")).count() >= 40);
    // One value for both languages, LLaMA-Factory's lowercase placeholders.
    let dir = fixtures().join("formats");
    let ran = run_stage(
        "collect",
        "datasets = [\"identity.json\"]\nmodel_name = \"swift-robot\"\nmodel_author = \"swift\"\nshuffle = false",
        &dir,
        &[],
    )
    .unwrap();
    snapshot("self_cognition_identity", &ran.rows());
    // Missing params are a plan-time error for the builtin.
    let err = run_stage("collect", "datasets = [\"builtin:self-cognition\"]", Path::new("."), &[]).err().unwrap();
    assert!(err.to_string().contains("model_name"), "{err}");
}

#[test]
fn sample_counts_and_shuffle_are_seeded() {
    let params = r#"
        datasets = ["builtin:self-cognition#30", "builtin:general-chat#500"]
        model_name = "Pipo"
        model_author = "Pipeline Lab"
    "#;
    let a = run_stage("collect", params, Path::new("."), &[]).unwrap();
    let b = run_stage("collect", params, Path::new("."), &[]).unwrap();
    let (ra, rb) = (a.rows(), b.rows());
    assert_eq!(ra.len(), 530);
    assert_eq!(ra, rb);
    assert_eq!(
        std::fs::read(a.outputs["data"].join("data.parquet")).unwrap(),
        std::fs::read(b.outputs["data"].join("data.parquet")).unwrap(),
        "byte-identical output for the same seed"
    );
    // general-chat has fewer than 500 rows: every row at least once, ids of repeats suffixed.
    assert!(ra.iter().any(|s| s.id.contains(":r1")));
    let sc = ra.iter().filter(|s| s.source == "builtin:self-cognition").count();
    assert_eq!(sc, 30);
    // Shuffled: the two sources are interleaved.
    assert!(ra[..30].iter().any(|s| s.source == "builtin:general-chat"));
    snapshot("collect_report_sampled", &a.report);
}

#[test]
fn malformed_rows_fail_with_file_line_and_field() {
    let dir = fixtures().join("broken");
    for (file, want) in [
        ("bad_role.jsonl", "bad_role.jsonl:2: field `messages[1].role`: unknown role `wizard`"),
        ("bad_json.jsonl", "bad_json.jsonl:2: field `(json)`"),
        ("missing_image.jsonl", "missing_image.jsonl:1: field `images[0]`: file not found"),
        (
            "tag_mismatch.jsonl",
            "tag_mismatch.jsonl:1: field `images`: 2 `<image>` tag(s) in the messages but 1 path(s)",
        ),
        ("bad_history.json", "bad_history.json:3: field `history[0]`"),
        ("bad_label.csv", "bad_label.csv:3: field `(csv)`"),
    ] {
        let err = run_stage("collect", &format!("datasets = [\"{file}\"]"), &dir, &[]).err().unwrap().to_string();
        assert!(err.contains(want), "{file}: got `{err}`, want `{want}`");
    }
}

#[test]
fn quarantine_sets_rows_aside_with_reasons() {
    let dir = fixtures().join("broken");
    let params = r#"
        datasets = ["bad_role.jsonl", "bad_json.jsonl", "bad_history.json", "bad_label.csv"]
        on_error = "quarantine"
        shuffle = false
    "#;
    let ran = run_stage("collect", params, &dir, &[]).unwrap();
    assert_eq!(ran.report["quarantined"], 4);
    assert_eq!(ran.rows().len(), 5);
    let q: Vec<serde_json::Value> =
        ran.file("quarantine", "rows.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(q.len(), 4);
    assert_eq!(q[0]["line"], 2);
    assert_eq!(q[0]["field"], "messages[1].role");
    snapshot("quarantine_report", &ran.report);
}

/// Regression (issue 14, defects 8, 9 and 5): invalid UTF-8 in a JSONL line failed the whole file
/// without a line number, whatever `on_error` said; a byte-order mark on line 1 was an error; an
/// empty dataset gave 0 rows without a word; a missing dataset was found only at run time, after
/// other stages ran; quarantine rows named their file by absolute path (so the artifact's digest
/// depended on where the project lived).
#[test]
fn jsonl_invalid_utf8_bom_empty_and_missing_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let row = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
    std::fs::create_dir_all(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/bom.jsonl"), format!("\u{feff}{row}\n{row}\n")).unwrap();
    let mut bad = format!("{row}\n").into_bytes();
    bad.extend_from_slice(b"{\"messages\": \"\xff\xfe\"}\n");
    bad.extend_from_slice(format!("{row}\n").as_bytes());
    std::fs::write(dir.path().join("d/bad_utf8.jsonl"), bad).unwrap();
    std::fs::write(dir.path().join("d/empty.jsonl"), "").unwrap();

    // A BOM on line 1 is not data.
    let ran = run_stage("collect", r#"datasets = ["d/bom.jsonl"]"#, dir.path(), &[]).unwrap();
    assert_eq!(ran.rows().len(), 2);
    // Invalid UTF-8: an error of its file line ...
    let err = run_stage("collect", r#"datasets = ["d/bad_utf8.jsonl"]"#, dir.path(), &[]).err().unwrap().to_string();
    assert!(err.contains("bad_utf8.jsonl:2: field `(json)`: invalid UTF-8 at byte 15 of the line"), "{err}");
    // ... or, with `on_error = "quarantine"`, a row set aside with its line, its file relative.
    let params = "datasets = [\"d/bad_utf8.jsonl\"]\non_error = \"quarantine\"\nshuffle = false";
    let ran = run_stage("collect", params, dir.path(), &[]).unwrap();
    assert_eq!((ran.rows().len(), ran.report["quarantined"].as_u64()), (2, Some(1)));
    let q: Vec<serde_json::Value> =
        ran.file("quarantine", "rows.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(q.len(), 1);
    assert_eq!((q[0]["path"].as_str(), q[0]["line"].as_u64()), (Some("d/bad_utf8.jsonl"), Some(2)), "{q:?}");
    // An empty dataset warns.
    let sink = Arc::new(Messages::default());
    let ran =
        run_stage_with("collect", r#"datasets = ["d/bom.jsonl", "d/empty.jsonl"]"#, dir.path(), &[], sink.clone())
            .unwrap();
    assert_eq!(ran.rows().len(), 2);
    let said = sink.0.lock().unwrap().clone();
    assert!(said.iter().any(|m| m == "warning: dataset `d/empty.jsonl` has no rows"), "{said:?}");
    // A missing dataset is a params error when the recipe is planned (exit 2), before anything runs.
    let err = run_stage("collect", r#"datasets = ["d/bom.jsonl", "d/nope.jsonl"]"#, dir.path(), &[]).err().unwrap();
    assert!(matches!(&err, StageError::Params(m) if m.starts_with("dataset `d/nope.jsonl` not found")), "{err}");
}

/// A generated corpus of random-word documents with planted near duplicates.
fn planted_corpus(n_docs: usize, n_dups: usize, seed: u64) -> (Vec<Sample>, Vec<(usize, usize)>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let vocab: Vec<String> = (0..5000).map(|i| format!("w{i:x}q")).collect();
    let mut docs: Vec<Vec<String>> = (0..n_docs)
        .map(|_| (0..rng.gen_range(80..160)).map(|_| vocab[rng.gen_range(0..vocab.len())].clone()).collect())
        .collect();
    let mut planted = Vec::new();
    while planted.len() < n_dups {
        let src = rng.gen_range(0..n_docs);
        let mut d = docs[src].clone();
        // One or two word substitutions plus maybe a deletion: true 5-gram Jaccard ~0.8-0.95.
        for _ in 0..rng.gen_range(1..=2) {
            let i = rng.gen_range(0..d.len());
            d[i] = vocab[rng.gen_range(0..vocab.len())].clone();
        }
        if rng.gen_bool(0.5) {
            let i = rng.gen_range(0..d.len());
            d.remove(i);
        }
        let a = pipeline_stages::data::text::shingle_set(&docs[src].join(" "), 5);
        let b = pipeline_stages::data::text::shingle_set(&d.join(" "), 5);
        let j = pipeline_stages::data::text::jaccard_sorted(&a, &b);
        if j < 0.8 {
            continue;
        }
        planted.push((docs.len(), src));
        docs.push(d);
    }
    let rows = docs
        .into_iter()
        .enumerate()
        .map(|(i, d)| Sample {
            id: format!("gen:{i}"),
            source: "gen".into(),
            text: Some(d.join(" ")),
            ..Default::default()
        })
        .collect();
    (rows, planted)
}

#[test]
fn dedupe_finds_planted_near_duplicates() {
    let (mut rows, planted) = planted_corpus(3000, 300, 11);
    // Plus exact duplicates modulo case and whitespace.
    for i in 0..50 {
        let mut s = rows[i * 7].clone();
        s.id = format!("exact:{i}");
        s.text = Some(format!("  {}  ", s.text.unwrap().to_uppercase().replace(' ', "   ")));
        rows.push(s);
    }
    let tmp = tempfile::tempdir().unwrap();
    write_dataset(&tmp.path().join("in"), &rows).unwrap();
    let ran = run_stage("dedupe", "threshold = 0.8", tmp.path(), &[("data", &tmp.path().join("in"))]).unwrap();
    let removed: Vec<serde_json::Value> =
        ran.file("removed", "removed.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let removed_ids: BTreeMap<String, String> = removed
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r["duplicate_of"].as_str().unwrap().to_string()))
        .collect();
    let found =
        planted.iter().filter(|(d, src)| removed_ids.get(&format!("gen:{d}")) == Some(&format!("gen:{src}"))).count();
    let recall = found as f64 / planted.len() as f64;
    let planted_ids: std::collections::BTreeSet<String> = planted.iter().map(|(d, _)| format!("gen:{d}")).collect();
    let false_pos = removed_ids.keys().filter(|k| k.starts_with("gen:") && !planted_ids.contains(*k)).count();
    assert!(recall >= 0.9, "near-dup recall {recall:.3} ({found}/{})", planted.len());
    assert_eq!(false_pos, 0, "unrelated documents removed");
    assert_eq!(ran.report["removed_exact"], 50);
    assert_eq!(ran.report["rows_out"].as_u64().unwrap() as usize, rows.len() - removed.len());
    // Deterministic for a seed.
    let again = run_stage("dedupe", "threshold = 0.8", tmp.path(), &[("data", &tmp.path().join("in"))]).unwrap();
    assert_eq!(again.file("removed", "removed.jsonl"), ran.file("removed", "removed.jsonl"));
    eprintln!("planted near-dup recall {recall:.3}, report {}", ran.report);
}

#[test]
fn clean_normalises_filters_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let s = |id: &str, t: &str| Sample {
        id: id.into(),
        source: "t".into(),
        messages: vec![Message::new("user", t), Message::new("assistant", "ok")],
        ..Default::default()
    };
    let spam = (0..60).map(|_| "buy now").collect::<Vec<_>>().join("\n");
    let rows = vec![
        s("fullwidth", "Ｈｅｌｌｏ\u{200B}  <b>world</b> &amp; more"),
        s("pii", "mail me: bob@example.com, phone 13800138000"),
        s("too_long", &"x".repeat(500)),
        s("french", "Ceci est une phrase écrite entièrement en français, avec des accents."),
        s("russian", "Это предложение написано по-русски."),
        s("spam", &spam),
        s("zh", "你好，世界！"),
    ];
    write_dataset(&tmp.path().join("in"), &rows).unwrap();
    let params = r#"
        mask_pii = true
        max_chars = 300
        languages = ["zh", "en"]
    "#;
    let ran = run_stage("clean", params, tmp.path(), &[("data", &tmp.path().join("in"))]).unwrap();
    snapshot("clean_rows", &ran.rows());
    snapshot("clean_report", &ran.report);
    snapshot("clean_rejected", &ran.file("rejected", "rejected.jsonl").lines().collect::<Vec<_>>());
}

#[test]
fn clean_token_bounds_use_the_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    // A word-level tokenizer.json: every whitespace-separated word is one token.
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1, "b": 2}, "unk_token": "[UNK]"}
    });
    std::fs::write(tmp.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let rows: Vec<Sample> = [1usize, 4, 9]
        .iter()
        .map(|&n| Sample {
            id: format!("n{n}"),
            source: "t".into(),
            text: Some(vec!["a"; n].join(" ")),
            ..Default::default()
        })
        .collect();
    write_dataset(&tmp.path().join("in"), &rows).unwrap();
    let ran = run_stage(
        "clean",
        "tokenizer = \"tokenizer.json\"\nmin_tokens = 2\nmax_tokens = 8",
        tmp.path(),
        &[("data", &tmp.path().join("in"))],
    )
    .unwrap();
    let ids: Vec<String> = ran.rows().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["n4"]);
    assert_eq!(ran.report["dropped"]["min_tokens"], 1);
    assert_eq!(ran.report["dropped"]["max_tokens"], 1);
    let err = run_stage("clean", "max_tokens = 8", tmp.path(), &[("data", &tmp.path().join("in"))]).err().unwrap();
    assert!(err.to_string().contains("tokenizer"), "{err}");
}

#[test]
fn label_rules_quality_and_balance() {
    let tmp = tempfile::tempdir().unwrap();
    let s = |id: &str, q: &str, gold: Option<&str>| Sample {
        id: id.into(),
        source: "t".into(),
        messages: vec![Message::new("user", q), Message::new("assistant", "a")],
        label: gold.map(|g| Label::Text(g.into())),
        ..Default::default()
    };
    let rows = vec![
        s("1", "Who are you?", Some("identity")),
        s("2", "你是谁？", Some("identity")),
        s("3", "What is 2 + 3?", Some("math")),
        s("4", "What is your name?", Some("identity")),
        s("5", "Compute 7*8", Some("other")),
        s("6", "Tell me a story", None),
    ];
    write_dataset(&tmp.path().join("in"), &rows).unwrap();
    let params = r#"
        field = "user"
        default = "other"
        rules = [
          { label = "identity", keywords = ["who are you", "你是谁", "your name"] },
          { label = "math", regex = '\d+\s*[-+*/]\s*\d+' },
        ]
    "#;
    let ran = run_stage("label", params, tmp.path(), &[("data", &tmp.path().join("in"))]).unwrap();
    let out = ran.rows();
    assert_eq!(out[0].label, Some(Label::Text("identity".into())), "original label kept");
    assert_eq!(out[4].label2, Some(Label::Text("math".into())));
    assert_eq!(out[5].label, Some(Label::Text("other".into())));
    snapshot("label_report", &ran.report);
}

#[test]
fn augment_marks_rows_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let collect = run_stage(
        "collect",
        "datasets = [\"builtin:self-cognition#20\"]\nmodel_name = \"Pipo\"\nmodel_author = \"Lab\"",
        tmp.path(),
        &[],
    )
    .unwrap();
    let input = collect.outputs["data"].clone();
    let params = r#"
        noise = { char_swap = 0.05, word_drop = 0.1 }
        paraphrase = { copies = 1 }
    "#;
    let a = run_stage("augment", params, tmp.path(), &[("data", &input)]).unwrap();
    let b = run_stage("augment", params, tmp.path(), &[("data", &input)]).unwrap();
    let rows = a.rows();
    assert_eq!(rows, b.rows());
    let noised = a.report["noised"].as_u64().unwrap() as usize;
    let unchanged = a.report["noise_unchanged"].as_u64().unwrap() as usize;
    assert_eq!(noised + unchanged, 20, "each row gets one noise copy unless the noise left it unchanged");
    assert_eq!(rows.len(), 40 + noised);
    assert_eq!(rows.iter().filter(|s| s.augmented).count(), 20 + noised);
    assert!(rows[..20].iter().all(|s| !s.augmented));
    for s in rows.iter().filter(|s| s.id.contains(":aug-noise")) {
        let src = rows.iter().find(|o| Some(o.id.as_str()) == s.id.rsplit_once(":aug-noise").map(|p| p.0)).unwrap();
        assert_ne!(s.messages, src.messages, "{} equals its source", s.id);
    }
    let para: Vec<_> = rows.iter().filter(|s| s.id.contains(":aug-para")).collect();
    assert_eq!(para.len(), 20);
    assert!(para.iter().all(|s| s.messages.iter().any(|m| m.role == "assistant" && m.content.contains("Pipo"))));
    snapshot("augment_report", &a.report);
}

#[test]
fn headline_chain_collect_dedupe_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let params = r#"
        datasets = ["builtin:self-cognition#200", "builtin:general-chat", "builtin:corpus"]
        model_name = ["小派", "Pipo"]
        model_author = ["派派实验室", "Pipeline Lab"]
    "#;
    let c = run_stage("collect", params, tmp.path(), &[]).unwrap();
    let d = run_stage("dedupe", "", tmp.path(), &[("data", &c.outputs["data"])]).unwrap();
    let k = run_stage("clean", "", tmp.path(), &[("data", &d.outputs["data"])]).unwrap();
    // #200 over 100 rows repeats every row twice: the repeats are exact duplicates.
    assert!(d.report["removed_exact"].as_u64().unwrap() >= 100);
    assert_eq!(k.report["rows_in"], d.report["rows_out"]);
    snapshot("chain_collect_report", &c.report);
    snapshot("chain_dedupe_report", &d.report);
    snapshot("chain_clean_report", &k.report);
}

#[test]
#[ignore = "heavy: needs the LLaMA-Factory demo data; run scripts/fetch-llamafactory-data.sh, then set PIPELINE_LLAMAFACTORY_DATA"]
fn real_datasets_load_through_collect() {
    let dir = std::env::var("PIPELINE_LLAMAFACTORY_DATA")
        .map(PathBuf::from)
        .expect("set PIPELINE_LLAMAFACTORY_DATA to the directory printed by scripts/fetch-llamafactory-data.sh");
    for (file, rows, check) in [
        ("alpaca_en_demo.json", 999usize, "alpaca"),
        ("alpaca_zh_demo.json", 1000, "alpaca"),
        ("dpo_en_demo.json", 300, "dpo"),
        ("dpo_zh_demo.json", 300, "dpo"),
        ("kto_en_demo.json", 300, "kto"),
        ("identity.json", 91, "identity"),
    ] {
        let ran = run_stage(
            "collect",
            &format!("datasets = [\"{file}\"]\nmodel_name = \"Pipo\"\nmodel_author = \"Lab\"\nshuffle = false"),
            &dir,
            &[],
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        let out = ran.rows();
        assert_eq!(out.len(), rows, "{file}");
        for s in &out {
            assert!(s.messages.iter().any(|m| m.role == "user"), "{file} {}", s.id);
            match check {
                "dpo" => assert!(s.rejected_response.is_some() && s.messages.last().unwrap().role == "assistant"),
                "kto" => assert!(s.label.as_ref().and_then(Label::as_bool).is_some(), "{file} {}", s.id),
                "identity" => assert!(!s.joined_text().contains("{{")),
                _ => assert_eq!(s.messages.last().unwrap().role, "assistant"),
            }
        }
        eprintln!("{file}: {} rows, formats {}", out.len(), ran.report["datasets"][0]["formats"]);
    }
}
