//! The canonical dataset artifact shared by every data stage and read by training.
//!
//! A dataset artifact is a directory holding `data.parquet`: one row per sample, written in row
//! groups of at most [`ROW_GROUP`] rows (so readers and writers stream in bounded memory).
//!
//! | column | Parquet type | meaning |
//! |---|---|---|
//! | `id` | string | stable row id: `<source>:<line>` (`:r<k>` for the k-th repeat of an over-sampled row, `:aug<k>` for augmented copies) |
//! | `source` | string | the dataset spec the row came from (`builtin:self-cognition`, `data/alpaca.jsonl`) |
//! | `messages` | list<struct<role: string, content: string>> | the conversation; roles `system` / `user` / `assistant` (the canonical form of every chat format; a system prompt is the first message) |
//! | `text` | string, nullable | a pretraining document (rows collected from text-file directories have `text` and no messages) |
//! | `rejected_response` | string, nullable | DPO: the rejected final assistant turn; embedding pairs: the negative |
//! | `label`, `label_type` | string, nullable | the label's text and its type (`bool` for KTO, `int` for classification, `float` for embedding similarity, `str` for rule labels) |
//! | `label2`, `label2_type` | string, nullable | a second labelling of the same rows (a second annotator, or the `label` stage's rule output when `label` already existed) |
//! | `images`, `audios`, `videos` | list<string> | media paths (absolute, checked to exist by `collect`) |
//! | `augmented` | bool | true for rows created by `augment` |
//!
//! Read it with [`read_dataset`] (everything) or [`DatasetReader`] (batches); write it with
//! [`DatasetWriter`]. Outputs are byte-deterministic: no timestamps, fixed row-group size, no
//! compression, fixed column order.

pub mod formats;
pub mod spill;
pub mod text;

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use pipeline_cache::fs::AtomicFile;
use pipeline_engine::StageError;
use polars::prelude::*;
use polars_arrow::array::{Array, ListArray, MutableBinaryViewArray, StructArray, Utf8ViewArray};
use polars_arrow::datatypes::{ArrowDataType, Field as ArrowField};
use polars_arrow::offset::OffsetsBuffer;

/// The file inside a dataset artifact directory.
pub const DATA_FILE: &str = "data.parquet";
/// Rows per Parquet row group, and per batch of [`DatasetReader`].
pub const ROW_GROUP: usize = 16_384;

/// One chat turn: the workspace's one type ([`pipeline_chat::Message`]), passed to chat
/// templates and evaluation as it is.
pub use pipeline_chat::Message;

/// A row label; its type follows the task (SPECS.md §1).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Label {
    /// KTO: desirable / undesirable.
    Bool(bool),
    /// Sequence classification.
    Int(i64),
    /// Embedding pair: cosine-similarity target.
    Float(f64),
    /// A named class (rule-based labelling).
    Text(String),
}

impl Label {
    pub fn type_name(&self) -> &'static str {
        match self {
            Label::Bool(_) => "bool",
            Label::Int(_) => "int",
            Label::Float(_) => "float",
            Label::Text(_) => "str",
        }
    }
    /// The label's text as stored in the `label` column.
    pub fn text(&self) -> String {
        match self {
            Label::Bool(b) => b.to_string(),
            Label::Int(i) => i.to_string(),
            Label::Float(f) => format!("{f:?}"),
            Label::Text(s) => s.clone(),
        }
    }
    /// Parse a stored label back from its text and type.
    pub fn parse(text: &str, ty: &str) -> Option<Label> {
        match ty {
            "bool" => text.parse().ok().map(Label::Bool),
            "int" => text.parse().ok().map(Label::Int),
            "float" => text.parse().ok().map(Label::Float),
            "str" => Some(Label::Text(text.to_string())),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Label::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// One canonical row.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    pub id: String,
    pub source: String,
    pub messages: Vec<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_response: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<Label>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label2: Option<Label>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audios: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub videos: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub augmented: bool,
}

impl Sample {
    /// The system prompt, when the first message is one.
    pub fn system(&self) -> Option<&str> {
        self.messages.first().filter(|m| m.role == "system").map(|m| m.content.as_str())
    }
    /// Every text field of the row, in a fixed order (what dedupe and clean look at).
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.messages
            .iter()
            .map(|m| m.content.as_str())
            .chain(self.text.as_deref())
            .chain(self.rejected_response.as_deref())
    }
    /// Mutable access to every text field, same order as [`Sample::texts`].
    pub fn texts_mut(&mut self) -> impl Iterator<Item = &mut String> {
        self.messages
            .iter_mut()
            .map(|m| &mut m.content)
            .chain(self.text.as_mut())
            .chain(self.rejected_response.as_mut())
    }
    /// All text of the row joined with newlines.
    pub fn joined_text(&self) -> String {
        let mut out = String::new();
        for (i, t) in self.texts().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(t);
        }
        out
    }
}

