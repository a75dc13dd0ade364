//! Checkpoints: what a killed training run resumes from.
//!
//! ```text
//! <dir>/checkpoint-<step>/   trainable.safetensors   the trainable tensors (dfdx field names)
//!                            optimizer.safetensors   AdamW moments: exp_avg.<name>, exp_avg_sq.<name>
//!                            trainer_state.json      step, history, best, early-stopping counter,
//!                                                    the open logging window, config fingerprint
//! <dir>/best-<step>/          the same, for the lowest eval loss so far
//! ```
//!
//! A checkpoint is written into `.tmp-<name>` and renamed into place, so a directory named
//! `checkpoint-*` is always complete; a stray `.tmp-*` is an interrupted write and is ignored.
//! Data order needs no saved RNG state: it is a pure function of `(seed, epoch)` and the step.
//! After each save, `checkpoint-*` beyond `save_total_limit` (oldest first) are deleted, as are
//! `best-*` directories other than the one the new state names or newer ones.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{de::DeserializeOwned, Serialize};

use crate::params::NamedTensor;
use crate::TrainError;

const PARAMS_FILE: &str = "trainable.safetensors";
const OPTIM_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io { path: path.to_path_buf(), source: e }
}

/// Write f32 tensors as a safetensors file (temp file + rename). `metadata` goes into the
/// header's `__metadata__` (e.g. `{"format": "pt"}` for peft/transformers readers).
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), TrainError> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bytes) {
        let v = TensorView::new(Dtype::F32, t.shape.clone(), b)
            .map_err(|e| TrainError::Checkpoint(format!("{}: tensor `{}`: {e:?}", path.display(), t.name)))?;
        views.push((t.name.clone(), v));
    }
    let buf = safetensors::tensor::serialize(views, &metadata)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e:?}", path.display())))?;
    write_atomic(path, &buf)
}

/// Read every tensor of a safetensors file as f32 (F32, F16 and BF16 are accepted), sorted by name.
pub fn read_safetensors(path: &Path) -> Result<Vec<NamedTensor>, TrainError> {
    let buf = fs::read(path).map_err(io(path))?;
    let st =
        SafeTensors::deserialize(&buf).map_err(|e| TrainError::Checkpoint(format!("{}: {e:?}", path.display())))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => {
                d.chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect()
            }
            Dtype::F16 => d.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            other => {
                return Err(TrainError::Checkpoint(format!(
                    "{}: tensor `{name}` has dtype {other:?}; expected F32, F16 or BF16",
                    path.display()
                )))
            }
        };
        out.push(NamedTensor { name, shape: view.shape().to_vec(), data });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: renormalise.
            let shift = f.leading_zeros() - 21;
            sign | ((127 - 15 + 1 - shift) << 23) | ((f << shift) & 0x3ff) << 13
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// Write a file atomically ([`pipeline_cache::fs::write_atomic`]: unique temp file in the same
/// directory, fsync, rename), creating the directory; an error names `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    pipeline_cache::fs::write_atomic(path, bytes).map_err(io(path))
}

/// A checkpoint read back.
pub struct Loaded<S> {
    pub dir: PathBuf,
    pub params: Vec<NamedTensor>,
    pub optimizer: Vec<NamedTensor>,
    pub state: S,
}

/// Write `<root>/<name>` atomically (replacing an existing one of that name).
pub fn save<S: Serialize>(
    root: &Path,
    name: &str,
    params: &[NamedTensor],
    optimizer: &[NamedTensor],
    state: &S,
) -> Result<PathBuf, TrainError> {
    fs::create_dir_all(root).map_err(io(root))?;
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write_safetensors(&tmp.join(PARAMS_FILE), params, None)?;
    write_safetensors(&tmp.join(OPTIM_FILE), optimizer, None)?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    write_atomic(&tmp.join(STATE_FILE), &json)?;
    let dst = root.join(name);
    if dst.exists() {
        fs::remove_dir_all(&dst).map_err(io(&dst))?;
    }
    fs::rename(&tmp, &dst).map_err(io(&dst))?;
    Ok(dst)
}

/// Read one checkpoint directory.
pub fn load<S: DeserializeOwned>(dir: &Path) -> Result<Loaded<S>, TrainError> {
    let state_path = dir.join(STATE_FILE);
    let text = fs::read(&state_path).map_err(io(&state_path))?;
    let state =
        serde_json::from_slice(&text).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", state_path.display())))?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        params: read_safetensors(&dir.join(PARAMS_FILE))?,
        optimizer: read_safetensors(&dir.join(OPTIM_FILE))?,
        state,
    })
}

/// `(step, path)` of every complete `<prefix>-<step>` directory under `root`, oldest first.
pub fn list(root: &Path, prefix: &str) -> Result<Vec<(u64, PathBuf)>, TrainError> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(TrainError::Io { path: root.to_path_buf(), source: e }),
    };
    for entry in rd {
        let entry = entry.map_err(io(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) =
            name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')).and_then(|s| s.parse::<u64>().ok())
        {
            if entry.path().join(STATE_FILE).is_file() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Delete the oldest `checkpoint-*` beyond `keep`.
pub fn rotate(root: &Path, keep: usize) -> Result<(), TrainError> {
    let all = list(root, "checkpoint")?;
    let excess = all.len().saturating_sub(keep);
    for (_, p) in all.into_iter().take(excess) {
        fs::remove_dir_all(&p).map_err(io(&p))?;
    }
    Ok(())
}

/// Delete `best-*` older than `keep_step` (the best named by the last saved state).
pub fn prune_best(root: &Path, keep_step: Option<u64>) -> Result<(), TrainError> {
    for (step, p) in list(root, "best")? {
        if keep_step.is_some_and(|k| step < k) || keep_step.is_none() {
            fs::remove_dir_all(&p).map_err(io(&p))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_and_f16() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let t = vec![
            NamedTensor { name: "b".into(), shape: vec![2, 2], data: vec![1.0, -2.0, 3.5, 0.0] },
            NamedTensor { name: "a".into(), shape: vec![1], data: vec![7.0] },
        ];
        write_safetensors(&p, &t, Some([("format".to_string(), "pt".to_string())].into())).unwrap();
        let back = read_safetensors(&p).unwrap();
        assert_eq!(back, vec![t[1].clone(), t[0].clone()]);
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
    }

    #[test]
    fn list_ignores_incomplete_and_rotate_keeps_newest() {
        let dir = tempfile::tempdir().unwrap();
        let t = vec![NamedTensor { name: "w".into(), shape: vec![1], data: vec![1.0] }];
        for s in [2u64, 4, 6] {
            save(dir.path(), &format!("checkpoint-{s}"), &t, &[], &serde_json::json!({"step": s})).unwrap();
        }
        fs::create_dir_all(dir.path().join(".tmp-checkpoint-8")).unwrap();
        fs::create_dir_all(dir.path().join("checkpoint-10")).unwrap(); // no state file: incomplete
        let steps: Vec<u64> = list(dir.path(), "checkpoint").unwrap().into_iter().map(|x| x.0).collect();
        assert_eq!(steps, vec![2, 4, 6]);
        rotate(dir.path(), 2).unwrap();
        let steps: Vec<u64> = list(dir.path(), "checkpoint").unwrap().into_iter().map(|x| x.0).collect();
        assert_eq!(steps, vec![4, 6]);
        let l: Loaded<serde_json::Value> = load(&dir.path().join("checkpoint-6")).unwrap();
        assert_eq!(l.state["step"], 6);
        assert_eq!(l.params, t);
    }
}
