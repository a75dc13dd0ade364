//! `GET /metrics`: Prometheus text exposition of the process's `metrics` recorder.
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `pipeline_requests_total{route, status}` | counter | HTTP requests answered |
//! | `pipeline_request_duration_seconds{route}` | histogram | time to the response head (a stream's start) |
//! | `pipeline_prompt_tokens_total` | counter | prompt tokens prefilled |
//! | `pipeline_generation_tokens_total` | counter | tokens generated |
//! | `pipeline_time_to_first_token_seconds` | histogram | submission → first token |
//! | `pipeline_inter_token_latency_seconds` | histogram | between two tokens of one sequence |
//! | `pipeline_queue_depth` | gauge | requests waiting for a slot |
//! | `pipeline_running_sequences` | gauge | sequences being decoded |

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::AppState;

/// Latency buckets (seconds) of every `*_seconds` histogram.
const BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Installs the process-wide recorder (once) and describes the metrics.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)?
        .install_recorder()?;
    metrics::describe_counter!("pipeline_requests_total", "HTTP requests answered, by route and status");
    metrics::describe_histogram!(
        "pipeline_request_duration_seconds",
        metrics::Unit::Seconds,
        "time from a request to its response head"
    );
    metrics::describe_counter!("pipeline_prompt_tokens_total", "prompt tokens prefilled");
    metrics::describe_counter!("pipeline_generation_tokens_total", "tokens generated");
    metrics::describe_histogram!(
        "pipeline_time_to_first_token_seconds",
        metrics::Unit::Seconds,
        "time from submission to a request's first token"
    );
    metrics::describe_histogram!(
        "pipeline_inter_token_latency_seconds",
        metrics::Unit::Seconds,
        "time between two tokens of one sequence"
    );
    metrics::describe_gauge!("pipeline_queue_depth", "requests waiting for a free sequence slot");
    metrics::describe_gauge!("pipeline_running_sequences", "sequences being decoded");
    // present from the start, not only after the first request
    metrics::gauge!("pipeline_queue_depth").set(0.0);
    metrics::gauge!("pipeline_running_sequences").set(0.0);
    metrics::counter!("pipeline_prompt_tokens_total").increment(0);
    metrics::counter!("pipeline_generation_tokens_total").increment(0);
    Ok(handle)
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let body = state.metrics.as_ref().map(PrometheusHandle::render).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
