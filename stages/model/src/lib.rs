//! Model core shared by training, evaluation and export stages.

pub mod host;
