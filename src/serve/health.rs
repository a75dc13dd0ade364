//! `GET /health`: 200 while the engine runs (no API key needed, for load balancers and probes).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

pub async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "status": "ok", "running": state.engine.running(), "waiting": state.engine.waiting() }))
}
