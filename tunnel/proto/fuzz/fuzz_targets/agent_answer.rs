//! The server's reading of an agent's answer to a stream: whatever status and headers come
//! back, reading the refusal never panics, and a refusal label read is one the server knows.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel_proto::wire::{self, Refusal};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = u16::from_be_bytes([data[0], data[1]]);
    let Ok(status) = http::StatusCode::from_u16(status) else {
        return;
    };
    let mut resp = http::Response::builder().status(status);
    // Header lines `name: value`, as the agent (or anything in its place) might send.
    for line in data[2..].split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        resp = resp.header(name, value);
    }
    let Ok(resp) = resp.body(()) else {
        return;
    };
    let (reason, _detail) = wire::refusal_of(&resp);
    if let Some(r) = reason {
        assert_eq!(Refusal::from_label(r.label()), Some(r));
    }
});
