//! TensorBoard event files: what `tensorboard --logdir` reads, written without TensorFlow.
//!
//! An event file is a sequence of TFRecord frames, each holding one `tensorflow.Event` protobuf:
//!
//! ```text
//! u64 LE  length of data
//! u32 LE  masked CRC32C of those 8 length bytes
//! data    the serialised Event
//! u32 LE  masked CRC32C of data
//! ```
//!
//! where `masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8` (TensorFlow's
//! `core/lib/hash/crc32c.h`). The first event carries `file_version = "brain.Event:2"`; each
//! later one a wall time, a step and a `Summary` with one value: a scalar (`simple_value`, a
//! float32, as transformers' `SummaryWriter.add_scalar` writes it) or a text (a `DT_STRING`
//! tensor under the `text` plugin, as `add_text` writes it).
//!
//! No crate on crates.io fits: the TensorBoard writers there are unmaintained and pull a whole
//! protobuf runtime for the five messages below, so the encoder is written out here (field
//! numbers from `tensorflow/core/util/event.proto`, `summary.proto`, `tensor.proto`,
//! `tensor_shape.proto`), and tested against TensorBoard's own reader by
//! `scripts/test_tensorboard.sh`.
//!
//! # Tags
//! The names transformers' Trainer gives its logs (its `TensorBoardCallback` rewrites `loss` to
//! `train/loss` and `eval_loss` to `eval/loss`): `train/loss`, `train/learning_rate`,
//! `train/grad_norm`, `train/tokens_per_second`, `train/epoch`, an objective's figures as
//! `train/<name>` (DPO/KTO: `train/rewards/chosen`, `train/rewards/rejected`,
//! `train/rewards/accuracies`, `train/rewards/margins`, `train/logps/chosen`, ...), `eval/loss`
//! and `eval/<name>`.

use std::path::{Path, PathBuf};

use crate::metrics::Record;
use crate::TrainError;

/// TensorFlow's CRC32C (Castagnoli, reflected polynomial 0x82F63B78).
pub fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    const TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The CRC as TFRecord stores it (rotated and offset, so a CRC of CRCs is not trivial).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord frame around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// A minimal protobuf writer: the wire types the Event messages use.
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }
    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }
    fn int(&mut self, field: u32, v: i64) {
        self.key(field, 0);
        self.varint(v as u64);
    }
    fn double(&mut self, field: u32, v: f64) {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn float(&mut self, field: u32, v: f32) {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, field: u32, v: &[u8]) {
        self.key(field, 2);
        self.varint(v.len() as u64);
        self.0.extend_from_slice(v);
    }
    fn message(&mut self, field: u32, m: Pb) {
        self.bytes(field, &m.0);
    }
}

/// `Summary.Value`'s payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `simple_value` (a float32, what `add_scalar` writes).
    Scalar(f32),
    /// A markdown string under the `text` plugin (what `add_text` writes).
    Text(String),
}

/// One event: a wall time (seconds since the epoch), a step, a tagged value.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: u64,
    pub tag: String,
    pub value: Value,
}

/// The `Event` protobuf of the header record.
fn file_version_event(wall_time: f64) -> Vec<u8> {
    let mut e = Pb::default();
    e.double(1, wall_time);
    e.bytes(3, b"brain.Event:2");
    e.0
}

/// The `Event` protobuf of one summary value.
fn encode(ev: &Event) -> Vec<u8> {
    let mut v = Pb::default();
    v.bytes(1, ev.tag.as_bytes()); // Value.tag
    match &ev.value {
        Value::Scalar(x) => v.float(2, *x), // Value.simple_value
        Value::Text(s) => {
            // Value.metadata = SummaryMetadata { plugin_data: PluginData { plugin_name: "text" } }
            let mut plugin = Pb::default();
            plugin.bytes(1, b"text");
            let mut meta = Pb::default();
            meta.message(1, plugin);
            // Value.tensor = TensorProto { dtype: DT_STRING (7), tensor_shape: [1], string_val: [s] }
            let mut dim = Pb::default();
            dim.int(1, 1);
            let mut shape = Pb::default();
            shape.message(2, dim);
            let mut tensor = Pb::default();
            tensor.int(1, 7);
            tensor.message(2, shape);
            tensor.bytes(8, s.as_bytes());
            v.message(8, tensor);
            v.message(9, meta);
        }
    }
    let mut summary = Pb::default();
    summary.message(1, v); // Summary.value
    let mut e = Pb::default();
    e.double(1, ev.wall_time); // Event.wall_time
    e.int(2, ev.step as i64); // Event.step
    e.message(5, summary); // Event.summary
    e.0
}

/// The bytes of a whole event file: the version header, then `events` in order.
pub fn encode_file(wall_time: f64, events: &[Event]) -> Vec<u8> {
    let mut out = frame(&file_version_event(wall_time));
    for ev in events {
        out.extend(frame(&encode(ev)));
    }
    out
}

/// The TensorBoard tag of a metrics-JSONL figure, as transformers' `rewrite_logs` names it.
pub fn tag(record_type: &str, name: &str) -> String {
    format!("{record_type}/{name}")
}

