//! Text ↔ model ids for one served model: its tokenizer, chat template, restricted vocabulary
//! (`vocab_map.json`, the tiny preset) and the system prompt it was trained with. Shared by the
//! HTTP handlers (which encode prompts, so a bad request fails before it queues) and the engine
//! thread (which decodes what it generates, a few tokens at a time: [`Detokenizer`]).

use pipeline_model::chat::{ChatTemplate, Message};
use pipeline_model::pretrained::Pretrained;
use pipeline_model::tokenizer::Tokenizer;
use pipeline_model::vocab::VocabMap;

/// What a model needs besides its weights to talk.
#[derive(Debug)]
pub struct TextCodec {
    tokenizer: Tokenizer,
    chat: Option<ChatTemplate>,
    vocab: Option<VocabMap>,
    /// Model ids that end a reply (eos ids, `<|im_end|>`).
    pub stop_ids: Vec<u32>,
    /// Prepended as the system message when a conversation has none (`chat_defaults.json`).
    pub system_default: Option<String>,
    /// Positions the model was trained for (`max_position_embeddings`): prompt + completion.
    pub context_len: usize,
}

impl TextCodec {
    /// Takes the tokenizer side of a loaded model, leaving the weights to the caller.
    pub fn split<D: dfdx::prelude::Device<f32>>(
        p: Pretrained<D>,
        system_default: Option<String>,
    ) -> (pipeline_model::Qwen2<D>, TextCodec) {
        let stop_ids = p.stop_ids();
        let context_len = p.model.cfg.max_position_embeddings;
        let Pretrained { model, tokenizer, chat, vocab } = p;
        (model, TextCodec { tokenizer, chat, vocab, stop_ids, system_default, context_len })
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// The conversation rendered with the chat template and its generation prompt, as model ids.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, String> {
        let chat = self.chat.as_ref().ok_or("this model has no chat template: use /v1/completions")?;
        let ids =
            chat.encode_prompt(&self.tokenizer, messages, self.system_default.as_deref()).map_err(|e| e.to_string())?;
        Ok(self.to_model_ids(&ids))
    }

    /// Plain text (the tokenizer's special tokens added, as `pipeline generate --raw` does).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>, String> {
        let ids = self.tokenizer.encode(text, true).map_err(|e| e.to_string())?;
        Ok(self.to_model_ids(&ids))
    }

    /// Tokenizer ids given by a client (`prompt` as a list of ids): every id must be one the model
    /// knows.
    pub fn model_ids_of(&self, tokenizer_ids: &[u32]) -> Result<Vec<u32>, String> {
        match &self.vocab {
            Some(v) => tokenizer_ids
                .iter()
                .map(|&t| v.model_id(t).ok_or_else(|| format!("token id {t} is not in this model's vocabulary")))
                .collect(),
            None => Ok(tokenizer_ids.to_vec()),
        }
    }

    fn to_model_ids(&self, tokenizer_ids: &[u32]) -> Vec<u32> {
        match &self.vocab {
            Some(v) => v.to_model(tokenizer_ids, 0),
            None => tokenizer_ids.to_vec(),
        }
    }

    /// Model ids → text (special tokens skipped), as `Pretrained::decode_model_ids`.
    pub fn decode(&self, model_ids: &[u32]) -> String {
        let ids = match &self.vocab {
            Some(v) => match v.to_tokenizer(model_ids) {
                Ok(ids) => ids,
                Err(_) => return String::new(),
            },
            None => model_ids.to_vec(),
        };
        self.tokenizer.decode(&ids, true).unwrap_or_default()
    }
}

#[cfg(test)]
impl TextCodec {
    /// The Qwen2.5 tokenizer, no template, vocabulary map or stop ids.
    pub(crate) fn qwen25_for_tests() -> TextCodec {
        TextCodec {
            tokenizer: Tokenizer::qwen25().unwrap(),
            chat: None,
            vocab: None,
            stop_ids: Vec::new(),
            system_default: None,
            context_len: 1 << 16,
        }
    }
}

/// Incremental detokenisation of one sequence's generated ids (vLLM's detokenizer, HF's
/// `TextStreamer`): each step decodes only a short window — the tokens released by the previous
/// step (a lookback, so a decoder that treats a leading space or a merge specially sees the same
/// context as a full decode) plus the new ones — and appends what the window adds to the text.
/// While the window ends in an incomplete UTF-8 character (byte-level BPE splits a CJK character
/// or an emoji over several tokens; the decoder writes U+FFFD for the partial bytes), nothing is
/// released and the window grows until the character is complete. The text is therefore always
/// the full decode of the tokens taken so far, up to a held-back incomplete tail that
/// [`Detokenizer::flush`] releases. The cost of a step is independent of the sequence's length.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    /// Start of the decoded window (the first token of the previous release).
    prefix: usize,
    /// Tokens whose text is in [`Self::text`].
    read: usize,
    text: String,
}