fn polars_err(path: &Path, e: PolarsError) -> StageError {
    StageError::failed(format!("{}: {e}", path.display()))
}

fn utf8(values: impl Iterator<Item = String>) -> Box<dyn Array> {
    let mut m = MutableBinaryViewArray::<str>::new();
    for v in values {
        m.push_value(v);
    }
    let a: Utf8ViewArray = m.into();
    a.boxed()
}

fn utf8_opt(values: impl Iterator<Item = Option<String>>) -> Series {
    let ca: StringChunked = values.collect();
    ca.into_series()
}

fn msg_struct_dtype() -> ArrowDataType {
    ArrowDataType::Struct(vec![
        ArrowField::new("role".into(), ArrowDataType::Utf8View, false),
        ArrowField::new("content".into(), ArrowDataType::Utf8View, false),
    ])
}

fn string_list(name: &str, rows: &[&Vec<String>]) -> PolarsResult<Series> {
    let mut offsets = Vec::with_capacity(rows.len() + 1);
    offsets.push(0i64);
    for r in rows {
        offsets.push(offsets.last().copied().unwrap_or(0) + r.len() as i64);
    }
    let values = utf8(rows.iter().flat_map(|r| r.iter().cloned()));
    let dtype = ArrowDataType::LargeList(Box::new(ArrowField::new("item".into(), ArrowDataType::Utf8View, true)));
    let arr = ListArray::<i64>::try_new(dtype, OffsetsBuffer::try_from(offsets)?, values, None)?;
    Series::from_arrow(name.into(), arr.boxed())
}

