//! A restricted vocabulary: the model's embedding and LM head cover only the tokenizer ids that
//! occur in the training corpus (plus required special tokens). Model id `i` is tokenizer id
//! `ids[i]`. Stored beside the model as `vocab_map.json` (`{"tokenizer_ids": [...]}`).
//!
//! Why: with Qwen2.5's 151,936-row head, the LM-head matmul is ~99% of a tiny model's FLOPs
//! (see the crate docs and `benches/throughput.rs`); a corpus of a few thousand distinct tokens
//! makes training tens of times faster while generation still produces real text through the
//! real tokenizer (encode → [`VocabMap::to_model`] → generate → [`VocabMap::to_tokenizer`] → decode).

use std::collections::HashMap;
use std::path::Path;

use crate::checkpoint::write_atomic;
use crate::error::ModelError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabMap {
    ids: Vec<u32>,
    inverse: HashMap<u32, u32>,
}

impl VocabMap {
    /// From the tokenizer ids to keep (deduplicated, sorted; `required` first in the given order so
    /// that e.g. the unknown/pad token gets model id 0).
    pub fn new(required: &[u32], corpus_ids: impl IntoIterator<Item = u32>) -> Self {
        let mut ids: Vec<u32> = Vec::new();
        for &r in required {
            if !ids.contains(&r) {
                ids.push(r);
            }
        }
        let mut rest: Vec<u32> = corpus_ids.into_iter().filter(|i| !ids.contains(i)).collect();
        rest.sort_unstable();
        rest.dedup();
        ids.extend(rest);
        Self::from_ids(ids).expect("deduplicated")
    }

    fn from_ids(ids: Vec<u32>) -> Result<Self, ModelError> {
        let mut inverse = HashMap::with_capacity(ids.len());
        for (i, &t) in ids.iter().enumerate() {
            if inverse.insert(t, i as u32).is_some() {
                return Err(ModelError::config("tokenizer_ids", format!("tokenizer id {t} appears twice")));
            }
        }
        Ok(VocabMap { ids, inverse })
    }

    /// Rows of the model's embedding.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Tokenizer ids → model ids; an id outside the map becomes `unknown` (a model id).
    pub fn to_model(&self, tokenizer_ids: &[u32], unknown: u32) -> Vec<u32> {
        tokenizer_ids.iter().map(|t| self.inverse.get(t).copied().unwrap_or(unknown)).collect()
    }

    /// Model id of a tokenizer id, if kept.
    pub fn model_id(&self, tokenizer_id: u32) -> Option<u32> {
        self.inverse.get(&tokenizer_id).copied()
    }

    /// Model ids → tokenizer ids.
    pub fn to_tokenizer(&self, model_ids: &[u32]) -> Result<Vec<u32>, ModelError> {
        model_ids
            .iter()
            .enumerate()
            .map(|(pos, &m)| {
                self.ids.get(m as usize).copied().ok_or(ModelError::TokenOutOfRange {
                    id: m,
                    pos,
                    vocab: self.ids.len(),
                })
            })
            .collect()
    }

    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let v = serde_json::json!({ "tokenizer_ids": self.ids });
        write_atomic(path, v.to_string().as_bytes())
    }

    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = pipeline_cache::checked::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })?;
        let ids = v
            .get("tokenizer_ids")
            .and_then(|a| a.as_array())
            .ok_or_else(|| ModelError::config("tokenizer_ids", format!("missing in {}", path.display())))?
            .iter()
            .map(|x| {
                x.as_u64().map(|x| x as u32).ok_or_else(|| ModelError::config("tokenizer_ids", "expected token ids"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_ids(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways_and_roundtrips() {
        let m = VocabMap::new(&[151643, 151645], [500, 7, 500, 151645, 9]);
        assert_eq!(m.len(), 5);
        assert_eq!(m.to_model(&[151643, 7, 9, 500, 12345], 0), vec![0, 2, 3, 4, 0]);
        assert_eq!(m.to_tokenizer(&[1, 4]).unwrap(), vec![151645, 500]);
        assert!(m.to_tokenizer(&[5]).unwrap_err().to_string().contains('5'));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vocab_map.json");
        m.save(&p).unwrap();
        assert_eq!(VocabMap::load(&p).unwrap(), m);
    }
}
