//! general_mcq against evalscope 1.14.1 (`utils/multi_choices.py`): prompts with and without
//! few-shot, answer extraction (golden `fixtures/mcq_golden.json` from
//! `scripts/oracles/mcq_golden.py`), the seed's example rows, and bad-file errors.

use std::path::{Path, PathBuf};

use pipeline_metrics::eval::{run_mcq, McqScorer, PredictError, Predictor, Prompt, RunOptions};
use pipeline_metrics::mcq::{extract_answer, load_mcq_csv, load_mcq_subset, mcq_prompt};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden() -> Value {
    serde_json::from_str(include_str!("fixtures/mcq_golden.json")).unwrap()
}

#[test]
fn prompts_equal_evalscope() {
    let sub = load_mcq_subset(&fixtures().join("mcq"), "example").unwrap();
    for p in golden()["prompts"].as_array().unwrap() {
        let row = p["row"].as_u64().unwrap() as usize;
        let shots = p["few_shot_num"].as_u64().unwrap() as usize;
        assert_eq!(
            mcq_prompt(&sub.val[row], &sub.dev[..shots]),
            p["prompt"].as_str().unwrap(),
            "row {row} shots {shots}"
        );
    }
}

#[test]
fn extraction_equals_evalscope() {
    let mut bad = Vec::new();
    let cases = golden()["extraction"].as_array().unwrap().clone();
    assert!(cases.len() > 300);
    for c in cases {
        let text = c["completion"].as_str().unwrap();
        let n = c["n_choices"].as_u64().unwrap() as usize;
        let want = c["answer"].as_str();
        let got = extract_answer(text, n);
        if got.as_deref() != want {
            bad.push(format!("{text:?} (n={n}): evalscope {want:?} ours {got:?}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Answers from a fixed table keyed by a substring of the prompt; records what it was asked.
struct Scripted {
    answers: Vec<(&'static str, &'static str)>,
    asked: Vec<Prompt>,
}

impl Predictor for Scripted {
    fn name(&self) -> String {
        "scripted".into()
    }
    fn generate(&mut self, prompts: &[Prompt]) -> Result<Vec<String>, PredictError> {
        self.asked.extend(prompts.iter().cloned());
        Ok(prompts
            .iter()
            .map(|p| {
                let text = &p.messages.last().unwrap().content;
                self.answers.iter().find(|(k, _)| text.contains(k)).map_or("不知道", |(_, a)| a).to_string()
            })
            .collect())
    }
    fn loglik(&mut self, prompt: &Prompt, continuations: &[String]) -> Result<Vec<f64>, PredictError> {
        assert_eq!(prompt.assistant_prefix, "答案：");
        // Prefers B for the amino-acid question, C otherwise.
        let want = if prompt.messages[0].content.contains("问题：通常来说") { "B" } else { "C" };
        Ok(continuations.iter().map(|c| if c == want { -0.1 } else { -3.0 }).collect())
    }
}

#[test]
fn seed_rows_load_and_score() {
    let dir = fixtures().join("mcq");
    let mut p = Scripted {
        answers: vec![("问题：通常来说", "答案：C"), ("问题：血液内", "我觉得是A")], asked: vec![]
    };
    let mut progress = |_: usize, _: usize| true;
    let opts = RunOptions { subsets: vec![], limit: None, batch_size: 8, progress: &mut progress };
    let (rows, records) = run_mcq(&dir, 2, McqScorer::Generate, opts, &mut p).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].metric.as_str(), rows[0].subset.as_str(), rows[0].num), ("AverageAccuracy", "example", 2));
    assert!((rows[0].score - 0.5).abs() < 1e-12);
    assert_eq!(records[0].extracted.as_deref(), Some("C"));
    assert_eq!(records[1].extracted.as_deref(), Some("A"));
    assert!(p.asked[0].messages[0].content.starts_with("Here are some examples"));

    let mut progress = |_: usize, _: usize| true;
    let opts = RunOptions { subsets: vec!["example".into()], limit: None, batch_size: 1, progress: &mut progress };
    let (rows, records) = run_mcq(&dir, 0, McqScorer::Loglik, opts, &mut p).unwrap();
    assert_eq!(records[0].extracted.as_deref(), Some("B"));
    assert_eq!(records[1].extracted.as_deref(), Some("C"));
    assert!((rows[0].score - 0.5).abs() < 1e-12);
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn bad_csv_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("noanswer_val.csv", b"id,question,A,B\n1,q,x,y\n".to_vec(), ":1: header has no `answer` column"),
        ("notoption_val.csv", b"question,A,B,C,answer\nq,x,y,z,A\nq2,x,y,z,D\n".to_vec(), ":3: answer `D` is not among the options A,B,C"),
        // evalscope's own example_val.csv row 2 has an unquoted `299,792 km/s`.
        ("count_val.csv", "id,question,A,B,C,D,answer\n1,q,a,b,c,d,A\n2,空气中的声速是多少？,343 m/s,299,792 km/s,1,225 km/h,60 m/s,A\n".as_bytes().to_vec(), ":3: wrong option count: row has 9 fields, the header has 7"),
        ("gap_val.csv", b"question,A,B,C,D,answer\nq,x,,z,w,A\n".to_vec(), ":2: wrong option count: option B is empty"),
        ("utf8_val.csv", b"question,A,B,answer\nq,x,y,A\nq,\xff\xfe,y,A\n".to_vec(), ":3: invalid UTF-8"),
    ];
    for (name, bytes, want) in cases {
        let path = write(d.path(), name, &bytes);
        let err = load_mcq_csv(&path).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
    }
}

/// Regression (issue 14, defect 8): a header-only `_val.csv` scored 0.0 with exit 0; a bad row
/// names its line in the file (the header is line 1), not its data-row number.
#[test]
fn header_only_csv_is_an_error_and_bad_rows_name_file_lines() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x_val.csv"), "id,question,A,B,C,D,answer\n").unwrap();
    let e = load_mcq_subset(dir.path(), "x").unwrap_err().to_string();
    assert!(e.contains("x_val.csv") && e.contains("no questions"), "{e}");
    let p = dir.path().join("y_val.csv");
    std::fs::write(&p, "id,question,A,B,C,D,answer\n1,q,a,b,c,d,A\n2,q,a,b,c,d,Z\n").unwrap();
    let e = load_mcq_csv(&p).unwrap_err().to_string();
    assert!(e.contains(":3"), "the bad row is line 3 of the file: {e}");
}
