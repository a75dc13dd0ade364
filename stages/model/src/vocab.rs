//! A restricted vocabulary: the model's embedding and LM head cover only the tokenizer ids that
//! occur in the training corpus (the *learned* part), the required special tokens and — built
//! with [`VocabMap::with_byte_fallback`] — the 256 byte-level base tokens of the byte-level BPE.
//! Model id `i` is tokenizer id `ids[i]`. Stored beside the model as `vocab_map.json`
//! (`{"tokenizer_ids": [...]}`).
//!
//! Byte fallback: text is encoded with the full tokenizer, then each token outside the map is
//! re-encoded as its byte-level pieces (a byte-level BPE token's string is one base-token
//! character per byte), so every string encodes losslessly and decodes back to itself; only a
//! map without the base tokens (one saved before they were added) still maps such a token to
//! the `unknown` id. [`VocabMap::encode`] counts the tokens that fell back.
//!
//! Why: with Qwen2.5's 151,936-row head, the LM-head matmul is ~99% of a tiny model's FLOPs
//! (see the crate docs and `benches/throughput.rs`); a corpus of a few thousand distinct tokens
//! makes training tens of times faster while generation still produces real text through the
//! real tokenizer (encode → [`VocabMap::to_model`] → generate → [`VocabMap::to_tokenizer`] → decode).

use std::collections::HashMap;
use std::path::Path;

use crate::checkpoint::write_atomic;
use crate::error::ModelError;
use crate::tokenizer::Tokenizer;

/// GPT-2's `bytes_to_unicode`, the alphabet of a byte-level BPE (Qwen2.5's): byte `b` is the
/// token of the one character `byte_char(b)`. Printable Latin-1 bytes stand for themselves; the
/// other 68 bytes are mapped, in order, to U+0100 onwards.
pub fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("U+0100..U+0143 are chars")
}

/// Model ids of a text, and how many of its tokenizer tokens were outside the map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Tokenizer tokens not in the map, each re-encoded as byte-level base tokens (or, without
    /// them in the map, as the unknown id).
    pub outside: usize,
}

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

    /// [`VocabMap::new`] plus the 256 byte-level base tokens of `tok` (see [`byte_char`]), so
    /// that [`VocabMap::encode`] is lossless. An error when `tok` lacks one of them (it is not a
    /// byte-level BPE).
    pub fn with_byte_fallback(
        tok: &Tokenizer,
        required: &[u32],
        corpus_ids: impl IntoIterator<Item = u32>,
    ) -> Result<Self, ModelError> {
        let bytes = (0..=255u8)
            .map(|b| {
                let c = byte_char(b);
                tok.token_to_id(&c.to_string()).ok_or_else(|| {
                    ModelError::config(
                        "tokenizer",
                        format!("no byte-level base token {c:?} for byte {b:#04x}: not a byte-level BPE"),
                    )
                })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        Ok(Self::new(required, bytes.into_iter().chain(corpus_ids)))
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

    /// Tokenizer ids → model ids; an id outside the map becomes `unknown` (a model id). See
    /// [`VocabMap::encode`] for the lossless form.
    pub fn to_model(&self, tokenizer_ids: &[u32], unknown: u32) -> Vec<u32> {
        tokenizer_ids.iter().map(|t| self.inverse.get(t).copied().unwrap_or(unknown)).collect()
    }

    /// Tokenizer ids → model ids with byte fallback: an id outside the map becomes the model ids
    /// of its byte-level pieces (each character of its token string is a base token); when a
    /// piece is not in the map either (a map without the base tokens), the id becomes `unknown`.
    pub fn encode(&self, tok: &Tokenizer, tokenizer_ids: &[u32], unknown: u32) -> Encoded {
        let mut out = Encoded { ids: Vec::with_capacity(tokenizer_ids.len()), outside: 0 };
        for &t in tokenizer_ids {
            if let Some(&m) = self.inverse.get(&t) {
                out.ids.push(m);
                continue;
            }
            out.outside += 1;
            let pieces: Option<Vec<u32>> = tok.id_to_token(t).and_then(|s| {
                s.chars().map(|c| tok.token_to_id(&c.to_string()).and_then(|b| self.model_id(b))).collect()
            });
            match pieces {
                Some(p) if !p.is_empty() => out.ids.extend(p),
                _ => out.ids.push(unknown),
            }
        }
        out
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

    #[test]
    fn byte_alphabet_is_gpt2s() {
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(byte_char(b' '), '\u{120}'); // "Ġ"
        assert_eq!(byte_char(b'\n'), '\u{10A}'); // "Ċ"
        assert_eq!(byte_char(0), '\u{100}');
        assert_eq!(byte_char(0xAD), '\u{143}');
        let all: std::collections::HashSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(all.len(), 256);
    }

    // Regression (issue 15, point 2): every token outside the restricted vocabulary became one
    // unknown id, so the MCQ letters A-D all scored the same.
    #[test]
    fn byte_fallback_encodes_every_string_losslessly() {
        let tok = Tokenizer::qwen25().unwrap();
        let learned = tok.encode("你好，世界", false).unwrap();
        let required = [tok.token_to_id("<|endoftext|>").unwrap(), tok.token_to_id("<|im_end|>").unwrap()];
        let m = VocabMap::with_byte_fallback(&tok, &required, learned.iter().copied()).unwrap();
        assert!(m.len() <= 2 + 256 + learned.len(), "{}", m.len());
        assert_eq!(m.model_id(required[0]), Some(0));
        let inside = m.encode(&tok, &learned, 0);
        assert_eq!((inside.ids.len(), inside.outside), (learned.len(), 0));
        let mut letters = Vec::new();
        for text in ["A", "B", "C", "D", "Answer: C", "unseen Ünïcödé text 😀", "身份证号"] {
            let ids = tok.encode(text, false).unwrap();
            let enc = m.encode(&tok, &ids, 0);
            let back = tok.decode(&m.to_tokenizer(&enc.ids).unwrap(), false).unwrap();
            assert_eq!(back, text, "lossless round trip");
            if text.len() == 1 {
                letters.push(enc.ids.clone());
            }
        }
        letters.dedup();
        assert_eq!(letters.len(), 4, "A-D are distinct model ids: {letters:?}");
        let unseen = tok.encode("unseen", false).unwrap();
        assert_eq!(m.encode(&tok, &unseen, 0).outside, unseen.len());
        // A map without the base tokens (saved before them) still maps unseen tokens to unknown.
        let old = VocabMap::new(&required, learned.iter().copied());
        assert_eq!(old.encode(&tok, &unseen, 0), Encoded { ids: vec![0; unseen.len()], outside: unseen.len() });
    }
}