/// Build the canonical DataFrame of `samples` (column order as in the module table).
pub fn samples_to_frame(samples: &[Sample]) -> PolarsResult<DataFrame> {
    let n = samples.len();
    let id = Series::new("id".into(), samples.iter().map(|s| s.id.as_str()).collect::<Vec<_>>());
    let source = Series::new("source".into(), samples.iter().map(|s| s.source.as_str()).collect::<Vec<_>>());
    let mut offsets = Vec::with_capacity(n + 1);
    offsets.push(0i64);
    let mut total = 0i64;
    for s in samples {
        total += s.messages.len() as i64;
        offsets.push(total);
    }
    let roles = utf8(samples.iter().flat_map(|s| s.messages.iter().map(|m| m.role.clone())));
    let contents = utf8(samples.iter().flat_map(|s| s.messages.iter().map(|m| m.content.clone())));
    let st = StructArray::try_new(msg_struct_dtype(), total as usize, vec![roles, contents], None)?;
    let list_dtype = ArrowDataType::LargeList(Box::new(ArrowField::new("item".into(), msg_struct_dtype(), true)));
    let list = ListArray::<i64>::try_new(list_dtype, OffsetsBuffer::try_from(offsets)?, st.boxed(), None)?;
    let messages = Series::from_arrow("messages".into(), list.boxed())?;
    let text = utf8_opt(samples.iter().map(|s| s.text.clone())).with_name("text".into());
    let rejected = utf8_opt(samples.iter().map(|s| s.rejected_response.clone())).with_name("rejected_response".into());
    let label = utf8_opt(samples.iter().map(|s| s.label.as_ref().map(Label::text))).with_name("label".into());
    let label_ty = utf8_opt(samples.iter().map(|s| s.label.as_ref().map(|l| l.type_name().to_string())))
        .with_name("label_type".into());
    let label2 = utf8_opt(samples.iter().map(|s| s.label2.as_ref().map(Label::text))).with_name("label2".into());
    let label2_ty = utf8_opt(samples.iter().map(|s| s.label2.as_ref().map(|l| l.type_name().to_string())))
        .with_name("label2_type".into());
    let images = string_list("images", &samples.iter().map(|s| &s.images).collect::<Vec<_>>())?;
    let audios = string_list("audios", &samples.iter().map(|s| &s.audios).collect::<Vec<_>>())?;
    let videos = string_list("videos", &samples.iter().map(|s| &s.videos).collect::<Vec<_>>())?;
    let augmented = Series::new("augmented".into(), samples.iter().map(|s| s.augmented).collect::<Vec<_>>());
    DataFrame::new(
        n,
        vec![
            id.into(),
            source.into(),
            messages.into(),
            text.into(),
            rejected.into(),
            label.into(),
            label_ty.into(),
            label2.into(),
            label2_ty.into(),
            images.into(),
            audios.into(),
            videos.into(),
            augmented.into(),
        ],
    )
}

fn col_str<'a>(df: &'a DataFrame, name: &str) -> PolarsResult<&'a StringChunked> {
    df.column(name)?.as_materialized_series().str()
}

fn read_string_lists(df: &DataFrame, name: &str) -> PolarsResult<Vec<Vec<String>>> {
    let Ok(c) = df.column(name) else { return Ok(vec![Vec::new(); df.height()]) };
    let ca = c.as_materialized_series().rechunk();
    let ca = ca.list()?;
    let mut out = Vec::with_capacity(df.height());
    for arr in ca.downcast_iter() {
        let values =
            arr.values().as_any().downcast_ref::<Utf8ViewArray>().ok_or_else(|| {
                PolarsError::ComputeError(format!("column `{name}`: expected a list of strings").into())
            })?;
        let offs = arr.offsets();
        for i in 0..arr.len() {
            let (a, b) = offs.start_end(i);
            out.push((a..b).map(|j| values.value(j).to_string()).collect());
        }
    }
    Ok(out)
}