/// The scalar events of a training history (see the module docs for the tags), all at
/// `wall_time`; `hparams` (markdown) is added as the text `hparams` at step 0.
pub fn training_events(history: &[Record], wall_time: f64, hparams: Option<&str>) -> Vec<Event> {
    let mut out = Vec::new();
    let mut push = |step: u64, tag: String, value: f64| {
        out.push(Event { wall_time, step, tag, value: Value::Scalar(value as f32) });
    };
    for r in history {
        match r {
            Record::Train(t) => {
                push(t.step, tag("train", "loss"), t.loss);
                push(t.step, tag("train", "learning_rate"), t.learning_rate);
                push(t.step, tag("train", "grad_norm"), t.grad_norm);
                push(t.step, tag("train", "tokens_per_second"), t.tokens_per_second);
                push(t.step, tag("train", "epoch"), t.epoch);
                for (k, v) in &t.metrics {
                    push(t.step, tag("train", k), *v);
                }
            }
            Record::Eval(e) => {
                push(e.step, tag("eval", "loss"), e.eval_loss);
                for (k, v) in &e.metrics {
                    push(e.step, tag("eval", k), *v);
                }
            }
        }
    }
    if let Some(h) = hparams {
        out.insert(0, Event { wall_time, step: 0, tag: "hparams".into(), value: Value::Text(h.to_string()) });
    }
    out
}

/// The event file's name in `dir`: `events.out.tfevents.<unix seconds>.pipeline` (TensorBoard
/// picks up any file whose name contains `tfevents`).
pub fn event_file_path(dir: &Path, wall_time: f64) -> PathBuf {
    dir.join(format!("events.out.tfevents.{}.pipeline", wall_time.max(0.0) as u64))
}

/// Write `events` as one event file in `dir` (atomically); returns its path.
pub fn write_events(dir: &Path, wall_time: f64, events: &[Event]) -> Result<PathBuf, TrainError> {
    let path = event_file_path(dir, wall_time);
    pipeline_cache::fs::write_atomic(&path, &encode_file(wall_time, events))
        .map_err(|source| TrainError::Io { path: path.clone(), source })?;
    Ok(path)
}

/// Seconds since the Unix epoch, now.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A `[params]` table as the markdown text the hparams summary shows: one `key = value` line
/// each, in a code block.
pub fn hparams_markdown(title: &str, params: &[(String, String)]) -> String {
    let mut s = format!("**{title}**\n\n");
    for (k, v) in params {
        s.push_str(&format!("    {k} = {v}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::metrics::{EvalRecord, TrainRecord};

    /// RFC 3720 appendix B.4 (iSCSI) check values, and the usual "123456789" check value.
    #[test]
    fn crc32c_matches_the_rfc_3720_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        let dec: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&dec), 0x113F_DB5C);
        assert_eq!(crc32c(b""), 0);
    }

    /// A frame as TensorFlow's `record_writer.cc` lays it out: length, its masked CRC, data, the
    /// data's masked CRC.
    #[test]
    fn frames_have_length_masked_crcs_and_data() {
        assert_eq!(masked_crc32c(b""), 0xa282_ead8, "masked CRC of nothing is the mask delta");
        let f = frame(b"abc");
        assert_eq!(f.len(), 8 + 4 + 3 + 4);
        assert_eq!(&f[..8], &3u64.to_le_bytes());
        assert_eq!(u32::from_le_bytes(f[8..12].try_into().unwrap()), masked_crc32c(&3u64.to_le_bytes()));
        assert_eq!(&f[12..15], b"abc");
        assert_eq!(u32::from_le_bytes(f[15..19].try_into().unwrap()), masked_crc32c(b"abc"));
        // Pinned bytes (a change of framing shows here before TensorBoard refuses the file).
        let crc = crc32c(b"abc");
        assert_eq!(crc, 0x364B_3FB7);
        assert_eq!(masked_crc32c(b"abc"), (0x364B_3FB7u32.rotate_right(15)).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn scalar_event_protobuf_bytes() {
        let ev = Event { wall_time: 1.5, step: 300, tag: "train/loss".into(), value: Value::Scalar(0.25) };
        let b = encode(&ev);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xAC, 0x02]); // step 300 as a varint
        let mut value = vec![0x0A, 10];
        value.extend_from_slice(b"train/loss");
        value.push(0x15);
        value.extend_from_slice(&0.25f32.to_le_bytes());
        let mut summary = vec![0x0A, value.len() as u8];
        summary.extend_from_slice(&value);
        want.push(0x2A);
        want.push(summary.len() as u8);
        want.extend_from_slice(&summary);
        assert_eq!(b, want);
    }

    #[test]
    fn training_history_becomes_trainer_tags() {
        let history = vec![
            Record::Train(TrainRecord {
                step: 5,
                epoch: 0.5,
                loss: 2.0,
                learning_rate: 1e-3,
                grad_norm: 0.5,
                tokens_per_second: 100.0,
                metrics: BTreeMap::from([("rewards/chosen".to_string(), 0.1)]),
            }),
            Record::Eval(EvalRecord { step: 5, epoch: 0.5, eval_loss: 2.5, metrics: BTreeMap::new() }),
        ];
        let evs = training_events(&history, 7.0, Some("**sft**"));
        let tags: Vec<_> = evs.iter().map(|e| (e.tag.as_str(), e.step)).collect();
        assert_eq!(
            tags,
            [
                ("hparams", 0),
                ("train/loss", 5),
                ("train/learning_rate", 5),
                ("train/grad_norm", 5),
                ("train/tokens_per_second", 5),
                ("train/epoch", 5),
                ("train/rewards/chosen", 5),
                ("eval/loss", 5)
            ]
        );
        let file = encode_file(7.0, &evs);
        // Header + 8 events, each framed: walk the frames and check every CRC.
        let mut at = 0;
        let mut n = 0;
        while at < file.len() {
            let len = u64::from_le_bytes(file[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(file[at + 8..at + 12].try_into().unwrap()), masked_crc32c(&file[at..at + 8]));
            let data = &file[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(file[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc32c(data));
            at += 16 + len;
            n += 1;
        }
        assert_eq!((at, n), (file.len(), 9));
    }
}