impl Detokenizer {
    /// Everything released so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Takes `tokens` (every id generated so far; earlier calls saw a prefix of it) and appends
    /// the text the new ones complete; returns how many bytes were appended.
    pub fn step(&mut self, codec: &TextCodec, tokens: &[u32]) -> usize {
        self.advance(codec, tokens, false)
    }

    /// Like [`Self::step`], releasing a held-back incomplete character too (as the full decode
    /// would show it): for a sequence's last step.
    pub fn flush(&mut self, codec: &TextCodec, tokens: &[u32]) -> usize {
        self.advance(codec, tokens, true)
    }

    fn advance(&mut self, codec: &TextCodec, tokens: &[u32], last: bool) -> usize {
        if tokens.len() <= self.read {
            return 0;
        }
        let before = codec.decode(&tokens[self.prefix..self.read]);
        let window = codec.decode(&tokens[self.prefix..]);
        let old = self.text.len();
        match window.strip_prefix(before.as_str()) {
            Some(added) if !last && added.ends_with('\u{FFFD}') => {
                // an incomplete character: wait for the tokens that complete it
                return 0;
            }
            Some(added) => self.text.push_str(added),
            // a decoder whose output for a window does not extend its output for the window's
            // start (none of ours): the full decode, which is always right
            None => {
                let full = codec.decode(tokens);
                if !last && full.ends_with('\u{FFFD}') {
                    return 0;
                }
                // (what was released cannot be taken back)
                if let Some(added) = full.strip_prefix(self.text.as_str()) {
                    self.text.push_str(added);
                }
            }
        }
        if self.text.len() > old {
            self.prefix = self.read;
        }
        self.read = tokens.len();
        self.text.len() - old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen_codec() -> TextCodec {
        TextCodec::qwen25_for_tests()
    }

    /// Byte-level BPE splits CJK characters and emoji over several tokens; fed one token at a
    /// time, the released text is always a prefix of the full decode without a partial
    /// character, equals it whenever its last character is complete, and is the full decode once
    /// flushed.
    #[test]
    fn incremental_decoding_equals_the_full_decode_on_multi_byte_text() {
        let codec = qwen_codec();
        let texts = [
            "Hello 👋🏽 world! 你好，世界。🦀 Rust ist schön — ça va? 🇩🇪🇫🇷 😀😃😄",
            "鑫鑫鑫 龘 𠀀𠀁 ᄀᄁ 🧑‍🤝‍🧑 done",
            "plain ascii, nothing to hold",
        ];
        let mut split_chars = 0;
        for text in texts {
            let ids = codec.tokenizer.encode(text, false).unwrap();
            assert_eq!(codec.decode(&ids), text);
            let mut d = Detokenizer::default();
            for i in 1..=ids.len() {
                d.step(&codec, &ids[..i]);
                let full = codec.decode(&ids[..i]);
                if full.ends_with('\u{FFFD}') {
                    split_chars += 1;
                }
                assert!(!d.text().contains('\u{FFFD}'), "{:?} after {i} tokens", d.text());
                assert!(full.starts_with(d.text()), "{:?} is not a prefix of {full:?}", d.text());
                // once the characters are complete, nothing is held back
                if !full.ends_with('\u{FFFD}') {
                    assert_eq!(d.text(), full, "after {i} tokens");
                }
            }
            d.flush(&codec, &ids);
            assert_eq!(d.text(), text);
        }
        assert!(split_chars >= 3, "the texts must split characters over tokens ({split_chars})");
    }

    /// A sequence that ends inside a character shows what the full decode shows.
    #[test]
    fn flushing_releases_an_incomplete_character() {
        let codec = qwen_codec();
        let ids = codec.tokenizer.encode("ok 🦀🦀", false).unwrap();
        let cut = (1..ids.len()).rev().find(|&i| codec.decode(&ids[..i]).ends_with('\u{FFFD}')).expect("a split emoji");
        let mut d = Detokenizer::default();
        for i in 1..=cut {
            d.step(&codec, &ids[..i]);
        }
        assert!(!d.text().ends_with('\u{FFFD}'));
        d.flush(&codec, &ids[..cut]);
        assert_eq!(d.text(), codec.decode(&ids[..cut]));
    }
}