/// Turn a canonical DataFrame back into samples (columns other than `id`, `source` and
/// `messages` may be absent).
pub fn frame_to_samples(df: &DataFrame) -> PolarsResult<Vec<Sample>> {
    let n = df.height();
    let ids = col_str(df, "id")?;
    let sources = col_str(df, "source")?;
    let msgs = df.column("messages")?.as_materialized_series().rechunk();
    let msgs = msgs.list()?;
    let mut messages: Vec<Vec<Message>> = Vec::with_capacity(n);
    for arr in msgs.downcast_iter() {
        let st = arr
            .values()
            .as_any()
            .downcast_ref::<StructArray>()
            .ok_or_else(|| PolarsError::ComputeError("column `messages`: expected list<struct>".into()))?;
        let field = |name: &str| -> PolarsResult<&Utf8ViewArray> {
            let idx = st
                .fields()
                .iter()
                .position(|f| f.name.as_str() == name)
                .ok_or_else(|| PolarsError::ComputeError(format!("column `messages`: no field `{name}`").into()))?;
            st.values()[idx].as_any().downcast_ref::<Utf8ViewArray>().ok_or_else(|| {
                PolarsError::ComputeError(format!("column `messages`: field `{name}` is not a string").into())
            })
        };
        let (roles, contents) = (field("role")?, field("content")?);
        let offs = arr.offsets();
        for i in 0..arr.len() {
            let (a, b) = offs.start_end(i);
            messages.push((a..b).map(|j| Message::new(roles.value(j), contents.value(j))).collect());
        }
    }
    let opt = |name: &str| -> PolarsResult<Vec<Option<String>>> {
        match df.column(name) {
            Ok(c) => {
                let ca = c.as_materialized_series().str()?;
                Ok((0..n).map(|i| ca.get(i).map(str::to_string)).collect())
            }
            Err(_) => Ok(vec![None; n]),
        }
    };
    let text = opt("text")?;
    let rejected = opt("rejected_response")?;
    let (label, label_ty, label2, label2_ty) = (opt("label")?, opt("label_type")?, opt("label2")?, opt("label2_type")?);
    let (images, audios, videos) =
        (read_string_lists(df, "images")?, read_string_lists(df, "audios")?, read_string_lists(df, "videos")?);
    let augmented: Vec<bool> = match df.column("augmented") {
        Ok(c) => {
            let ca = c.as_materialized_series().bool()?;
            (0..n).map(|i| ca.get(i).unwrap_or(false)).collect()
        }
        Err(_) => vec![false; n],
    };
    let mk_label = |t: &Option<String>, ty: &Option<String>| match (t, ty) {
        (Some(t), Some(ty)) => Label::parse(t, ty),
        (Some(t), None) => Some(Label::Text(t.clone())),
        _ => None,
    };
    let mut out = Vec::with_capacity(n);
    let mut it = messages.into_iter();
    for i in 0..n {
        out.push(Sample {
            id: ids.get(i).unwrap_or_default().to_string(),
            source: sources.get(i).unwrap_or_default().to_string(),
            messages: it.next().unwrap_or_default(),
            text: text[i].clone(),
            rejected_response: rejected[i].clone(),
            label: mk_label(&label[i], &label_ty[i]),
            label2: mk_label(&label2[i], &label2_ty[i]),
            images: images[i].clone(),
            audios: audios[i].clone(),
            videos: videos[i].clone(),
            augmented: augmented[i],
        });
    }
    Ok(out)
}

/// Streams samples into `<dir>/data.parquet` in row groups; the file appears (rename) only on
/// [`DatasetWriter::finish`].
pub struct DatasetWriter {
    dest: PathBuf,
    /// Writes through a second handle on `file`'s temp file (polars keeps its sink); declared
    /// first so it is dropped before `file` removes an uncommitted temp file.
    writer: polars::io::parquet::write::BatchedWriter<BufWriter<File>>,
    file: AtomicFile,
    pending: Vec<Sample>,
    rows: usize,
}

impl DatasetWriter {
    pub fn create(dir: &Path) -> Result<Self, StageError> {
        let dest = dir.join(DATA_FILE);
        let file = AtomicFile::create(&dest).map_err(|e| StageError::io(&dest, e))?;
        let sink = file.try_clone_file().map_err(|e| StageError::io(file.temp_path(), e))?;
        let schema = samples_to_frame(&[]).map_err(|e| polars_err(&dest, e))?.schema().as_ref().clone();
        let writer = ParquetWriter::new(BufWriter::with_capacity(1 << 20, sink))
            .with_compression(ParquetCompression::Uncompressed)
            .with_row_group_size(Some(ROW_GROUP))
            .batched(&schema)
            .map_err(|e| polars_err(&dest, e))?;
        Ok(DatasetWriter { dest, writer, file, pending: Vec::new(), rows: 0 })
    }

    pub fn push(&mut self, s: Sample) -> Result<(), StageError> {
        self.pending.push(s);
        if self.pending.len() >= ROW_GROUP {
            self.flush()?;
        }
        Ok(())
    }

    pub fn extend(&mut self, rows: impl IntoIterator<Item = Sample>) -> Result<(), StageError> {
        for s in rows {
            self.push(s)?;
        }
        Ok(())
    }

