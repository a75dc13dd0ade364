//! collect → dedupe → clean throughput on a generated JSONL corpus (default 1 GiB).
//!
//! `cargo bench -p pipeline-stages --bench data` or `scripts/bench-data.sh` (adds peak RSS via
//! `/usr/bin/time -v`). Env: `BENCH_MB` (corpus size, default 1024), `BENCH_DIR` (where to put the
//! corpus and artifacts; default a temp dir), `BENCH_SHUFFLE=1` (collect shuffles, spilling to
//! scratch files, instead of streaming). Prints rows/s and MB/s per stage and end to end,
//! and the process's peak RSS (VmHWM).

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use pipeline_engine::{NullSink, RunCtx, RunParts};
use rand::{Rng, SeedableRng};

fn generate(path: &Path, bytes: u64) -> (u64, u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let vocab: Vec<String> = (0..20_000)
        .map(|i| {
            let len = 2 + (i % 9);
            (0..len).map(|k| (b'a' + ((i * 31 + k * 7) % 26) as u8) as char).collect::<String>()
                + &format!("{}", i % 97)
        })
        .collect();
    let mut w = BufWriter::with_capacity(1 << 22, std::fs::File::create(path).unwrap());
    let (mut written, mut rows) = (0u64, 0u64);
    let mut recent: Vec<String> = Vec::new();
    while written < bytes {
        let doc = if !recent.is_empty() && rng.gen_bool(0.02) {
            recent[rng.gen_range(0..recent.len())].clone()
        } else if !recent.is_empty() && rng.gen_bool(0.02) {
            let mut d: Vec<String> = recent[rng.gen_range(0..recent.len())].split(' ').map(String::from).collect();
            let i = rng.gen_range(0..d.len());
            d[i] = vocab[rng.gen_range(0..vocab.len())].clone();
            d.join(" ")
        } else {
            let mut d = String::new();
            for s in 0..rng.gen_range(20..60) {
                if s > 0 {
                    d.push_str(if s % 6 == 0 { "\n" } else { " " });
                }
                for k in 0..rng.gen_range(6..16) {
                    if k > 0 {
                        d.push(' ');
                    }
                    d.push_str(&vocab[rng.gen_range(0..vocab.len())]);
                }
                d.push('.');
            }
            d
        };
        let line = serde_json::to_string(&serde_json::json!({ "text": doc })).unwrap();
        w.write_all(line.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        written += line.len() as u64 + 1;
        rows += 1;
        if recent.len() < 256 {
            recent.push(doc);
        } else {
            let i = rng.gen_range(0..recent.len());
            recent[i] = doc;
        }
    }
    w.flush().unwrap();
    (written, rows)
}

fn run(kind: &str, params: &str, dir: &Path, input: Option<&Path>) -> (PathBuf, serde_json::Value, f64, f64) {
    let reg = pipeline_stages::registry();
    let stage = reg.get(kind).unwrap();
    let out = dir.join(kind);
    let outputs: BTreeMap<String, PathBuf> =
        ["data", "quarantine", "removed", "rejected"].iter().map(|o| (o.to_string(), out.join(o))).collect();
    for d in outputs.values() {
        std::fs::create_dir_all(d).unwrap();
    }
    let ctx = RunCtx::new(RunParts {
        stage_id: kind.into(),
        params: toml::from_str(params).unwrap(),
        seed: 1,
        recipe_dir: dir.to_path_buf(),
        inputs: input.map(|p| ("data".to_string(), vec![p.to_path_buf()])).into_iter().collect(),
        outputs,
        scratch: out.join("scratch"),
        sink: Arc::new(NullSink),
        cancel: Arc::new(AtomicBool::new(false)),
    });
    let (t, cpu) = (Instant::now(), cpu_secs());
    stage.run(&ctx).unwrap_or_else(|e| panic!("{kind}: {e}"));
    (out.join("data"), ctx.take_report().unwrap(), t.elapsed().as_secs_f64(), cpu_secs() - cpu)
}

/// CPU seconds (user + system, all threads) this process has used so far, from /proc/self/stat.
fn cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<f64>().unwrap_or(0.0))
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    // As the `pipeline` binary does at start-up.
    pipeline_stages::data::tune_allocator();
    let mb: u64 = std::env::var("BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let tmp;
    let dir = match std::env::var("BENCH_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => {
            tmp = tempfile::tempdir().unwrap();
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = dir.join("corpus.jsonl");
    let t = Instant::now();
    let (bytes, rows) = generate(&corpus, mb << 20);
    let size_mb = bytes as f64 / (1 << 20) as f64;
    println!("generated {size_mb:.0} MiB, {rows} rows in {:.1}s", t.elapsed().as_secs_f64());
    let rss_gen = peak_rss_mb();
    // BENCH_SHUFFLE=1: collect shuffles (the default; spills past 256 MiB) instead of streaming.
    let shuffle = std::env::var("BENCH_SHUFFLE").is_ok_and(|v| v == "1");
    let collect_params = format!("datasets = [\"corpus.jsonl\"]\nshuffle = {shuffle}");
    let (c, cr, tc, uc) = run("collect", &collect_params, &dir, None);
    let (d, dr, td, ud) = run("dedupe", "", &dir, Some(&c));
    let (_, kr, tk, uk) = run("clean", "", &dir, Some(&d));
    for (name, secs, cpu, rep) in [("collect", tc, uc, &cr), ("dedupe", td, ud, &dr), ("clean", tk, uk, &kr)] {
        println!(
            "{name:8} {secs:7.1}s wall {cpu:7.1}s CPU  {:7.1} MiB/s wall  {:7.1} MiB/s per CPU-s (of the input corpus)  {:9.0} rows/s  report {}",
            size_mb / secs,
            size_mb / cpu.max(1e-9),
            rows as f64 / secs,
            rep
        );
    }
    let total = tc + td + tk;
    let cpu = uc + ud + uk;
    println!(
        "end to end: {total:.1}s wall  {cpu:.1}s CPU  {:.1} MiB/s per CPU-s  {:.1} MiB/s wall  {:.0} rows/s  peak RSS {:.0} MiB (generation alone: {rss_gen:.0} MiB)  threads: main thread + polars pool",
        size_mb / cpu.max(1e-9),
        size_mb / total,
        rows as f64 / total,
        peak_rss_mb()
    );
}
