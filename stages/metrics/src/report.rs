//! The seed's result table (`Model | Dataset | Metric | Subset | Num | Score | Cat.0`), its JSON and
//! CSV artifacts, and the side-by-side comparison of two runs.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::DataError;

/// One line of the result table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportRow {
    pub model: String,
    pub dataset: String,
    pub metric: String,
    pub subset: String,
    pub num: usize,
    pub score: f64,
    #[serde(rename = "cat0")]
    pub cat0: String,
}

/// A whole report (the JSON artifact).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub rows: Vec<ReportRow>,
    /// How MCQ answers were obtained (`generate` or `loglik`), when MCQ rows are present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scorer: Option<String>,
}

const HEADER: [&str; 7] = ["Model", "Dataset", "Metric", "Subset", "Num", "Score", "Cat.0"];

/// East Asian wide characters (two terminal columns): Hangul Jamo, CJK, Hangul syllables,
/// compatibility ideographs, full-width forms.
fn is_wide(c: char) -> bool {
    matches!(c as u32, 0x1100..=0x115F | 0x2E80..=0x303E | 0x3041..=0xA4CF | 0xAC00..=0xD7A3 | 0xF900..=0xFAFF | 0xFE30..=0xFE4F | 0xFF00..=0xFF60 | 0xFFE0..=0xFFE6 | 0x20000..=0x3FFFD)
}

/// A grid table in the style of evalscope's (tabulate `grid`): numbers right-aligned, scores
/// with 4 decimals.
pub fn render_grid(header: &[&str], rows: &[Vec<String>], numeric: &[bool]) -> String {
    let width = |s: &str| s.chars().map(|c| if is_wide(c) { 2 } else { 1 }).sum::<usize>();
    let mut w: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(width(c));
        }
    }
    let sep = |ch: char| -> String {
        let mut s = String::from("+");
        for wi in &w {
            s.push_str(&ch.to_string().repeat(wi + 2));
            s.push('+');
        }
        s.push('\n');
        s
    };
    let line = |cells: &[String]| -> String {
        let mut s = String::from("|");
        for (i, c) in cells.iter().enumerate() {
            let pad = " ".repeat(w[i] - width(c));
            if numeric[i] {
                s.push_str(&format!(" {pad}{c} |"));
            } else {
                s.push_str(&format!(" {c}{pad} |"));
            }
        }
        s.push('\n');
        s
    };
    let mut out = sep('-');
    out.push_str(&line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>()));
    out.push_str(&sep('='));
    for r in rows {
        out.push_str(&line(r));
        out.push_str(&sep('-'));
    }
    if rows.is_empty() {
        out.push_str(&sep('-'));
    }
    out
}

impl Report {
    /// The table as printed in the run summary.
    pub fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.model.clone(),
                    r.dataset.clone(),
                    r.metric.clone(),
                    r.subset.clone(),
                    r.num.to_string(),
                    format!("{:.4}", r.score),
                    r.cat0.clone(),
                ]
            })
            .collect();
        render_grid(&HEADER, &rows, &[false, false, false, false, true, true, false])
    }

    /// The CSV artifact (same columns as the table, full-precision scores).
    pub fn to_csv(&self) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        let _ = w.write_record(HEADER);
        for r in &self.rows {
            let _ = w.write_record([
                &r.model,
                &r.dataset,
                &r.metric,
                &r.subset,
                &r.num.to_string(),
                &r.score.to_string(),
                &r.cat0,
            ]);
        }
        String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
    }

    /// Write `report.json` and `report.csv` into `dir` (atomically).
    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        let json = serde_json::to_string_pretty(self).map_err(|e| DataError::new(dir, None, e))?;
        write_atomic(&dir.join("report.json"), json.as_bytes())?;
        write_atomic(&dir.join("report.csv"), self.to_csv().as_bytes())
    }

    /// Read a report: a `report.json` file or a directory holding one.
    pub fn read(path: &Path) -> Result<Report, DataError> {
        let file = if path.is_dir() { path.join("report.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| DataError::new(&file, None, e))?;
        serde_json::from_str(&text)
            .map_err(|e| DataError::new(&file, Some(e.line()), format!("not a pipeline eval report: {e}")))
    }
}

/// Write a file atomically ([`pipeline_cache::fs::write_atomic`]: unique temp file in the same
/// directory, fsync, rename), creating the directory; an error names `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    pipeline_cache::fs::write_atomic(path, bytes).map_err(|e| DataError::new(path, None, e))
}

/// The names `compare`'s score columns get: each report's model names (its rows' `Model`
/// column: the `model_name` param or the evaluate stage's model), in row order; the file path
/// only when a report names no model. Two reports of the same model are told apart by `, a` /
/// `, b`.
pub fn column_names(a: &Report, b: &Report, a_path: &str, b_path: &str) -> (String, String) {
    let name = |r: &Report, path: &str| {
        let mut models: Vec<&str> = Vec::new();
        for row in &r.rows {
            if !row.model.is_empty() && !models.contains(&row.model.as_str()) {
                models.push(&row.model);
            }
        }
        if models.is_empty() {
            path.to_string()
        } else {
            models.join(", ")
        }
    };
    let (na, nb) = (name(a, a_path), name(b, b_path));
    if na == nb {
        (format!("{na}, a"), format!("{nb}, b"))
    } else {
        (na, nb)
    }
}

/// The two reports side by side, rows matched on (dataset, metric, subset), with `b - a`.
pub fn compare(a: &Report, b: &Report, a_name: &str, b_name: &str) -> String {
    let key = |r: &ReportRow| (r.dataset.clone(), r.metric.clone(), r.subset.clone());
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in a.rows.iter().chain(&b.rows) {
        if !keys.contains(&key(r)) {
            keys.push(key(r));
        }
    }
    let find = |rep: &Report, k: &(String, String, String)| rep.rows.iter().find(|r| &key(r) == k).cloned();
    let fmt = |r: &Option<ReportRow>| r.as_ref().map_or("-".to_string(), |r| format!("{:.4}", r.score));
    let num = |r: &Option<ReportRow>| r.as_ref().map_or("-".to_string(), |r| r.num.to_string());
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let (ra, rb) = (find(a, k), find(b, k));
            let delta = match (&ra, &rb) {
                (Some(x), Some(y)) => format!("{:+.4}", y.score - x.score),
                _ => "-".to_string(),
            };
            vec![k.0.clone(), k.1.clone(), k.2.clone(), num(&ra), fmt(&ra), num(&rb), fmt(&rb), delta]
        })
        .collect();
    let ha = format!("Score ({a_name})");
    let hb = format!("Score ({b_name})");
    render_grid(
        &["Dataset", "Metric", "Subset", "Num (a)", &ha, "Num (b)", &hb, "Delta"],
        &rows,
        &[false, false, false, true, true, true, true, true],
    )
}
