//! Evaluation metrics (see issue 6).