    /// Append a frame read from another dataset artifact (same schema), as it is: for stages
    /// that only select rows (dedupe), this skips converting every row to a [`Sample`] and back.
    /// Rows pushed earlier are written first, so row order is kept.
    pub fn push_frame(&mut self, df: &DataFrame) -> Result<(), StageError> {
        self.flush()?;
        if df.height() == 0 {
            return Ok(());
        }
        let mut df = df.clone();
        self.writer.write_batch(df.align_chunks_par()).map_err(|e| polars_err(&self.dest, e))?;
        self.rows += df.height();
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StageError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let df = samples_to_frame(&self.pending).map_err(|e| polars_err(&self.dest, e))?;
        self.writer.write_batch(&df).map_err(|e| polars_err(&self.dest, e))?;
        self.rows += self.pending.len();
        self.pending.clear();
        Ok(())
    }

    /// Flush, close and rename into place; returns the number of rows written.
    pub fn finish(mut self) -> Result<usize, StageError> {
        self.flush()?;
        // Writes the footer and flushes the `BufWriter` (errors included) into the temp file.
        self.writer.finish().map_err(|e| polars_err(&self.dest, e))?;
        let DatasetWriter { dest, writer, file, rows, .. } = self;
        drop(writer);
        file.commit().map_err(|e| StageError::io(&dest, e))?;
        Ok(rows)
    }
}

/// Write `samples` as the dataset artifact in `dir`.
pub fn write_dataset(dir: &Path, samples: &[Sample]) -> Result<usize, StageError> {
    let mut w = DatasetWriter::create(dir)?;
    for chunk in samples.chunks(ROW_GROUP) {
        w.extend(chunk.iter().cloned())?;
    }
    w.finish()
}

/// A Parquet file's bytes, mapped once. When the file belongs to a cache artifact armed for
/// checked reads ([`pipeline_cache::checked`]), the mapped bytes are hashed and compared with the
/// cache's digest as they are mapped, and polars then parses those same bytes (a cursor over the
/// map, no copy): a corrupt dataset is an error naming the file before any row is used, and no
/// second pass over the file checks it (issue 14, defect 1). Polars mapped the file itself before,
/// so memory use is unchanged.
#[derive(Clone)]
pub(crate) struct ParquetBytes(std::sync::Arc<memmap2::Mmap>);

impl AsRef<[u8]> for ParquetBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl ParquetBytes {
    /// Map `path` and check it (see the type's doc).
    pub(crate) fn open(path: &Path) -> Result<Self, StageError> {
        let file = File::open(path).map_err(|e| StageError::io(path, e))?;
        // SAFETY: the map is read-only and lives as long as the reader. Cache artifacts and our
        // writers replace files by rename, which leaves a mapped file's data in place; a file
        // rewritten in place underneath gives polars other bytes (an error or other rows), one
        // truncated underneath a fault, never a write. polars maps `File` readers the same way.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| StageError::io(path, e))?;
        pipeline_cache::checked::check_bytes(path, &map).map_err(|e| StageError::io(path, e))?;
        Ok(ParquetBytes(std::sync::Arc::new(map)))
    }
    /// A polars reader over the bytes (shares the map).
    pub(crate) fn reader(&self) -> ParquetReader<std::io::Cursor<ParquetBytes>> {
        ParquetReader::new(std::io::Cursor::new(self.clone()))
    }
}

/// Reads a dataset artifact in batches of at most [`ROW_GROUP`] rows.
pub struct DatasetReader {
    path: PathBuf,
    bytes: ParquetBytes,
    total: usize,
    offset: usize,
}

