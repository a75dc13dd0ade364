//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status
//! OpenAI (and vLLM) use for each kind.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// 400 `invalid_request_error`, naming the offending parameter.
    pub fn invalid(param: impl Into<Option<&'static str>>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into().map(str::to_string),
            code: None,
        }
    }
    /// 400 for a parameter given by its path (`messages[2].content[0].type`).
    pub fn invalid_at(param: String, message: impl Into<String>) -> Self {
        ApiError { param: Some(param), ..Self::invalid(None, message) }
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist (GET /v1/models lists the served ones)."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }
    pub fn unauthorized(message: &str) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }
    pub fn busy(message: String) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message,
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        }
    }
    pub fn timeout(message: String) -> Self {
        ApiError { status: StatusCode::REQUEST_TIMEOUT, message, kind: "timeout_error", param: None, code: None }
    }
    pub fn internal(message: String) -> Self {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message, kind: "server_error", param: None, code: None }
    }
    pub fn unavailable(message: String) -> Self {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message, kind: "server_error", param: None, code: None }
    }
    /// An error answer made by a layer below the handlers (unknown route, wrong method, body too
    /// large), given its status and plain-text body.
    pub fn from_status(status: StatusCode, text: &str) -> Self {
        let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
        let message = match status {
            StatusCode::NOT_FOUND => {
                "no such route (the API is under /v1: /v1/models, /v1/chat/completions, /v1/completions)".into()
            }
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this route".into(),
            StatusCode::PAYLOAD_TOO_LARGE => format!("request body too large ({})", text.trim()),
            _ if text.trim().is_empty() => status.canonical_reason().unwrap_or("error").to_string(),
            _ => text.trim().to_string(),
        };
        ApiError { status, message, kind, param: None, code: None }
    }

    /// The JSON body (also sent as an SSE event when a stream fails part-way).
    pub fn json(&self) -> String {
        serde_json::to_string(&Body {
            error: Inner { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code },
        })
        .expect("serialisable")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, self.json()).into_response();
        r.headers_mut().insert(axum::http::header::CONTENT_TYPE, "application/json".parse().expect("valid header"));
        r
    }
}
