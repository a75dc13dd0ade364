//! The training record: one JSON line per logging window and per evaluation
//! (`metrics.jsonl`), and a loss-curve PNG drawn with plotters (`loss_curve.png`).
//!
//! Text on the chart (title, axis labels, legend) needs a TrueType font. plotters' `ttf` feature
//! would find one through fontconfig, a system library CI may lack; this crate uses the pure-Rust
//! `ab_glyph` backend and registers the first font found among [`FONT_CANDIDATES`] (or the file
//! named by `PIPELINE_PLOT_FONT`). With none, the curve is drawn without text.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use image::codecs::png::PngEncoder;
use image::{ColorType, ImageEncoder};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomic;
use crate::TrainError;

/// Averages over one logging window of `logging_steps` optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub step: u64,
    pub epoch: f64,
    /// Mean training loss over the window's steps.
    pub loss: f64,
    /// The rate the window's last update used.
    pub learning_rate: f64,
    /// Global gradient norm of the window's last step, before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens per second of wall time over the window.
    pub tokens_per_second: f64,
    /// Objective-specific figures (DPO rewards...), window means.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// One evaluation on the held-out split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub epoch: f64,
    pub eval_loss: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// A line of `metrics.jsonl`: `{"type": "train", ...}` or `{"type": "eval", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Train(TrainRecord),
    Eval(EvalRecord),
}

/// Write the records as JSON lines (atomically).
pub fn write_jsonl(path: &Path, records: &[Record]) -> Result<(), TrainError> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r).map_err(|e| TrainError::Report(e.to_string()))?;
        out.push(b'\n');
    }
    write_atomic(path, &out)
}

