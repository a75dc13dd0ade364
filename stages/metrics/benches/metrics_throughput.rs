//! Metric throughput (pairs/s) on the golden pairs: `cargo bench -p pipeline-metrics`.
//! `scripts/bench_metrics.sh` runs this and evalscope's own functions on the same pairs.

use std::time::Instant;

use pipeline_metrics::score_pair;

fn main() {
    let text = include_str!("../tests/fixtures/metrics_golden.jsonl");
    let pairs: Vec<(String, String)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("golden row");
            (v["prediction"].as_str().unwrap_or("").to_string(), v["reference"].as_str().unwrap_or("").to_string())
        })
        .collect();
    // Warm-up: builds the jieba dictionary and the regexes once.
    let mut sink = 0.0;
    for (p, r) in &pairs {
        sink += score_pair(p, r).bleu[0];
    }
    let repeat = std::env::var("METRICS_BENCH_REPEAT").ok().and_then(|s| s.parse().ok()).unwrap_or(20usize);
    let t0 = Instant::now();
    for _ in 0..repeat {
        for (p, r) in &pairs {
            sink += score_pair(p, r).bleu[0];
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    let n = pairs.len() * repeat;
    println!(
        "{{\"impl\": \"pipeline-metrics score_pair (bleu-1..4 + rouge-1/2/l)\", \"pairs\": {n}, \"seconds\": {dt:.4}, \"pairs_per_s\": {:.1}, \"checksum\": {sink:.6}}}",
        n as f64 / dt
    );
}
