//! Text ↔ model ids for one served model: its tokenizer, chat template, restricted vocabulary
//! (`vocab_map.json`, the tiny preset) and the system prompt it was trained with. Shared by the
//! HTTP handlers (which encode prompts, so a bad request fails before it queues) and the engine
//! thread (which decodes what it generates).

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