/// Font files tried, in order, for the chart's text.
pub const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Register a font for plotters once; true when text can be drawn.
fn font_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let env = std::env::var("PIPELINE_PLOT_FONT").ok();
        let candidates = env.iter().map(String::as_str).chain(FONT_CANDIDATES.iter().copied());
        for path in candidates {
            if let Ok(bytes) = std::fs::read(path) {
                let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, leaked).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Events of the run marked on the loss curve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CurveMarks {
    /// The step of the best evaluation (the checkpoint `load_best_model_at_end` loads): a green
    /// ring on the eval curve and a dashed green vertical line.
    pub best_step: Option<u64>,
    /// The step early stopping ended the run at: a dashed black vertical line.
    pub early_stop: Option<u64>,
}

/// Draw training loss (and eval loss, when any) against the step as a PNG, with `marks`. Returns
/// whether the chart has text (a font was found). Written to a temp file and renamed.
pub fn plot_loss_curve(path: &Path, records: &[Record], title: &str, marks: CurveMarks) -> Result<bool, TrainError> {
    let text = font_available();
    draw(path, records, title, text, marks)?;
    Ok(text)
}

/// The chart's size in pixels.
const SIZE: (u32, u32) = (900, 540);

fn draw(path: &Path, records: &[Record], title: &str, text: bool, marks: CurveMarks) -> Result<(), TrainError> {
    let err = |e: &dyn std::fmt::Display| TrainError::Report(format!("{}: {e}", path.display()));
    // Drawn into memory, then PNG-encoded into an atomic write: plotters' file backend would
    // pick the format from the (temp) file name and write it in place.
    let mut rgb = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    draw_on(BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area(), records, title, text, marks)
        .map_err(|e| err(&e))?;
    pipeline_cache::fs::write_atomic_with(path, |w| {
        // The encoder plotters' file backend uses (`image`'s default PNG settings), so the bytes
        // are those `BitMapBackend::new(path)` writes.
        PngEncoder::new(w).write_image(&rgb, SIZE.0, SIZE.1, ColorType::Rgb8).map_err(std::io::Error::other)
    })
    .map_err(|source| TrainError::Io { path: path.to_path_buf(), source })
}

fn draw_on<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    records: &[Record],
    title: &str,
    text: bool,
    marks: CurveMarks,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| match r {
            Record::Train(t) if t.loss.is_finite() => Some((t.step as f64, t.loss)),
            _ => None,
        })
        .collect();
    let eval: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| match r {
            Record::Eval(e) if e.eval_loss.is_finite() => Some((e.step as f64, e.eval_loss)),
            _ => None,
        })
        .collect();
    let all = train.iter().chain(&eval);
    let max_step = all.clone().map(|p| p.0).fold(1.0_f64, f64::max);
    let (mut lo, mut hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let (lo, hi) = ((lo - pad).max(0.0_f64.min(lo)), hi + pad);

    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder.caption(title, ("sans-serif", 22)).x_label_area_size(40).y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(0.0..max_step, lo..hi)?;
    if text {
        chart.configure_mesh().x_desc("step").y_desc("loss").draw()?;
    } else {
        chart.configure_mesh().x_labels(0).y_labels(0).draw()?;
    }
    let s = chart.draw_series(LineSeries::new(train, BLUE.stroke_width(2)))?;
    if text {
        s.label("train loss").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    if !eval.is_empty() {
        let s = chart.draw_series(LineSeries::new(eval.clone(), RED.stroke_width(2)))?;
        if text {
            s.label("eval loss").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
        chart.draw_series(eval.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
    }
    let green = RGBColor(0, 150, 0);
    let vline = |step: u64| DashedLineSeries::new(vec![(step as f64, lo), (step as f64, hi)], 6, 4, BLACK.into());
    if let Some(best) = marks.best_step {
        let s = chart.draw_series(DashedLineSeries::new(
            vec![(best as f64, lo), (best as f64, hi)],
            6,
            4,
            green.stroke_width(2),
        ))?;
        if text {
            s.label(format!("best checkpoint (step {best})"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], green));
        }
        if let Some(&p) = eval.iter().find(|p| p.0 == best as f64) {
            chart.draw_series(std::iter::once(Circle::new(p, 7, green.stroke_width(2))))?;
        }
    }
    if let Some(stop) = marks.early_stop {
        let s = chart.draw_series(vline(stop))?;
        if text {
            s.label(format!("early stop (step {stop})"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        }
    }
    if text {
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<Record> {
        let mut v = Vec::new();
        for s in 1..=10u64 {
            v.push(Record::Train(TrainRecord {
                step: s,
                epoch: s as f64 / 10.0,
                loss: 3.0 / s as f64,
                learning_rate: 1e-3,
                grad_norm: 1.0,
                tokens_per_second: 100.0,
                metrics: BTreeMap::new(),
            }));
            if s % 5 == 0 {
                v.push(Record::Eval(EvalRecord {
                    step: s,
                    epoch: 0.5,
                    eval_loss: 2.0 / s as f64,
                    metrics: BTreeMap::new(),
                }));
            }
        }
        v
    }

    #[test]
    fn jsonl_is_tagged_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let r = records();
        write_jsonl(&p, &r).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["type"], "train");
        let back: Vec<Record> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(back, r);
    }

    #[test]
    fn png_is_written_with_and_without_text() {
        let dir = tempfile::tempdir().unwrap();
        for text in [false, true] {
            if text && !font_available() {
                continue;
            }
            let p = dir.path().join(format!("curve-{text}.png"));
            draw(&p, &records(), "loss", text, CurveMarks::default()).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(&bytes[1..4], b"PNG");
            assert!(bytes.len() > 2000, "{} bytes", bytes.len());
        }
    }

    /// Regression (issue 15, point 9): the curve did not show the best checkpoint or the early
    /// stop. The marks are drawn in their colours at their steps' x positions.
    #[test]
    fn best_checkpoint_and_early_stop_are_marked() {
        let mut plain = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
        let mut marked = plain.clone();
        let area = BitMapBackend::with_buffer(&mut plain, SIZE).into_drawing_area();
        draw_on(area, &records(), "loss", false, CurveMarks::default()).unwrap();
        let marks = CurveMarks { best_step: Some(5), early_stop: Some(8) };
        let area = BitMapBackend::with_buffer(&mut marked, SIZE).into_drawing_area();
        draw_on(area, &records(), "loss", false, marks).unwrap();
        let px = |buf: &[u8], x: usize, y: usize| {
            let i = (y * SIZE.0 as usize + x) * 3;
            (buf[i], buf[i + 1], buf[i + 2])
        };
        // Columns holding green (best) and black (early stop) pixels that the plain chart lacks.
        let columns = |want: (u8, u8, u8)| -> Vec<usize> {
            (0..SIZE.0 as usize)
                .filter(|&x| (0..SIZE.1 as usize).any(|y| px(&marked, x, y) == want && px(&plain, x, y) != want))
                .collect()
        };
        let green = columns((0, 150, 0));
        let black = columns((0, 0, 0));
        assert!(!green.is_empty() && !black.is_empty(), "green {green:?} black {black:?}");
        // Step 5 of 10 sits left of step 8: the best mark is left of the early-stop line.
        let mid = |c: &[usize]| c[c.len() / 2];
        assert!(mid(&green) < mid(&black), "green {green:?} black {black:?}");
    }

    /// The in-memory drawing + atomic write produces exactly the file plotters' own file backend
    /// writes, so `loss_curve.png` (a stage output) is byte-for-byte what it was.
    #[test]
    fn png_bytes_equal_plotters_file_backend() {
        let dir = tempfile::tempdir().unwrap();
        for text in [false, true] {
            if text && !font_available() {
                continue;
            }
            let ours = dir.path().join(format!("ours-{text}.png"));
            let marks = CurveMarks { best_step: Some(5), early_stop: Some(10) };
            draw(&ours, &records(), "loss", text, marks).unwrap();
            let theirs = dir.path().join(format!("theirs-{text}.png"));
            draw_on(BitMapBackend::new(&theirs, SIZE).into_drawing_area(), &records(), "loss", text, marks).unwrap();
            assert_eq!(std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap(), "text: {text}");
        }
    }
}
