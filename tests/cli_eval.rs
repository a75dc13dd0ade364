//! `pipeline eval score` and `pipeline eval --compare` end to end.

use std::path::Path;
use std::process::Command;

fn pipeline() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
}

#[test]
fn score_writes_one_row_per_input_and_prints_the_table() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("pairs.jsonl");
    std::fs::write(
        &input,
        concat!(
            "{\"id\": \"a\", \"prediction\": \"我喜欢吃苹果，也喜欢吃香蕉。\", \"reference\": \"我很喜欢吃苹果和香蕉。\"}\n",
            "{\"id\": 2, \"prediction\": \"\", \"reference\": \"The cat sat on the mat.\"}\n",
            "{\"id\": \"c\", \"prediction\": \"The cat sat on the mat.\", \"reference\": \"The cat sat on the mat.\"}\n",
        ),
    )
    .unwrap();
    let output = d.path().join("scores.jsonl");
    let out = pipeline()
        .args(["eval", "score", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .arg("--report")
        .arg(d.path().join("run"))
        .args(["--model", "m"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["id"], "a");
    assert!((rows[0]["bleu-1"].as_f64().unwrap() - 0.6).abs() < 1e-12);
    assert!((rows[0]["rouge-l-p"].as_f64().unwrap() - 0.6).abs() < 1e-12);
    assert_eq!(rows[1]["id"], 2);
    assert!(rows[1].get("rouge-1-f").is_none() && rows[1]["bleu-1"] == 0.0);
    let mut s = insta::Settings::clone_current();
    s.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/metrics"));
    s.set_prepend_module_to_snapshot(false);
    s.bind(|| insta::assert_snapshot!("cli_eval_score", String::from_utf8_lossy(&out.stdout)));

    let cmp = pipeline()
        .args(["eval", "--compare"])
        .arg(d.path().join("run"))
        .arg(d.path().join("run/report.json"))
        .output()
        .unwrap();
    assert!(cmp.status.success());
    let text = String::from_utf8_lossy(&cmp.stdout);
    assert!(text.contains("| general_qa | rouge-l-f | pairs  |       2 |") && text.contains("+0.0000"), "{text}");
    // Columns are named by model (issue 15, point 9), not by path; the same model twice is told
    // apart by a / b.
    assert!(text.contains("Score (m, a)") && text.contains("Score (m, b)"), "{text}");
    assert!(!text.contains(&d.path().display().to_string()), "{text}");

    // A report of another model: its name heads its column.
    let other = d.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let mut report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("run/report.json")).unwrap()).unwrap();
    for row in report["rows"].as_array_mut().unwrap() {
        row["model"] = "sft".into();
    }
    std::fs::write(other.join("report.json"), report.to_string()).unwrap();
    let cmp = pipeline().args(["eval", "--compare"]).arg(d.path().join("run")).arg(&other).output().unwrap();
    let text = String::from_utf8_lossy(&cmp.stdout);
    assert!(cmp.status.success() && text.contains("Score (m)") && text.contains("Score (sft)"), "{text}");
}

#[test]
fn bad_input_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("bad.jsonl");
    std::fs::write(
        &input,
        "{\"id\": 1, \"prediction\": \"a\", \"reference\": \"b\"}\n{\"id\": 2, \"prediction\": \"a\"}\n",
    )
    .unwrap();
    let out = pipeline()
        .args(["eval", "score", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(d.path().join("o.jsonl"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2: missing `reference`"), "{err}");
    assert!(!d.path().join("o.jsonl").exists());
}
