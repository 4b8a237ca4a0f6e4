//! The managed block of a hosts file: whatever the file held (operator lines, a block edited
//! or cut by hand), splicing the block in is idempotent, the block's lines are in the result,
//! and splicing an empty block removes it again.
#![no_main]
use std::path::Path;

use edge_model::{hosts, node_table::NodeTable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    // `existing hosts file` NUL `node table`.
    let (existing, table) = input.split_once('\0').unwrap_or((input, ""));
    let Ok(t) = NodeTable::parse(table, Path::new("fuzz")) else {
        return;
    };
    let block = hosts::render(&t);
    let once = hosts::splice(existing, &block);
    let twice = hosts::splice(&once, &block);
    assert_eq!(
        once, twice,
        "splicing the same block again changed the file"
    );
    for line in block.lines() {
        assert!(
            once.lines().any(|l| l == line),
            "{line:?} missing from\n{once}"
        );
    }
    let removed = hosts::splice(&once, "");
    assert!(!removed.lines().any(|l| l == hosts::BEGIN), "{removed}");
    let _ = hosts::coredns_hosts(&t);
});
