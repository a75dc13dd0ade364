//! Integration tests of pipeline-train (one test binary; modules under `tests/train/`).

#[path = "train/cls.rs"]
mod cls;
#[path = "train/dist.rs"]
mod dist;
#[path = "train/golden.rs"]
mod golden;
#[path = "train/qwen.rs"]
mod qwen;
#[path = "train/tiny.rs"]
mod tiny;
#[path = "train/training_loop.rs"]
mod training_loop;
