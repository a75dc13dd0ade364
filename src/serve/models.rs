//! `GET /v1/models`: the base model first, then its adapters (OpenAI's list shape; `root` / `parent`
//! as vLLM lists LoRA adapters).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use super::openai::{ModelCard, ModelList};
use super::AppState;

pub async fn list(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let base = &state.models[0];
    let data = state
        .models
        .iter()
        .enumerate()
        .map(|(i, id)| ModelCard {
            id: id.clone(),
            object: "model",
            created: state.created,
            owned_by: "pipeline",
            root: base.clone(),
            parent: (i > 0).then(|| base.clone()),
            max_model_len: state.codec.context_len,
        })
        .collect();
    Json(ModelList { object: "list", data })
}
