//! Any template text rendered over a fixed conversation, and the vip-llava template over
//! any JSON messages: errors are fine, panics and hangs are not.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vipllava_processor::{ChatMessage, ChatTemplate};

const VIP: &str = include_str!("../../tests/fixtures/tiny-5x-f32/chat_template.jinja");

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let messages = [ChatMessage::user_with_images(1, "What is in the red box?")];
    let _ = ChatTemplate::new(text).render(&messages, true);
    if let Ok(serde_json::Value::Array(list)) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = ChatTemplate::new(VIP).render(&list, true);
    }
});
