//! The node identity in a client certificate (what the server keys a session by): any bytes
//! in place of the DER never panic, and an identity found is a valid node name.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunnel_proto::identity;

fuzz_target!(|der: &[u8]| {
    if let Ok(node) = identity::node_id_from_cert(der) {
        assert!(identity::valid_node_name(&node), "{node:?}");
    }
});
