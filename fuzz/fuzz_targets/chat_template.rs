//! The chat-template renderer: Qwen2.5's template over arbitrary messages (roles and contents
//! from the input, `\0`-separated), and arbitrary template sources compiled and rendered over a
//! fixed conversation; a string or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

use pipeline_model::chat::{ChatTemplate, Message};

fuzz_target!(|data: &[u8]| {
    static QWEN: OnceLock<ChatTemplate> = OnceLock::new();
    let qwen = QWEN.get_or_init(|| ChatTemplate::qwen25_default().unwrap());
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(src) = text.strip_prefix("T:") {
        // Loops are bounded by the input size, so an arbitrary template cannot hang.
        if src.len() > 512 || src.contains("range") {
            return;
        }
        if let Ok(t) = src.parse::<ChatTemplate>() {
            let _ = t.render(&[Message::system("s"), Message::user("u"), Message::assistant("a")], true);
        }
        return;
    }
    let parts: Vec<&str> = text.split('\0').collect();
    let msgs: Vec<Message> =
        parts.chunks(2).map(|c| Message { role: c[0].to_string(), content: c.get(1).unwrap_or(&"").to_string() }).collect();
    let _ = qwen.render(&msgs, true);
    let _ = qwen.render(&msgs, false);
});
