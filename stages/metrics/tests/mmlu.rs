//! Real data: the full MMLU test set (14,042 questions, 57 subjects) loads as general_mcq.
//! Heavy: needs `python3 scripts/fetch_mmlu.py DIR` first, then
//! `PIPELINE_MMLU_DIR=DIR cargo test -p pipeline-metrics --test mmlu -- --ignored`.

use std::path::PathBuf;

use pipeline_metrics::mcq::{list_mcq_subsets, load_mcq_subset, mcq_prompt};

#[test]
#[ignore = "heavy: needs MMLU fetched by scripts/fetch_mmlu.py, run with PIPELINE_MMLU_DIR=... -- --ignored"]
fn full_mmlu_loads_as_general_mcq() {
    let dir = PathBuf::from(std::env::var("PIPELINE_MMLU_DIR").expect("PIPELINE_MMLU_DIR"));
    let subsets = list_mcq_subsets(&dir).unwrap();
    assert_eq!(subsets.len(), 57);
    let mut n = 0;
    for s in &subsets {
        let sub = load_mcq_subset(&dir, s).unwrap();
        for item in &sub.val {
            assert_eq!(item.choices.len(), 4, "{s}:{}", item.line);
            assert!(mcq_prompt(item, &[]).contains("A,B,C,D"));
        }
        n += sub.val.len();
    }
    assert_eq!(n, 14_042);
}
