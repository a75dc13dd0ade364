//! general_qa loading (both row layouts), bad-file errors, the result table / JSON / CSV and the
//! comparison of two reports.

use std::path::{Path, PathBuf};

use pipeline_metrics::eval::{run_qa, PredictError, Predictor, Prompt, RunOptions};
use pipeline_metrics::qa::load_qa_jsonl;
use pipeline_metrics::report::{compare, Report};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn snap() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../snapshots/metrics"));
    s.set_prepend_module_to_snapshot(false);
    s
}

#[test]
fn both_row_layouts_load() {
    let items = load_qa_jsonl(&fixtures().join("qa/example.jsonl")).unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0].messages.len(), 2);
    assert_eq!(items[0].messages[0].role, "system");
    assert_eq!(items[2].messages[0].content, "中国的首都是哪里？");
    assert_eq!(items[2].reference, "中国的首都是北京");
    assert_eq!(items[3].messages.len(), 4);
    assert_eq!(items[3].reference, "Rome.");
}

#[test]
fn bad_jsonl_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, &[u8], &str)> = vec![
        ("a.jsonl", b"{\"query\": \"q\", \"response\": \"r\"}\n\n{\"query\": \"q\"}\n", ":3: missing `response` (or `answer`)"),
        ("b.jsonl", b"{\"query\": \"q\", \"response\": \"r\"}\n{not json\n", ":2: invalid JSON"),
        ("c.jsonl", b"{\"query\": \"q\", \"response\": \"r\"}\n{\"query\": \"\xc3\x28\", \"response\": \"r\"}\n", ":2: invalid UTF-8"),
        ("d.jsonl", b"{\"response\": \"r\"}\n", ":1: missing `query`"),
        ("e.jsonl", b"{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}], \"response\": \"r\"}\n", ":1: `messages` must end with a user turn"),
    ];
    for (name, bytes, want) in cases {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let err = load_qa_jsonl(&p).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
    }
}

/// Echoes the reference-like answer for the first rows and nothing for the last.
struct Echo;
impl Predictor for Echo {
    fn name(&self) -> String {
        "echo".into()
    }
    fn generate(&mut self, prompts: &[Prompt]) -> Result<Vec<String>, PredictError> {
        Ok(prompts
            .iter()
            .map(|p| match p.messages.last().unwrap().content.as_str() {
                "太阳系中最大的行星是哪颗？" => "是木星".to_string(),
                "什么动物被称为沙漠之舟？" => "骆驼".to_string(),
                "中国的首都是哪里？" => "北京是中国的首都".to_string(),
                _ => String::new(),
            })
            .collect())
    }
    fn loglik(&mut self, _: &Prompt, c: &[String]) -> Result<Vec<f64>, PredictError> {
        Ok(vec![0.0; c.len()])
    }
}

#[test]
fn qa_run_table_json_csv_and_compare() {
    let mut seen = Vec::new();
    let mut progress = |d: usize, t: usize| {
        seen.push((d, t));
        true
    };
    let opts = RunOptions { subsets: vec![], limit: None, batch_size: 3, progress: &mut progress };
    let (rows, records) = run_qa(&fixtures().join("qa"), opts, &mut Echo).unwrap();
    assert_eq!(seen, [(3, 4), (4, 4)]);
    assert_eq!(records.len(), 4);
    // The empty prediction counts for BLEU (0) but has no ROUGE keys.
    assert!(records[3].scores.contains_key("bleu-1") && !records[3].scores.contains_key("rouge-1-f"));
    let bleu1 = rows.iter().find(|r| r.metric == "bleu-1").unwrap();
    let rouge1 = rows.iter().find(|r| r.metric == "rouge-1-f").unwrap();
    assert_eq!((bleu1.num, rouge1.num), (4, 3));
    let report = Report { rows, scorer: None };
    let d = tempfile::tempdir().unwrap();
    report.write(d.path()).unwrap();
    let back = Report::read(d.path()).unwrap();
    assert_eq!(back, report);
    snap().bind(|| {
        insta::assert_snapshot!("qa_table", report.table());
        insta::assert_snapshot!("qa_csv", std::fs::read_to_string(d.path().join("report.csv")).unwrap());
    });
    let mut b = report.clone();
    for r in &mut b.rows {
        r.score = (r.score + 0.1).min(1.0);
    }
    b.rows.pop();
    snap().bind(|| insta::assert_snapshot!("qa_compare", compare(&report, &b, "base", "sft")));
}

/// Regression (issue 15, point 9): `eval --compare` named its columns by path, not by model.
#[test]
fn compare_columns_are_named_by_model() {
    let row = |model: &str| pipeline_metrics::report::ReportRow {
        model: model.into(),
        dataset: "general_qa".into(),
        metric: "bleu-4".into(),
        subset: "s".into(),
        num: 1,
        score: 0.5,
        cat0: "default".into(),
    };
    let rep = |models: &[&str]| Report { rows: models.iter().map(|m| row(m)).collect(), scorer: None };
    let names = |a: &Report, b: &Report| pipeline_metrics::report::column_names(a, b, "runs/a", "runs/b");
    assert_eq!(names(&rep(&["base"]), &rep(&["sft"])), ("base".into(), "sft".into()));
    assert_eq!(names(&rep(&["sft", "dpo", "sft"]), &rep(&["x"])), ("sft, dpo".into(), "x".into()));
    assert_eq!(names(&rep(&["m"]), &rep(&["m"])), ("m, a".into(), "m, b".into()), "the same model twice");
    assert_eq!(names(&rep(&[""]), &rep(&["sft"])), ("runs/a".into(), "sft".into()), "no model name: the path");
}
