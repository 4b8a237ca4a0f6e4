//! The agent's handling of a stream request (method, authority, port, node header): nothing
//! panics, and a request admitted is a CONNECT for this node to an allow-listed port.
#![no_main]
use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use tunnel_agent::connect;

fuzz_target!(|input: &[u8]| {
    // `method` NUL `uri` [NUL `node header`].
    let mut parts = input.splitn(3, |b| *b == 0);
    let (Some(method), Some(uri)) = (parts.next(), parts.next()) else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let mut b = http::Request::builder().method(method.clone()).uri(uri);
    let node = parts.next();
    if let Some(n) = node {
        let Ok(v) = http::HeaderValue::from_bytes(n) else {
            return;
        };
        b = b.header("x-edge-node", v);
    }
    let Ok(req) = b.body(()) else {
        return;
    };
    let ports: BTreeSet<u16> = [10250, 10255].into();
    if let Ok(port) = connect::admit(&req, "edge-a", &ports) {
        assert_eq!(method, http::Method::CONNECT);
        assert!(ports.contains(&port));
        assert!(node.is_none_or(|n| n == b"edge-a"), "{node:?}");
    }
});