impl DatasetReader {
    /// `dir` is an artifact directory (or the `.parquet` file itself). A file of a cache artifact
    /// armed for checked reads is checked against the cache's digest here ([`ParquetBytes`]).
    pub fn open(dir: &Path) -> Result<Self, StageError> {
        let path = if dir.is_dir() { dir.join(DATA_FILE) } else { dir.to_path_buf() };
        let bytes = ParquetBytes::open(&path)?;
        let total = bytes.reader().num_rows().map_err(|e| polars_err(&path, e))?;
        Ok(DatasetReader { path, bytes, total, offset: 0 })
    }
    pub fn len(&self) -> usize {
        self.total
    }
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
    fn read_slice(&self, offset: usize, len: usize) -> Result<Vec<Sample>, StageError> {
        let df = self.read_frame(offset, len)?;
        frame_to_samples(&df).map_err(|e| polars_err(&self.path, e))
    }
    fn read_frame(&self, offset: usize, len: usize) -> Result<DataFrame, StageError> {
        self.bytes.reader().with_slice(Some((offset, len))).finish().map_err(|e| polars_err(&self.path, e))
    }
    /// The same batches as the iterator, as raw frames (for row selection without conversion).
    pub fn frames(mut self) -> impl Iterator<Item = Result<DataFrame, StageError>> {
        std::iter::from_fn(move || {
            if self.offset >= self.total {
                return None;
            }
            let len = ROW_GROUP.min(self.total - self.offset);
            let r = self.read_frame(self.offset, len);
            self.offset += len;
            Some(r)
        })
    }
}

impl Iterator for DatasetReader {
    type Item = Result<Vec<Sample>, StageError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.offset >= self.total {
            return None;
        }
        let len = ROW_GROUP.min(self.total - self.offset);
        let r = self.read_slice(self.offset, len);
        self.offset += len;
        Some(r)
    }
}

/// Every sample of the dataset artifact in `dir` (a directory holding `data.parquet`).
pub fn read_dataset(dir: &Path) -> Result<Vec<Sample>, StageError> {
    let mut out = Vec::new();
    for batch in DatasetReader::open(dir)? {
        out.extend(batch?);
    }
    Ok(out)
}

/// Write `value` as pretty JSON to `path` atomically ([`pipeline_cache::fs::write_atomic`]).
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), StageError> {
    let mut text = serde_json::to_string_pretty(value).map_err(StageError::failed)?;
    text.push('\n');
    pipeline_cache::fs::write_atomic(path, text.as_bytes()).map_err(|e| StageError::io(path, e))
}

