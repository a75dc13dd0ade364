use std::path::PathBuf;

/// A dataset or report file that cannot be used, with the file and (1-based) line at fault.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct DataError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl DataError {
    pub fn new(path: impl Into<PathBuf>, line: Option<usize>, message: impl std::fmt::Display) -> Self {
        DataError { path: path.into(), line, message: message.to_string() }
    }
}