/// Write `samples` as JSON Lines to `path` atomically (used for side records like quarantine).
pub fn write_jsonl<T: serde::Serialize>(path: &Path, rows: &[T]) -> Result<(), StageError> {
    use std::io::Write;
    pipeline_cache::fs::write_atomic_with(path, |w| {
        for r in rows {
            serde_json::to_writer(&mut *w, r)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
    .map_err(|e| StageError::io(path, e))
}

/// Milliseconds since `t`, rounded (reports).
pub(crate) fn ms_since(t: std::time::Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

/// Keep freed batch buffers in the process instead of handing them back to the kernel.
///
/// A batch of long documents holds tens of MiB of Arrow buffers; glibc's malloc serves blocks
/// that large with `mmap` and unmaps them on free, so every batch of every pass faults its pages
/// in again (a quarter of collect → dedupe → clean's CPU time was kernel time, measured with
/// `stages/benches/data.rs`). Raising the mmap and trim thresholds lets the heap reuse them.
/// Call once at start-up, before threads are spawned; a no-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::os::raw::c_int, value: std::os::raw::c_int) -> std::os::raw::c_int;
        }
        const M_TRIM_THRESHOLD: std::os::raw::c_int = -1;
        const M_TOP_PAD: std::os::raw::c_int = -2;
        const M_MMAP_THRESHOLD: std::os::raw::c_int = -3;
        // SAFETY: mallopt only sets allocator tunables; called before other threads exist.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum on 64-bit
            mallopt(M_TRIM_THRESHOLD, 512 << 20);
            mallopt(M_TOP_PAD, 64 << 20);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_parquet() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![
            Sample {
                id: "a:1".into(),
                source: "a".into(),
                messages: vec![
                    Message::new("system", "s"),
                    Message::new("user", "hi"),
                    Message::new("assistant", "yo"),
                ],
                rejected_response: Some("no".into()),
                label: Some(Label::Bool(true)),
                images: vec!["/x.png".into()],
                ..Default::default()
            },
            Sample { id: "b:1".into(), source: "b".into(), text: Some("doc".into()), ..Default::default() },
            Sample {
                id: "c:1".into(),
                source: "c".into(),
                messages: vec![Message::new("user", "q")],
                label: Some(Label::Float(0.5)),
                label2: Some(Label::Text("pos".into())),
                augmented: true,
                ..Default::default()
            },
        ];
        write_dataset(dir.path(), &rows).unwrap();
        assert_eq!(read_dataset(dir.path()).unwrap(), rows);
        assert_eq!(rows[0].system(), Some("s"));
        let bytes = std::fs::read(dir.path().join(DATA_FILE)).unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        write_dataset(dir2.path(), &rows).unwrap();
        assert_eq!(bytes, std::fs::read(dir2.path().join(DATA_FILE)).unwrap(), "byte-deterministic");
        let empty = tempfile::tempdir().unwrap();
        write_dataset(empty.path(), &[]).unwrap();
        assert!(read_dataset(empty.path()).unwrap().is_empty());
    }

    /// Regression (issue 14, defect 1): the Parquet reader handed the file to polars unchecked, so
    /// bytes flipped in a cached dataset (its mtime restored, invisible to the stat check) became
    /// rows. A file of an armed cache artifact is now checked against the cache's digest as it is
    /// mapped, before polars parses those same bytes: an error naming the file, and the artifact
    /// recorded corrupt for the engine to drop and re-create.
    #[test]
    fn corrupt_parquet_artifact_is_an_error_when_read() {
        use pipeline_cache::{ArtifactCheck, Corruption, Entry, Store};
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let rows: Vec<Sample> = (0..50)
            .map(|i| Sample {
                id: format!("a:{i}"),
                source: "a".into(),
                text: Some(format!("document {i} {}", "lorem ipsum ".repeat(40))),
                ..Default::default()
            })
            .collect();
        let st = store.staging("k", &["data".to_string()]).unwrap();
        write_dataset(&st.outputs()["data"], &rows).unwrap();
        let entry = store.commit(st, Entry::new("k", serde_json::json!({}), "r", "s", "collect")).unwrap();
        let digest = entry.outputs["data"].digest.clone();
        let dir = store.artifact_path(&digest);
        assert!(store.expect_reads(&digest).is_ok());
        assert_eq!(read_dataset(&dir).unwrap(), rows);
        assert!(store.finish_reads(&digest).is_ok());

        // Flip bytes in the middle (inside the documents' text), keep size and mtime.
        let file = dir.join(DATA_FILE);
        let mut bytes = std::fs::read(&file).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 16] {
            *b = if *b == b'X' { b'Y' } else { b'X' };
        }
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::fs::write(&file, &bytes).unwrap();
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
        assert!(store.check_artifact(&digest).is_ok(), "the stat check cannot see it");
        // Unchecked (a copy outside the cache), polars takes the flipped bytes as rows.
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(&file, copy.path().join(DATA_FILE)).unwrap();
        assert_ne!(read_dataset(copy.path()).unwrap(), rows, "the flip should change the rows");

        // A new run arms the artifact again: the read fails, naming the file.
        assert!(store.expect_reads(&digest).is_ok());
        let err = read_dataset(&dir).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()) && err.contains("corrupt cache artifact"), "{err}");
        let check = store.finish_reads(&digest);
        assert!(
            matches!(&check, ArtifactCheck::Corrupt(Corruption::ReadMismatch { file }) if file == DATA_FILE),
            "{check:?}"
        );
    }
}
